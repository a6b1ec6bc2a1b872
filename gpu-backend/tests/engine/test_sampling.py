"""Seeded sampling is reproducible and batch-independent; stop conditions; incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import greedy, make_engine, random_prompt, run_all

from ringlinear.engine import SamplingError, SamplingParams
from ringlinear.engine.detokenizer import IncrementalDetokenizer
from ringlinear.engine.sampling import Sampler


def _sample(model, params, companions=0):
    eng = make_engine(model, max_batch=4)
    r = eng.add_request(random_prompt(40, 1), params)
    for s in range(companions):
        eng.add_request(random_prompt(30, 50 + s), SamplingParams(max_tokens=12, temperature=1.0, seed=s))
    run_all(eng)
    return r.output


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model):
    p = dict(max_tokens=12, temperature=1.0, top_p=0.95, top_k=50)
    a = _sample(tiny_model, SamplingParams(seed=1234, **p))
    assert a == _sample(tiny_model, SamplingParams(seed=1234, **p))
    assert a == _sample(tiny_model, SamplingParams(seed=1234, **p), companions=2)
    assert a != _sample(tiny_model, SamplingParams(seed=4321, **p))


def test_truncation_to_one_token_is_greedy(tiny_model):
    g = _sample(tiny_model, greedy(8))
    assert _sample(tiny_model, SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=3)) == g
    assert _sample(tiny_model, SamplingParams(max_tokens=8, temperature=0.7, top_p=1e-6, seed=3)) == g


def test_top_p_and_top_k_keep_only_the_allowed_tokens():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits, -1)  # 0.64, 0.24, 0.09, ...
    seen = set()
    for seed in range(200):
        seen.add(Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=seed)).sample(logits)[0])
    assert seen == {0, 1} and probs[0] < 0.8 <= probs[0] + probs[1]
    seen = {Sampler(SamplingParams(temperature=1.0, top_k=3, seed=s)).sample(logits)[0] for s in range(200)}
    assert seen == {0, 1, 2}


def test_logprobs_are_log_softmax():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    tok, lp = Sampler(SamplingParams(temperature=0.0, logprobs=3)).sample(logits)
    ref = torch.log_softmax(logits, -1)
    assert tok == int(logits.argmax()) and lp.logprob == pytest.approx(float(ref[tok]))
    assert [i for i, _ in lp.top] == ref.topk(3).indices.tolist()


def test_stop_token_and_eos(tiny_model):
    out = _sample(tiny_model, greedy(8))
    eng = make_engine(tiny_model)
    r = eng.add_request(random_prompt(40, 1), greedy(8, stop_token_ids=[out[3]]))
    run_all(eng)
    assert r.output == out[:4] and r.finish_reason == "stop"
    eng = make_engine(tiny_model, eos_ids={out[2]})
    r = eng.add_request(random_prompt(40, 1), greedy(8))
    run_all(eng)
    assert r.output == out[:3] and r.finish_reason == "stop"
    r = eng.add_request(random_prompt(40, 1), greedy(8, ignore_eos=True))
    run_all(eng)
    assert r.output == out and r.finish_reason == "length"


def test_stop_string_cuts_text(tiny_model, tiny_tokenizer):
    eng = make_engine(tiny_model, tokenizer=tiny_tokenizer, eos_ids=set())
    r = eng.add_request(random_prompt(40, 1), greedy(8))
    full = "".join(o.text for o in run_all(eng))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    eng = make_engine(tiny_model, tokenizer=tiny_tokenizer, eos_ids=set())
    r2 = eng.add_request(random_prompt(40, 1), greedy(8, stop=[stop]))
    text = "".join(o.text for o in run_all(eng))
    assert r2.finish_reason == "stop" and text == full[: full.index(stop)]
    assert r2.output == r.output[: len(r2.output)]


def test_detokenizer_holds_back_partial_characters_and_stop_prefixes():
    pieces = {1: "ab", 2: "\ufffd", 3: "é", 4: "cd", 5: "X", 6: "Y"}

    def decode(ids):  # token 3 completes the character token 2 started
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")

    d = IncrementalDetokenizer(decode, ["cdX!"])
    assert d.add(1) == ("ab", False)
    assert d.add(2) == ("", False)  # incomplete character held back
    assert d.add(3) == ("é", False)
    assert d.add(4) == ("", False)  # "cd" may start the stop string
    assert d.add(5) == ("", False)
    assert d.add(6) == ("cdXY", False)
    assert d.flush() == ""
    d = IncrementalDetokenizer(decode, ["dX"])
    d.add(1)
    assert d.add(4) == ("c", False)  # "d" may start the stop string, "c" cannot
    assert d.add(5) == ("", True) and d.text == "abc"


@pytest.mark.parametrize("bad,param", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=3.0), "temperature"),
                                       (dict(top_p=0.0), "top_p"), (dict(stop=["a"] * 5), "stop"), (dict(logprobs=50), "logprobs")])
def test_bad_sampling_params(bad, param):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**bad).validate()
    assert e.value.param == param
