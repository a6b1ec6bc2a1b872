"""Continuous batching changes no token: batched greedy == one at a time == the reference model == golden."""

from __future__ import annotations

import torch

from engine_helpers import greedy, make_engine, random_prompt, run_all


def test_batched_greedy_matches_golden_and_one_at_a_time(tiny_model, golden):
    prompts = [p["input_ids"] for p in golden["prompts"]]
    want = [p["greedy_ids"] for p in golden["prompts"]]
    n = len(want[0])

    batched = make_engine(tiny_model, max_batch=4)
    reqs = [batched.add_request(p, greedy(n)) for p in prompts]
    run_all(batched)
    assert [r.output for r in reqs] == want

    for p, w in zip(prompts, want):
        alone = make_engine(tiny_model, max_batch=1)
        r = alone.add_request(p, greedy(n))
        run_all(alone)
        assert r.output == w


def test_staggered_arrivals_match_reference_model(tiny_model):
    """Requests joining a running batch mid-stream, with prompts of mixed lengths (chunked, unaligned tails)."""
    prompts = [random_prompt(n, seed) for seed, n in enumerate([150, 7, 200, 65, 1])]
    n_new = 6
    want = [tiny_model.generate_greedy(p, n_new)[0] for p in prompts]

    eng = make_engine(tiny_model, max_batch=3, max_step_tokens=128)
    reqs = [eng.add_request(prompts[0], greedy(n_new))]
    eng.step()
    reqs.append(eng.add_request(prompts[1], greedy(n_new)))
    eng.step()
    eng.step()
    reqs += [eng.add_request(p, greedy(n_new)) for p in prompts[2:]]  # the last two wait for a free slot
    run_all(eng)
    assert [r.output for r in reqs] == want


def test_batched_logprobs_match_single(tiny_model):
    """Per-token logprobs of a request do not depend on its batch mates (to fp32 rounding)."""
    a, b = random_prompt(90, 11), random_prompt(30, 12)
    alone = make_engine(tiny_model)
    ra = alone.add_request(a, greedy(5, logprobs=3))
    outs_alone = run_all(alone)
    both = make_engine(tiny_model)
    rb_a = both.add_request(a, greedy(5, logprobs=3))
    both.add_request(b, greedy(5, logprobs=3))
    outs_both = [o for o in run_all(both) if o.request_id == rb_a.id]
    lp1 = torch.tensor([o.logprobs[0].logprob for o in outs_alone if o.request_id == ra.id])
    lp2 = torch.tensor([o.logprobs[0].logprob for o in outs_both])
    assert ra.output == rb_a.output
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=1e-4)


def test_decodes_run_in_slot_order_after_slots_are_recycled(tiny_model):
    """A step's decode rows come in ascending slot order (the lightning decode kernel then walks the state pool in
    ascending addresses), also once a finished request's slot went to a later arrival; and the tokens stay those of
    the reference model."""
    eng = make_engine(tiny_model, max_batch=3, max_step_tokens=128)
    prompts = [random_prompt(n, 40 + i) for i, n in enumerate((12, 9, 15, 11))]
    lengths = (10, 2, 10, 8)
    reqs = [eng.add_request(p, greedy(n)) for p, n in zip(prompts[:3], lengths[:3])]
    while reqs[1].finish_reason is None:  # the second request finishes first and frees its slot
        eng.step()
    reqs.append(eng.add_request(prompts[3], greedy(lengths[3])))
    orders, launch = [], eng._launch

    def record(segs, reqs, feed):
        orders.append([s.slot for s in segs if s.decode])
        return launch(segs, reqs, feed)

    eng._launch = record
    run_all(eng)
    assert [r.slot for r in reqs] == [None] * 4
    recycled = [o for o in orders if len(o) == 3]
    assert recycled, "the late request never decoded beside the first two"
    assert all(o == sorted(o) for o in orders), orders
    want = [tiny_model.generate_greedy(p, n)[0] for p, n in zip(prompts, lengths)]
    assert [r.output for r in reqs] == want
