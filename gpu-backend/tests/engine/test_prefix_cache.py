"""Prefix-state cache: a hit skips that prefill (counted), changes no token, and stays within its budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine_helpers import greedy, make_engine, random_prompt, run_all

from ringlinear.engine import prefix_cache
from ringlinear.engine.prefix_cache import PrefixCache, block_hashes, extend_chain
from ringlinear.engine.pools import BlockAllocator, SnapshotArena


def _logprobs(outs, rid):
    return torch.tensor([o.logprobs[0].logprob for o in outs if o.request_id == rid])


def test_prefix_hit_skips_prefill_and_changes_no_token(tiny_model):
    shared = random_prompt(200, 5)
    first = shared + random_prompt(10, 6)
    second = shared[:192] + random_prompt(40, 7)  # shares 3 prefix blocks (192 tokens) with the first

    cold = make_engine(tiny_model, prefix_cache_bytes=0)
    want = cold.add_request(second, greedy(6, logprobs=2))
    want_lp = _logprobs(run_all(cold), want.id)

    eng = make_engine(tiny_model, max_step_tokens=128)
    eng.add_request(first, greedy(3))
    run_all(eng)
    assert eng.prefix.hits == 0 and len(eng.prefix.entries) >= 1
    computed_before = eng.prefill_tokens_computed
    r = eng.add_request(second, greedy(6, logprobs=2))
    outs = run_all(eng)
    assert eng.prefix.hits == 1
    assert r.cached_tokens == 192
    assert eng.prefill_tokens_computed - computed_before == len(second) - 192
    assert eng.stats()["prefix_cache_tokens_saved"] == 192
    assert [o.cached_tokens for o in outs if o.finished] == [192]
    assert r.output == want.output == tiny_model.generate_greedy(second, 6)[0]
    torch.testing.assert_close(_logprobs(outs, r.id), want_lp, rtol=0, atol=1e-4)


def test_identical_prompt_hits_but_recomputes_last_token(tiny_model):
    prompt = random_prompt(128, 8)  # exactly two blocks: the hit can only cover the first (one token must remain)
    eng = make_engine(tiny_model)
    a = eng.add_request(prompt, greedy(4))
    run_all(eng)
    b = eng.add_request(prompt, greedy(4))
    run_all(eng)
    assert b.cached_tokens == 64 and a.output == b.output


def test_different_first_block_misses():
    """Keys chain the whole prefix: the same second block after a different first block is another key."""
    x, y, z = random_prompt(64, 1), random_prompt(64, 2), random_prompt(64, 3)
    assert block_hashes(x + z, 64)[1] != block_hashes(y + z, 64)[1]
    assert block_hashes(x + z, 64)[0] == block_hashes(x + y, 64)[0]


def test_a_chain_grown_in_pieces_is_the_chain_of_the_whole():
    tokens = random_prompt(64 * 5 + 7, 4)
    chain = bytearray()
    for n in (0, 2, 2, 3, 5):
        extend_chain(chain, tokens, 64, n)
    assert bytes(chain) == b"".join(block_hashes(tokens, 64)) and len(chain) == 5 * prefix_cache.DIGEST


def test_a_waiting_request_is_hashed_and_counted_once(tiny_model, monkeypatch):
    """A request that waits for KV room is looked up again every step: its prompt's block hashes are kept on the
    request (not recomputed per lookup or per snapshot), and the hit-rate metric counts it once."""
    calls = []
    real = prefix_cache.hashlib.blake2b
    monkeypatch.setattr(prefix_cache.hashlib, "blake2b", lambda *a, **k: calls.append(1) or real(*a, **k))
    eng = _tight_engine(tiny_model)  # KV room for one 512-token context and 2 blocks more
    first = eng.add_request(random_prompt(300, 40), greedy(40))
    eng.step()
    waiting = eng.add_request(random_prompt(450, 41), greedy(2))  # needs more blocks than are free: waits
    for _ in range(5):
        eng.step()
    assert waiting in eng.waiting and eng.prefix.lookups == 1  # counted when it is admitted
    run_all(eng)
    assert len(first.output) == 40 and len(waiting.output) == 2
    assert eng.prefix.lookups == 2  # one per request, however often the waiting one was tried
    # each 64-token block of each prompt hashed once: 4 blocks of 300 tokens, 7 of 450; and the first request's reply
    # snapshot at 320 (prompt + output) one more
    assert len(calls) == 300 // 64 + 450 // 64 + 1


def _arena(n: int) -> SnapshotArena:
    """An arena of n slots of one [2, 4, 4] fp32 state (128 bytes a snapshot)."""
    return SnapshotArena(SimpleNamespace(linear_layers=[0], num_attention_heads=2, d_head=4), n, torch.device("cpu"))


def test_lru_budget_and_block_references():
    alloc = BlockAllocator(16)
    cache = PrefixCache(block=64, arena=_arena(2), allocator=alloc)
    assert cache.budget == 2 * 128
    prompts = [random_prompt(65, s) for s in range(3)]
    blocks = [alloc.alloc(4) for _ in range(3)]
    for p, b in zip(prompts[:2], blocks[:2]):
        assert cache.insert(p, 64, cache.reserve(p, 64), b)
    assert cache.match(prompts[0]) is not None  # refreshes prompts[0]: prompts[1] is now the oldest
    assert cache.insert(prompts[2], 64, cache.reserve(prompts[2], 64), blocks[2])
    assert cache.bytes <= 256 and len(cache.entries) == 2
    assert cache.match(prompts[1]) is None and cache.match(prompts[0]) is not None
    # the evicted snapshot dropped its block references; the requests' own references remain
    assert all(alloc.refs[b] == 1 for b in blocks[1]) and all(alloc.refs[b] == 2 for b in blocks[0])
    for b in blocks:
        alloc.release(b)
    cache.clear()
    assert alloc.num_free == 16 and cache.bytes == 0
    assert cache.hits == 2 and cache.lookups == 3


def test_admission_evicts_snapshots_for_kv_room(tiny_model):
    """Snapshots pin KV blocks; when an admission needs them, least recently used snapshots go."""
    eng = _tight_engine(tiny_model)  # KV room for one 512-token context and 2 blocks more
    old = random_prompt(300, 20)
    eng.add_request(old, greedy(2))
    run_all(eng)
    assert len(eng.prefix.entries) == 1 and eng.kv.blocks.used == 256 // 16  # the snapshot at 256 pins 16 blocks
    big = eng.add_request(random_prompt(500, 30), greedy(4))  # needs 32 blocks, only 18 are free
    run_all(eng)
    assert len(big.output) == 4 and big.finish_reason == "length"
    assert eng.prefix.match(old + [1]) is None  # evicted to make room
    assert eng.kv.blocks.used <= eng.plan.kv_blocks


def _tight_engine(model):
    from ringlinear.engine import Engine, EngineConfig, MemoryPlan

    probe = MemoryPlan.make(model.config, EngineConfig(max_batch=2, memory_budget=1 << 30, prefix_cache_bytes=0), model.dtype, 512)
    budget = 2 * probe.slot_bytes + (512 // 16 + 2) * probe.block_bytes + 4 * probe.slot_bytes
    return Engine(model, EngineConfig(max_batch=2, max_context=512, memory_budget=budget, prefix_cache_bytes=4 * probe.slot_bytes),
                  eos_ids=set())


@pytest.mark.parametrize("overlap", [False, True])
def test_a_reply_is_a_cached_prefix_of_the_next_turn(tiny_model, overlap):
    """While a request generates, its states are snapshotted at each prefix-block boundary (only the latest kept), so
    the next turn - prompt + reply + a new message - resumes after the reply instead of prefilling it again, with the
    tokens and logprobs it gets without the cache."""
    prompt = random_prompt(100, 8)
    eng = make_engine(tiny_model, max_step_tokens=128, overlap=overlap, reply_snapshots=True)
    first = eng.add_request(prompt, greedy(93))  # its last decode (position 191) reaches the boundary at 192
    run_all(eng)
    assert sorted(s.length for s in eng.prefix.entries.values()) == [64, 192]  # prompt's; the reply's latest
    off = make_engine(tiny_model, max_step_tokens=128, overlap=overlap, reply_snapshots=False)  # prompts' only
    off.add_request(prompt, greedy(93))
    run_all(off)
    assert [s.length for s in off.prefix.entries.values()] == [64]
    turn2 = prompt + first.output + random_prompt(20, 9)
    cold = make_engine(tiny_model, prefix_cache_bytes=0)
    want = cold.add_request(turn2, greedy(6, logprobs=2))
    want_lp = _logprobs(run_all(cold), want.id)
    computed = eng.prefill_tokens_computed
    r = eng.add_request(turn2, greedy(6, logprobs=2))
    outs = run_all(eng)
    assert r.cached_tokens == 192 and eng.prefill_tokens_computed - computed == len(turn2) - 192
    assert r.output == want.output
    torch.testing.assert_close(_logprobs(outs, r.id), want_lp, rtol=0, atol=1e-4)
    eng.prefix.clear()
    assert eng.kv.blocks.used == 0  # every reference the snapshots took was given back
    assert eng.prefix.arena.slots.used == 0  # and every arena slot


@pytest.mark.parametrize("overlap", [False, True])
def test_generation_snapshots_of_stopped_and_aborted_requests(tiny_model, overlap):
    prompt = random_prompt(100, 10)
    ids = tiny_model.generate_greedy(prompt, 40)[0]
    eng = make_engine(tiny_model, max_batch=2, eos_ids={ids[27]}, overlap=overlap, reply_snapshots=True)  # stops on
    # its 28th token
    stopped = eng.add_request(prompt, greedy(40))
    gone = eng.add_request(random_prompt(120, 11), greedy(60))
    while len(gone.output) < 20:  # past its boundary at 128
        eng.step()
    eng.abort(gone.id)
    run_all(eng)
    assert stopped.finish_reason == "stop" and stopped.output == ids[:28]
    lengths = sorted(s.length for s in eng.prefix.entries.values())
    # the prompts' snapshots at 64 and the aborted reply's at 128; the stopped reply's stop token sits at position 127,
    # which only the overlapped engine feeds (its one extra step): that snapshot ends with the stop token, all known
    assert lengths == [64, 64, 128] + ([128] if overlap else [])
    eng.prefix.clear()
    assert eng.kv.blocks.used == 0 and eng.states.slots.used == 0 and eng.prefix.arena.slots.used == 0


def _softmax_twin(tiny_model):
    """The tiny config with every layer softmax (layer_group_size 1: the benchmarks' twin), random fp32 weights."""
    import dataclasses

    from ringlinear.engine.weights import random_model

    cfg = dataclasses.replace(tiny_model.config, layer_group_size=1)
    assert cfg.linear_layers == [] and cfg.softmax_layers
    return random_model(cfg, "cpu", torch.float32, seed=3)


def test_a_model_without_linear_layers_serves_and_caches_kv_prefixes(tiny_model):
    """No linear layers: no state slots, snapshots of KV blocks alone (an empty arena slot each) - the engine used to
    divide the prefix budget by a zero slot size. The prefix budget is not reserved (it would hold nothing), the cache
    stays on unless turned off, and a hit changes no token."""
    twin = _softmax_twin(tiny_model)
    shared = random_prompt(200, 11)
    first, second = shared + random_prompt(10, 12), shared[:192] + random_prompt(30, 13)

    off = make_engine(twin, prefix_cache_bytes=0)
    assert not off.prefix.enabled and off.plan.prefix_bytes == 0 and off.plan.slot_bytes == 0
    want = off.add_request(second, greedy(5))
    run_all(off)

    eng = make_engine(twin, max_step_tokens=128)
    assert eng.prefix.enabled and eng.plan.prefix_bytes == 0
    assert eng.plan.kv_blocks == (32 << 20) // eng.plan.block_bytes - 1  # the whole budget is KV (- the scratch block)
    eng.add_request(first, greedy(3))
    run_all(eng)
    r = eng.add_request(second, greedy(5))
    run_all(eng)
    assert eng.prefix.hits == 1 and r.cached_tokens == 192
    assert r.output == want.output == twin.generate_greedy(second, 5)[0]
