"""Overlapped steps (`EngineConfig.overlap`): step t+1 is launched before step t's tokens reach the host, its decodes
reading them on the device. Nothing a user sees may change: the same tokens, logprobs, text, finish reasons and
usage as the synchronous engine; a request that stops on a token loses the one step computed after it."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import greedy, make_engine, random_prompt, run_all

from ringlinear.engine import SamplingParams
from ringlinear.engine.runner import Segment


def _record_segments(eng):
    """Wrap the runner so every step's segments are kept."""
    log, execute = [], eng.runner.execute

    def wrapped(segs, feed=None):
        log.append(list(segs))
        return execute(segs, feed)

    eng.runner.execute = wrapped
    return log


def _outputs(outs):
    """Per request: token ids, text, logprobs, finish reason and the usage of its last output."""
    by = {}
    for o in outs:
        r = by.setdefault(o.request_id, {"ids": [], "text": "", "lp": [], "end": None})
        r["ids"] += o.token_ids
        r["text"] += o.text
        r["lp"] += [None if lp is None else (round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in o.logprobs]
        if o.finished:
            r["end"] = (o.finish_reason, o.prompt_tokens, o.completion_tokens, o.cached_tokens)
    return by


def _staggered(eng, params):
    """Requests arriving mid-stream, prompts of mixed lengths (chunked, unaligned tails), more than the slots."""
    prompts = [random_prompt(n, seed) for seed, n in enumerate([150, 7, 200, 65, 1, 90])]
    outs = []
    eng.add_request(prompts[0], params(0), "r0")
    outs += eng.step()
    eng.add_request(prompts[1], params(1), "r1")
    outs += eng.step()
    outs += eng.step()
    for i, p in enumerate(prompts[2:], 2):
        eng.add_request(p, params(i), f"r{i}")
    return _outputs(outs + run_all(eng))


def test_overlapped_greedy_matches_golden_and_the_reference_model(tiny_model, golden):
    prompts = [p["input_ids"] for p in golden["prompts"]]
    want = [p["greedy_ids"] for p in golden["prompts"]]
    eng = make_engine(tiny_model, max_batch=4, overlap=True)
    segs = _record_segments(eng)
    reqs = [eng.add_request(p, greedy(len(want[0]))) for p in prompts]
    assert eng.step() == []  # the first step's tokens come back with the next call
    run_all(eng)
    assert [r.output for r in reqs] == want
    fed = [s for step in segs for s in step if s.feed is not None]
    assert fed and all(s.decode for s in fed)  # the decodes did read their tokens on the device

    stag = make_engine(tiny_model, max_batch=3, max_step_tokens=128, overlap=True)
    got = _staggered(stag, lambda i: greedy(6))
    prompts = [random_prompt(n, seed) for seed, n in enumerate([150, 7, 200, 65, 1, 90])]
    assert [got[f"r{i}"]["ids"] for i in range(6)] == [tiny_model.generate_greedy(p, 6)[0] for p in prompts]


def test_overlap_changes_no_sampled_token_logprob_text_or_usage(tiny_model, tiny_tokenizer):
    def params(i):
        return SamplingParams(max_tokens=5 + i, temperature=0.9, top_p=0.9 if i % 2 else 1.0, top_k=40 * (i % 3),
                              seed=100 + i, logprobs=2 if i % 2 == 0 else None)

    runs, steps = {}, {}
    for overlap in (False, True):
        eng = make_engine(tiny_model, tokenizer=tiny_tokenizer, max_batch=3, max_step_tokens=128, overlap=overlap,
                          prefix_cache_bytes=0)
        log = _record_segments(eng)
        runs[overlap] = _staggered(eng, params)
        steps[overlap] = [[(s.slot, s.start, len(s.tokens), s.decode) for s in step] for step in log]
        assert eng.generation_tokens_total == sum(len(r["ids"]) for r in runs[overlap].values())
        assert not eng.has_work() and eng.states.slots.used == 0 and eng.kv.blocks.used == 0
    assert runs[True] == runs[False]
    assert all(r["end"][0] == "length" for r in runs[True].values())
    # the same steps: a waiting request takes the slot of one that ends on max_tokens as early as without overlap
    assert steps[True] == steps[False]


@pytest.mark.parametrize("how", ["eos", "stop_token", "stop_string"])
def test_a_request_stopping_on_a_token_drops_the_step_after_it(tiny_model, tiny_tokenizer, how):
    prompt = random_prompt(40, 1)
    full = tiny_model.generate_greedy(prompt, 10)[0]
    kw, eos = {}, set()
    if how == "eos":
        eos = {full[3]}
    elif how == "stop_token":
        kw = {"stop_token_ids": [full[3]]}
    runs = {}
    for overlap in (False, True):
        eng = make_engine(tiny_model, tokenizer=tiny_tokenizer, eos_ids=eos, overlap=overlap)
        if how == "stop_string":
            text = tiny_tokenizer.decode(full[:6])
            kw = {"stop": [text[len(tiny_tokenizer.decode(full[:3])):][:2]]}
        other = eng.add_request(random_prompt(30, 2), greedy(10))
        r = eng.add_request(prompt, greedy(10, **kw))
        outs = run_all(eng)
        runs[overlap] = (_outputs(outs), eng.generation_tokens_total, eng.steps)
        assert r.finish_reason == "stop" and len(r.output) < 10 and other.output == tiny_model.generate_greedy(
            random_prompt(30, 2), 10)[0]
        assert eng.states.slots.used == 0 and not eng.has_work()
    (sync_out, sync_tokens, sync_steps), (ov_out, ov_tokens, ov_steps) = runs[False], runs[True]
    assert ov_out == sync_out and ov_tokens == sync_tokens
    assert ov_steps == sync_steps  # the stopped request's extra row rode in steps its batch mate needed anyway


def test_max_tokens_costs_no_extra_step(tiny_model):
    steps = {}
    for overlap in (False, True):
        eng = make_engine(tiny_model, overlap=overlap)
        r = eng.add_request(random_prompt(50, 3), greedy(7))
        run_all(eng)
        assert len(r.output) == 7 and r.finish_reason == "length"
        steps[overlap] = eng.steps
    assert steps[True] == steps[False] == 7  # the prompt's step + 6 decodes


def test_abort_of_a_request_in_flight(tiny_model):
    eng = make_engine(tiny_model, max_batch=2, overlap=True)
    keep = eng.add_request(random_prompt(30, 4), greedy(8))
    gone = eng.add_request(random_prompt(20, 5), greedy(8))
    for _ in range(3):
        eng.step()
    assert gone.pending == 1  # its next token is on the device
    assert eng.abort(gone.id) and eng.states.slots.used == 1
    waiting = eng.add_request(random_prompt(25, 6), greedy(4))  # takes the freed slot while the step is in flight
    outs = run_all(eng)
    assert all(o.request_id != gone.id for o in outs)
    assert keep.output == tiny_model.generate_greedy(random_prompt(30, 4), 8)[0]
    assert waiting.output == tiny_model.generate_greedy(random_prompt(25, 6), 4)[0]


def test_overlapped_prefix_hit_changes_no_token(tiny_model):
    shared = random_prompt(200, 5)
    eng = make_engine(tiny_model, max_step_tokens=128, overlap=True)
    eng.add_request(shared + random_prompt(10, 6), greedy(3))
    run_all(eng)
    second = shared[:192] + random_prompt(40, 7)
    r = eng.add_request(second, greedy(6))
    run_all(eng)
    assert eng.prefix.hits == 1 and r.cached_tokens == 192
    assert r.output == tiny_model.generate_greedy(second, 6)[0]


@pytest.mark.parametrize("kernels", [False, True])
def test_runner_feed_gives_the_same_logits_as_host_tokens(tiny_model, kernels):
    """Decode rows fed from a device tensor (any rows, any feed order, beside a prompt chunk) compute what the same
    tokens passed from the host do. kernels=True runs the kernel path's dispatch through the kernels' CPU twins."""
    runs = []
    for use_feed in (False, True):
        eng = make_engine(tiny_model, max_batch=3, kernels=kernels)
        reqs = [eng.add_request(random_prompt(n, s), greedy(4)) for n, s in ((30, 1), (12, 2))]
        eng.step()  # both prompts, one token each
        tokens = [r.output[-1] for r in reqs]
        feed = torch.tensor([5, tokens[1], 7, tokens[0]])
        chunk = random_prompt(20, 3)
        late = eng.add_request(chunk, greedy(1))
        eng._admit()
        segs = []
        for i, (r, row) in enumerate(zip(reqs, (3, 1))):
            tok = [0] if use_feed else [tokens[i]]
            segs.append(Segment(r.slot, r.blocks, r.computed, tok, True, True, feed=row if use_feed else None))
        segs.insert(1, Segment(late.slot, late.blocks, 0, chunk, False, True))
        mixed, _ = eng.runner.execute(segs, feed if use_feed else None)
        for s, r in zip((segs[0], segs[2]), reqs):
            r.computed = s.end
        dec = [Segment(r.slot, r.blocks, r.computed, [0] if use_feed else [t], True, True, feed=f if use_feed else None)
               for r, t, f in zip(reqs, (11, 13), (2, 1))]  # a decode-only step, rows not in feed order
        alone, _ = eng.runner.execute(dec, torch.tensor([9, 13, 11]) if use_feed else None)
        runs.append((mixed, alone))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_feed_row_outside_the_feed_is_refused(tiny_model):
    eng = make_engine(tiny_model)
    r = eng.add_request(random_prompt(10, 1), greedy(3))
    eng.step()
    with pytest.raises(ValueError, match="feed"):
        eng.runner.execute([Segment(r.slot, r.blocks, r.computed, [0], True, True, feed=2)], torch.tensor([1, 2]))


def _cuda_model(tiny_ckpt):
    from ringlinear import kernels as K
    from ringlinear.checkpoint import load_model

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    return load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")


def _served_mix(eng):
    """Greedy, seeded (top-k, top-p) and logprob requests, staggered so steps mix prompt chunks and decodes, then
    decodes alone."""
    def params(i):
        return SamplingParams(max_tokens=6 + 2 * i, temperature=0.0 if i % 2 else 0.8, top_k=20 * (i % 3), seed=i,
                              top_p=0.9 if i % 4 == 2 else 1.0, logprobs=3 if i % 3 == 0 else None)

    return _staggered(eng, params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlap_is_on_by_default_and_changes_no_token_on_cuda(tiny_ckpt):
    model = _cuda_model(tiny_ckpt)
    runs = {}
    for overlap in (None, False):
        # fewer slots than requests: a slot freed by a request that ends on max_tokens must reach the waiting ones at
        # the same step as without overlap (bf16 GEMMs give bitwise the same logits only for the same batches)
        eng = make_engine(model, max_batch=3, max_step_tokens=128, overlap=overlap)
        assert eng.overlap is (overlap is None) and eng.runner.graphs is not None
        runs[overlap] = _served_mix(eng)
    assert runs[None] == runs[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlapped_steps_queue_without_host_sync_on_cuda(tiny_ckpt):
    """What an overlapped call does before it waits for the previous step's tokens - sample that step (top-p rows
    included: a few are sorted whole), admit, schedule, launch the next (decode graph replays and mixed steps) - never
    makes the host wait for the GPU."""
    model = _cuda_model(tiny_ckpt)
    eng = make_engine(model, max_batch=3, max_step_tokens=128)
    _served_mix(eng)  # captures the decode graphs and builds the plans of these shapes (those do synchronise)
    checked = []

    def strict(fn, name):
        def run(*args):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                checked.append(name)
        return run

    for name in ("_sample", "_admit", "_schedule", "_launch"):
        setattr(eng, name, strict(getattr(eng, name), name))
    again = _served_mix(eng)
    assert checked.count("_launch") >= 10 and checked.count("_sample") >= 10
    assert all(len(r["ids"]) == 6 + 2 * int(k[1:]) for k, r in again.items())
