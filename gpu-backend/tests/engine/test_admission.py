"""Admission from the memory budget, the queue limit, cancellation, and requests that can never run."""

from __future__ import annotations

import pytest

from engine_helpers import greedy, make_engine, random_prompt, run_all

from ringlinear.engine import Engine, EngineConfig, EngineConfigError, MemoryPlan, QueueFull, RequestRejected


def test_abort_frees_slot_and_blocks_at_once(tiny_model):
    eng = make_engine(tiny_model, max_batch=2, prefix_cache_bytes=0)
    reqs = [eng.add_request(random_prompt(20, s), greedy(500)) for s in range(3)]
    eng.step()
    assert eng.states.slots.used == 2 and len(eng.waiting) == 1
    used = eng.kv.blocks.used
    assert eng.abort(reqs[0].id)
    assert eng.states.slots.used == 1 and eng.kv.blocks.used == used - -(-(20 + 500) // 16)
    assert reqs[0].finish_reason == "abort" and not eng.abort(reqs[0].id)
    eng.step()  # the waiting request takes the freed slot
    assert reqs[2].slot is not None and len(eng.waiting) == 0
    for r in reqs[1:]:
        eng.abort(r.id)
    assert eng.states.slots.used == 0 and eng.kv.blocks.used == 0 and not eng.has_work()


def test_abort_waiting_request(tiny_model):
    eng = make_engine(tiny_model, max_batch=1)
    a = eng.add_request(random_prompt(5, 1), greedy(3))
    b = eng.add_request(random_prompt(5, 2), greedy(3))
    assert eng.abort(b.id) and list(eng.waiting) == [a]
    run_all(eng)
    assert len(a.output) == 3


def test_queue_limit(tiny_model):
    eng = make_engine(tiny_model, max_batch=1, max_queue=2)
    eng.add_request(random_prompt(5, 1), greedy(2))
    eng.add_request(random_prompt(5, 2), greedy(2))
    with pytest.raises(QueueFull):
        eng.add_request(random_prompt(5, 3), greedy(2))
    eng.step()  # one admitted: room in the queue again
    eng.add_request(random_prompt(5, 3), greedy(2))
    run_all(eng)


def test_budget_holds_under_flood(tiny_model):
    """KV room for two full requests at a time although four slots exist: the rest wait, every one completes."""
    probe = MemoryPlan.make(tiny_model.config, EngineConfig(max_batch=4, memory_budget=1 << 30, prefix_cache_bytes=0), tiny_model.dtype, 256)
    per_request = -(-(100 + 20) // 16)
    budget = 4 * probe.slot_bytes + (max(2 * per_request, 256 // 16) + 1) * probe.block_bytes  # + the scratch block
    eng = Engine(tiny_model, EngineConfig(max_batch=4, max_context=256, memory_budget=budget, prefix_cache_bytes=0,
                                          max_queue=100), eos_ids=set())
    assert eng.plan.total <= budget
    reqs = [eng.add_request(random_prompt(100, s), greedy(20)) for s in range(7)]
    peak_running = 0
    while eng.has_work():
        eng.step()
        peak_running = max(peak_running, len(eng.running))
        assert eng.kv.blocks.used <= eng.plan.kv_blocks
        assert eng.stats()["memory_in_use_bytes"] <= budget
    assert peak_running == 2
    assert all(len(r.output) == 20 and r.finish_reason == "length" for r in reqs)


def test_budget_too_small_is_refused_at_start(tiny_model):
    with pytest.raises(EngineConfigError, match="memory budget"):
        Engine(tiny_model, EngineConfig(max_batch=4, max_context=1024, memory_budget=1 << 20))


def test_requests_that_cannot_run_are_rejected(tiny_model):
    eng = make_engine(tiny_model, max_context=128)
    with pytest.raises(RequestRejected) as e:
        eng.add_request(random_prompt(100, 1), greedy(29))
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(RequestRejected, match="token ids"):
        eng.add_request([1, 2, 5000], greedy(2))
    with pytest.raises(RequestRejected, match="empty"):
        eng.add_request([], greedy(2))
    assert not eng.has_work()


def test_requests_compare_by_identity_and_prompts_are_not_gc_tracked(tiny_model):
    """Two requests with equal fields are still different requests (abort / finish remove the right one), and a
    request's prompt is an int64 array, whose tokens the garbage collector does not visit (a full collection over
    hundreds of 64k-token Python lists stalls a step by tens of milliseconds)."""
    import gc

    eng = make_engine(tiny_model, max_batch=2)
    p = random_prompt(20, 7)
    a, b = eng.add_request(p, greedy(3), "a"), eng.add_request(p, greedy(3), "b")
    assert a != b and list(a.prompt) == p
    assert len(gc.get_referents(a.prompt)) <= 1 < len(gc.get_referents(p))  # its type at most, not its 20 tokens
    eng.step()
    assert eng.abort("b") and eng.running == [a]
    run_all(eng)
    assert len(a.output) == 3
