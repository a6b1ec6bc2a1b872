"""The prefix cache's snapshot arena: snapshots live in memory preallocated at start (no tensor per snapshot), a full
arena gives up its least recently used snapshot's slot, and every slot a snapshot does not keep goes back."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from engine_helpers import greedy, make_engine, random_prompt, run_all

from ringlinear.engine import Engine, EngineConfig
from ringlinear.engine.pools import BlockAllocator, LinearStatePool, SnapshotArena
from ringlinear.engine.prefix_cache import PrefixCache


def _arena_engine(model, slots: int, **kw):
    """An engine whose prefix budget holds `slots` snapshots and a little more (not a whole slot)."""
    slot_bytes = LinearStatePool.bytes_per_slot(model.config)
    return make_engine(model, prefix_cache_bytes=slots * slot_bytes + slot_bytes // 2, **kw)


def _assert_slots_owned_by_entries(eng):
    """Between step() calls no snapshot is in flight: the arena slots taken are exactly those of cached snapshots."""
    arena = eng.prefix.arena
    taken = set(range(arena.slots.n)) - set(arena.slots.free)
    assert taken == {s.slot for s in eng.prefix.entries.values()}
    assert len(arena.slots.free) == len(set(arena.slots.free))  # no slot freed twice


def _assert_nothing_leaked(eng):
    """After every request finished and the cache is cleared, every arena slot, state slot and KV block is free."""
    assert not eng.has_work()
    eng.prefix.clear()
    assert eng.prefix.arena.slots.used == 0 and eng.prefix.bytes == 0
    assert eng.states.slots.used == 0 and eng.kv.blocks.used == 0


def _cold(model, prompt, n):
    cold = make_engine(model, prefix_cache_bytes=0)
    r = cold.add_request(prompt, greedy(n, logprobs=2))
    outs = run_all(cold)
    return r.output, torch.tensor([o.logprobs[0].logprob for o in outs])


def test_the_arena_is_the_prefix_budget_and_the_plan_is_unchanged(tiny_model):
    ec = EngineConfig(memory_budget=32 << 20, max_context=1024, prefix_cache_bytes=(5 << 20) + 123)
    eng = Engine(tiny_model, ec, eos_ids=set())
    plan, arena = eng.plan, eng.prefix.arena
    # the plan as before the arena: the whole prefix budget reserved, the KV cache sized from the rest
    assert plan.prefix_bytes == (5 << 20) + 123
    assert plan.kv_blocks == (ec.memory_budget - ec.max_batch * plan.slot_bytes - plan.prefix_bytes) // plan.block_bytes - 1
    assert plan.total == plan.slots * plan.slot_bytes + (plan.kv_blocks + 1) * plan.block_bytes + plan.prefix_bytes
    assert plan.total <= ec.memory_budget
    n = plan.prefix_bytes // plan.slot_bytes
    assert arena.slots.n == n and arena.slot_bytes == plan.slot_bytes
    assert sum(t.numel() * t.element_size() for t in arena.states.values()) == n * plan.slot_bytes == eng.prefix.budget
    assert eng.prefix.budget <= plan.prefix_bytes
    assert all(t.shape[0] == n and t.dtype == torch.float32 for t in arena.states.values())
    off = make_engine(tiny_model, prefix_cache_bytes=plan.slot_bytes - 1)  # not one snapshot's worth: no cache
    assert off.prefix.arena.slots.n == 0 and not off.prefix.enabled


def test_the_arena_is_allocated_untouched(tiny_model):
    """torch.empty: a large prefix budget costs the engines the tests build neither time nor resident memory."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    eng = make_engine(tiny_model, memory_budget=(1 << 30) + (16 << 20), prefix_cache_bytes=1 << 30)
    grown = rss() - before
    assert eng.prefix.budget > (1 << 30) - eng.plan.slot_bytes
    assert grown < 256 << 20, f"building the engine touched {grown >> 20} MiB"


