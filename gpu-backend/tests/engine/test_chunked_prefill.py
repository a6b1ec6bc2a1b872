"""Chunked prefill == whole prefill, and running streams keep decoding while a long prompt is prefilled."""

from __future__ import annotations

import torch

from engine_helpers import greedy, make_engine, random_prompt, run_all


def _final_states(engine, req):
    return {l: s[req.slot].clone() for l, s in engine.states.states.items()}


def test_chunked_prefill_equals_whole_prefill(tiny_model):
    prompt = random_prompt(300, 3)
    # the reference model's prompt states (one chunked prefill of the whole prompt)
    _, ref_state = tiny_model.prefill(torch.tensor(prompt))
    results = {}
    for step_tokens in (64, 128, 1024):  # 5 chunks, 3 chunks, one piece
        eng = make_engine(tiny_model, max_step_tokens=step_tokens, prefix_cache_bytes=0)
        req = eng.add_request(prompt, greedy(8))
        steps = 0
        while not req.prefill_done:
            eng.step()
            steps += 1
        assert steps == -(-300 // step_tokens)
        states = _final_states(eng, req)
        for l, s in ref_state.linear.items():
            # state after the prompt; the slot already holds it (the first token is sampled, not yet fed)
            err = (states[l] - s[0]).abs().max() / s[0].abs().max()
            assert err <= 1e-4, f"layer {l} state differs by {err:.2e} (step_tokens={step_tokens})"
        run_all(eng)
        results[step_tokens] = req.output
    assert results[64] == results[128] == results[1024] == tiny_model.generate_greedy(prompt, 8)[0]


def test_decodes_flow_during_long_prefill(tiny_model):
    eng = make_engine(tiny_model, max_batch=2, max_step_tokens=64, prefix_cache_bytes=0)
    short = eng.add_request(random_prompt(5, 1), greedy(30))
    eng.step()  # short prompt prefilled, first token out
    long_ = eng.add_request(random_prompt(400, 2), greedy(2))
    steps_with_prefill = 0
    while not long_.prefill_done:
        before = len(short.output)
        eng.step()
        steps_with_prefill += 1
        assert len(short.output) == before + 1, "the running stream stalled during a prefill chunk"
    assert steps_with_prefill >= 400 // 64
    run_all(eng)
    assert long_.output == tiny_model.generate_greedy(long_.prompt, 2)[0]


def test_prompt_only_steps_take_the_prefill_budget(tiny_model):
    """Nobody streaming: a prompt goes in max_prefill_step_tokens chunks; once a stream decodes, max_step_tokens."""
    eng = make_engine(tiny_model, max_batch=2, max_step_tokens=64, max_prefill_step_tokens=256, prefix_cache_bytes=0)
    long_ = eng.add_request(random_prompt(600, 4), greedy(10))
    chunks = []
    while not long_.prefill_done:
        before = long_.computed
        eng.step()
        chunks.append(long_.computed - before)
    assert chunks == [256, 256, 88]
    other = eng.add_request(random_prompt(300, 5), greedy(2))
    chunks = []
    while not other.prefill_done:  # long_ decodes in every one of these steps: 63 prompt tokens at most
        before = other.computed
        eng.step()
        chunks.append(other.computed - before)
    assert max(chunks) <= 63 and sum(chunks) == 300
    run_all(eng)
    assert long_.output == tiny_model.generate_greedy(long_.prompt, 10)[0]
    assert other.output == tiny_model.generate_greedy(other.prompt, 2)[0]


def test_prefill_budget_below_the_step_budget_is_refused(tiny_model):
    from ringlinear.engine import EngineConfigError

    try:
        make_engine(tiny_model, max_step_tokens=128, max_prefill_step_tokens=64)
    except EngineConfigError as e:
        assert "max_prefill_step_tokens" in str(e)
    else:
        raise AssertionError("expected EngineConfigError")


def test_warm_up_runs_the_largest_step_and_leaves_nothing_behind(tiny_model):
    eng = make_engine(tiny_model, max_batch=2, max_step_tokens=64, max_prefill_step_tokens=320)
    free_blocks, free_slots = eng.kv.blocks.num_free, len(eng.states.slots.free)
    assert eng.warm_up() == (320, 0, 0)  # 320 prompt tokens; no cuDNN plans or graphs on CPU
    assert eng.kv.blocks.num_free == free_blocks and len(eng.states.slots.free) == free_slots
    assert eng.prefix.bytes == 0 and eng.steps == 0 and eng.prompt_tokens_total == 0  # no trace in cache or counters
    req = eng.add_request(random_prompt(200, 6), greedy(4))
    try:
        eng.warm_up()
    except RuntimeError as e:
        assert "before any request" in str(e)
    else:
        raise AssertionError("expected RuntimeError")
    run_all(eng)
    assert req.output == tiny_model.generate_greedy(req.prompt, 4)[0]
