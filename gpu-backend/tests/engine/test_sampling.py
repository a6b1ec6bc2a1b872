"""Seeded sampling is reproducible and batch-independent; stop conditions; incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import greedy, make_engine, random_prompt, run_all

from ringlinear.engine import SamplingError, SamplingParams
from ringlinear.engine.detokenizer import IncrementalDetokenizer
from ringlinear.engine.sampling import Sampler, sample_batch


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


def _mixed_params():
    return [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1),
            SamplingParams(temperature=0.7, top_k=5, seed=2), SamplingParams(temperature=1.3, top_p=0.9, seed=3),
            SamplingParams(temperature=1.0, top_k=20, top_p=0.5, logprobs=2, seed=4),
            SamplingParams(temperature=0.0, logprobs=0)]


def test_batched_sampling_equals_each_row_alone():
    """sample_batch over a step's rows gives each row what it gets alone with the same seed: the batch draws each
    request's one number from its own generator, and every operation is per row."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(5)) * 3
    batch = sample_batch(logits, [Sampler(p) for p in _mixed_params()])
    alone = [Sampler(p).sample(logits[i]) for i, p in enumerate(_mixed_params())]
    assert [t for t, _ in batch] == [t for t, _ in alone]
    assert batch[0][0] == int(logits[0].argmax()) and batch[0][1] is None
    for i in (4, 5):
        ref = torch.log_softmax(logits[i], -1)
        assert batch[i][1].logprob == pytest.approx(float(ref[batch[i][0]]), abs=1e-5)
        assert [t for t, _ in batch[i][1].top] == ref.topk(_mixed_params()[i].logprobs).indices.tolist()
    with pytest.raises(ValueError, match="samplers"):
        sample_batch(logits, [Sampler(SamplingParams())])
    assert sample_batch(logits[:0], []) == []


def _frequencies(device, params, logits, n=6000):
    rows = logits.to(device)[None].expand(n, -1)
    toks = [t for t, _ in sample_batch(rows, [Sampler(SamplingParams(seed=s, **params)) for s in range(n)])]
    return torch.bincount(torch.tensor(toks), minlength=logits.numel()).double() / n


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_sampled_frequencies_follow_the_kept_distribution(device):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0])
    for params, keep in [(dict(temperature=1.0), 8), (dict(temperature=0.5), 8), (dict(temperature=1.0, top_k=3), 3),
                         (dict(temperature=1.0, top_p=0.7), None)]:
        probs = torch.softmax(logits.double() / params["temperature"], -1)
        if keep is None:  # top-p: the smallest prefix (descending) whose mass reaches top_p
            keep = int((probs.cumsum(0) - probs < params["top_p"]).sum())
        want = torch.zeros_like(probs)
        want[:keep] = probs[:keep] / probs[:keep].sum()
        got = _frequencies(device, params, logits)
        assert (got[keep:] == 0).all(), (params, got)
        assert (got - want).abs().max() < 0.025, (params, got, want)


def test_each_row_gets_its_parameters_and_its_own_number():
    """launch_sampling hands the kernel (or its twin) each request's temperature, top_k (-1 = off), top_p and the
    next number of the request's own generator; greedy rows draw no number."""
    import random

    from ringlinear.kernels.sampling_reference import sample_rows_reference

    logits = torch.randn(5, 400, generator=torch.Generator().manual_seed(9)) * 2
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(temperature=1.2, top_k=-1, seed=2),
              SamplingParams(temperature=0.0, seed=3), SamplingParams(temperature=1.0, top_k=7, top_p=0.6, seed=4),
              SamplingParams(temperature=0.5, top_k=1, seed=5)]
    samplers = [Sampler(p) for p in params]
    got = [t for t, _ in sample_batch(logits, samplers)]
    u = [random.Random(p.seed).random() for p in params]
    spec = torch.tensor([[0, 1, 2, 3, 4], [0.8, 1.2, 0.0, 1.0, 0.0], [0, 0, 0, 7, 0], [0.9, 1.0, 1.0, 0.6, 1.0],
                         [u[0], u[1], 0.0, u[3], 0.0]], dtype=torch.float64)
    assert got == sample_rows_reference(logits, spec).tolist()
    assert [s.rng.random() for s in samplers] == [random.Random(p.seed).random() if p.greedy else
                                                  _second(p.seed) for p in params]


def _second(seed):
    import random

    r = random.Random(seed)
    r.random()
    return r.random()


def test_tiny_temperatures_are_greedy_and_bad_logits_give_a_valid_id():
    logits = torch.tensor([[1.0, 5.0, 2.0, 3.0]])
    assert sample_batch(logits, [Sampler(SamplingParams(temperature=1e-9, seed=1))])[0][0] == 1
    nan = torch.full((1, 4), float("nan"))
    tok = sample_batch(nan, [Sampler(SamplingParams(temperature=1.0, seed=1))])[0][0]
    assert 0 <= tok < 4
