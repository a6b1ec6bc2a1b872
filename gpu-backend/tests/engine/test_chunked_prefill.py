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