@pytest.mark.parametrize("reply_snapshots", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
def test_snapshot_states_are_views_of_the_arena(tiny_model, overlap, reply_snapshots):
    eng = make_engine(tiny_model, max_batch=2, max_step_tokens=128, overlap=overlap, reply_snapshots=reply_snapshots)
    eng.add_request(random_prompt(200, 1), greedy(60))  # prompt snapshots at 128 and 192; a reply one at 256
    eng.add_request(random_prompt(100, 2), greedy(30))  # at 64; its reply's at 128
    run_all(eng)
    arena = eng.prefix.arena
    lengths = sorted(s.length for s in eng.prefix.entries.values())
    assert lengths == ([64, 128, 128, 192, 256] if reply_snapshots else [64, 128, 192])
    for snap in eng.prefix.entries.values():
        assert snap.nbytes == arena.slot_bytes
        for l, st in snap.states.items():
            base = arena.states[l]
            assert st.data_ptr() == base[snap.slot].data_ptr()  # the slot's own storage, not a copy of it
            assert st.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    _assert_slots_owned_by_entries(eng)
    _assert_nothing_leaked(eng)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_full_arena_evicts_the_least_recently_used_and_reuses_its_slot(tiny_model, overlap):
    """Three prompts of one snapshot each (at 64) in an arena of two: the third takes the slot of the least recently
    used; a hit on it (written into a reused slot) still gives the cold engine's tokens and logprobs."""
    a, b, c = (random_prompt(100, seed) for seed in (3, 4, 5))
    eng = _arena_engine(tiny_model, 2, overlap=overlap)
    assert eng.prefix.arena.slots.n == 2
    for p in (a, b):
        eng.add_request(p, greedy(2))
        run_all(eng)
    slot = {k: s.slot for k, s in eng.prefix.entries.items()}
    key_a, key_b = list(slot)
    hit_a = eng.add_request(a[:64] + random_prompt(10, 6), greedy(2))  # a hit refreshes a: b is now the oldest
    run_all(eng)
    assert hit_a.cached_tokens == 64 and list(eng.prefix.entries) == [key_b, key_a]
    eng.add_request(c, greedy(2))
    run_all(eng)
    assert list(eng.prefix.entries)[0] == key_a and key_b not in eng.prefix.entries
    key_c = list(eng.prefix.entries)[1]
    assert eng.prefix.entries[key_c].slot == slot[key_b]  # b's slot, reused
    assert len(eng.prefix.entries) == 2 and eng.prefix.bytes == eng.prefix.budget
    turn = c[:64] + random_prompt(30, 7)
    want_ids, want_lp = _cold(tiny_model, turn, 5)
    r = eng.add_request(turn, greedy(5, logprobs=2))
    outs = run_all(eng)
    assert r.cached_tokens == 64 and r.output == want_ids
    torch.testing.assert_close(torch.tensor([o.logprobs[0].logprob for o in outs]), want_lp, rtol=0, atol=1e-4)
    _assert_slots_owned_by_entries(eng)
    _assert_nothing_leaked(eng)


def test_refused_inserts_and_slots_in_flight():
    """Unit level: an insert under a cached key gives its slot back; a reservation for a cached prefix takes none;
    slots taken by snapshots not yet inserted cannot be evicted (no slot then)."""
    cfg = SimpleNamespace(linear_layers=[0, 2], num_attention_heads=2, d_head=4)
    arena = SnapshotArena(cfg, 2, torch.device("cpu"))
    alloc = BlockAllocator(8)
    cache = PrefixCache(64, arena, alloc)
    p, q, r = (random_prompt(65, s) for s in (1, 2, 3))
    s1, s2 = cache.reserve(p, 64), cache.reserve(p, 64)  # two requests snapshotting one prefix in the same step
    assert {s1, s2} == {0, 1} and cache.alloc_slot() is None  # both in flight: nothing to evict
    assert cache.insert(p, 64, s1, []) is not None
    assert cache.insert(p, 64, s2, []) is None and arena.slots.free == [s2]  # refused: its slot is back
    assert cache.reserve(p, 64) is None and arena.slots.free == [s2]  # cached: no slot, no eviction
    assert cache.insert(q, 64, cache.reserve(q, 64), alloc.alloc(2))
    assert cache.insert(r, 64, cache.reserve(r, 64), []) and cache.match(p) is None  # full: p (oldest) went
    assert sorted(s.slot for s in cache.entries.values()) == [0, 1] and arena.slots.free == []
    assert cache.insert(r, 32, cache.alloc_slot(), []) is None  # alloc_slot evicted q; not a block multiple: refused
    assert arena.slots.used == 1 and len(cache.entries) == 1  # that slot is back; r keeps its own
    cache.clear()
    assert arena.slots.used == 0 and alloc.num_free == 6  # the two blocks the test itself holds


@pytest.mark.parametrize("overlap", [False, True])
def test_concurrent_identical_prompts_give_the_refused_slot_back(tiny_model, overlap):
    """Two requests prefill the same prompt in one step: both take a slot for the snapshot at 64 before either is
    stored; the second insert is refused and its slot freed."""
    prompt = random_prompt(100, 8)
    eng = make_engine(tiny_model, max_batch=2, overlap=overlap)
    calls, insert = [], eng.prefix.insert

    def recorded(*args):
        calls.append(insert(*args))
        return calls[-1]

    eng.prefix.insert = recorded
    x, y = eng.add_request(prompt, greedy(3)), eng.add_request(prompt, greedy(3))
    run_all(eng)
    assert len(calls) == 2 and calls[0] is not None and calls[1] is None
    assert x.output == y.output and len(eng.prefix.entries) == 1
    _assert_slots_owned_by_entries(eng)
    _assert_nothing_leaked(eng)


def test_a_reply_snapshot_whose_tokens_are_not_all_known_gives_its_slot_back(tiny_model):
    eng = make_engine(tiny_model, reply_snapshots=True)
    req = eng.add_request(random_prompt(30, 9), greedy(4))
    run_all(eng)
    free = len(eng.prefix.arena.slots.free)
    slot, held = eng.prefix.alloc_slot(), eng.kv.blocks.alloc(2)  # as _generation_snapshots takes them
    eng._keep_generation_snapshots([(req, len(req.prompt) + len(req.output) + 1, slot, held)])  # a token unknown
    assert len(eng.prefix.arena.slots.free) == free and slot in eng.prefix.arena.slots.free
    _assert_nothing_leaked(eng)


def _load(model, **kw):
    """Six prompts sharing prefixes of one, two or three blocks, more than the three slots: (engine, requests)."""
    shared = random_prompt(130, 10)
    prompts = [shared[: 64 * (1 + i % 3)] + random_prompt(20 + 17 * i, 20 + i) for i in range(6)]
    stop = model.generate_greedy(prompts[2], 17)[0][16]  # prompts[2] stops on its 17th token (others may too)
    eng = make_engine(model, max_batch=3, max_step_tokens=128, eos_ids={stop}, **kw)
    return eng, [eng.add_request(p, greedy(24)) for p in prompts]


_LOAD_REFERENCE: list = []  # computed once, inside a test (the autouse one-thread fixture does not reach a module one)


def _load_reference(model) -> list[list[int]]:
    if not _LOAD_REFERENCE:
        eng, reqs = _load(model, prefix_cache_bytes=0)
        run_all(eng)
        _LOAD_REFERENCE.extend(r.output for r in reqs)
    return _LOAD_REFERENCE


@pytest.mark.parametrize("overlap", [False, True])
def test_a_small_arena_under_load_keeps_tokens_and_leaks_nothing(tiny_model, overlap):
    """Shared prefixes, reply snapshots, an abort, stops and an arena of three slots (so snapshots evict each other):
    every request gets the tokens of an engine without the cache, between steps every taken slot belongs to a cached
    snapshot, and at the end everything is free."""
    slot_bytes = LinearStatePool.bytes_per_slot(tiny_model.config)
    eng, reqs = _load(tiny_model, overlap=overlap, reply_snapshots=True, prefix_cache_bytes=3 * slot_bytes)
    assert eng.prefix.arena.slots.n == 3
    evicted, evict = [], eng.prefix._evict_oldest
    eng.prefix._evict_oldest = lambda: evicted.append(1) or evict()
    for step in range(10_000):
        if not eng.has_work():
            break
        eng.step()
        _assert_slots_owned_by_entries(eng)
        if step == 10:
            eng.abort(reqs[1].id)
    assert eng.prefix.hits >= 2 and len(evicted) >= 3
    assert reqs[1].finish_reason == "abort" and reqs[2].finish_reason == "stop"
    assert [r.output for i, r in enumerate(reqs) if i != 1] == [w for i, w in enumerate(_load_reference(tiny_model)) if i != 1]
    _assert_nothing_leaked(eng)
