"""Prefix-state cache: resume a prompt from a snapshot instead of prefilling it again.

A linear layer's whole past is one fixed-size state, so a prefix of a prompt is summarised by
(every linear layer's state after the prefix, the softmax layers' KV of the prefix). Snapshots are taken at
multiples of `block` tokens (the boundary a prefill chunk ends on anyway, so taking one costs a copy, no compute),
keyed by a chained hash of the token blocks before the boundary. The KV part is not copied: the snapshot holds a
reference on the request's KV blocks, which are full and never written again (block is a multiple of the KV block
size), and a request that hits shares them.

Memory: the linear snapshots live in a `SnapshotArena` preallocated at start from the prefix budget (its capacity
is the budget; least recently used snapshots go first when it is full); the shared KV blocks stay in the paged pool,
and `evict_for_blocks` gives them back when admission needs room.

A snapshot's arena slot is taken (`reserve` / `alloc_slot`) before the copy into it is queued, and handed to
`insert`, which keeps it under the key or frees it. Evicting a snapshot and reusing its slot at once is safe with
queued work in flight: every copy into or out of the arena (the runner's prompt snapshots, reply snapshots, a hit's
restore into a state slot) is queued on the one CUDA stream the engine uses, overlapped steps included, so a copy into
a reused slot runs after every copy out of it that was queued before the eviction.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .pools import BlockAllocator, SnapshotArena


@dataclass
class Snapshot:
    length: int  # tokens covered (a multiple of the cache block)
    slot: int  # its arena slot
    states: dict[int, torch.Tensor]  # linear layer -> [H, d, d] fp32: views of the arena slot
    kv_blocks: list[int]  # KV blocks covering positions 0..length-1 (a reference is held on each)
    nbytes: int  # the arena's slot size


DIGEST = 16  # bytes of one block hash


def block_hashes(tokens: list[int], block: int) -> list[bytes]:
    """hashes[i] identifies tokens[: (i+1)*block]; each hash chains the previous one."""
    chain = extend_chain(bytearray(), tokens, block, len(tokens) // block)
    return [bytes(chain[i:i + DIGEST]) for i in range(0, len(chain), DIGEST)]


def extend_chain(chain: bytearray, tokens, block: int, n_blocks: int) -> bytearray:
    """Grow `chain` (the block hashes of a prefix of `tokens`, DIGEST bytes each) to n_blocks hashes, in place: a
    request keeps its chain, so its prompt is hashed once however often it is looked up or snapshotted (a 128k prompt
    takes ~7 ms a pass; chunked into 2k steps, hashing each snapshot's prefix anew cost ~0.2 s of host time)."""
    prev = bytes(chain[-DIGEST:])
    for i in range(len(chain) // DIGEST, n_blocks):
        h = hashlib.blake2b(prev, digest_size=DIGEST)
        h.update(array("q", tokens[i * block:(i + 1) * block]).tobytes())
        prev = h.digest()
        chain += prev
    return chain


def _key(chain: bytearray, i: int) -> bytes:
    return bytes(chain[i * DIGEST:(i + 1) * DIGEST])


class PrefixCache:
    def __init__(self, block: int, arena: SnapshotArena, allocator: BlockAllocator):
        self.block = block
        self.arena = arena
        self.budget = arena.slots.n * arena.slot_bytes
        self.allocator = allocator
        self.entries: OrderedDict[bytes, Snapshot] = OrderedDict()  # LRU order: oldest first
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.tokens_saved = 0

    @property
    def enabled(self) -> bool:
        return self.arena.slots.n > 0

    def match(self, tokens: list[int], chain: bytearray | None = None) -> Snapshot | None:
        """Longest cached prefix that leaves at least one token to compute (its logits start the output). `chain`:
        the block hashes of these tokens known so far (extended in place; see extend_chain)."""
        if not self.enabled:
            return None
        self.lookups += 1
        n = (len(tokens) - 1) // self.block
        chain = extend_chain(bytearray() if chain is None else chain, tokens, self.block, n)
        for i in reversed(range(n)):
            h = _key(chain, i)
            snap = self.entries.get(h)
            if snap is not None:
                self.entries.move_to_end(h)
                self.hits += 1
                self.tokens_saved += snap.length
                return snap
        return None

    def reserve(self, tokens, length: int, chain: bytearray | None = None) -> int | None:
        """An arena slot for the snapshot of tokens[:length] (`alloc_slot`), or None if that prefix is cached already
        (refreshed instead: no copy, no eviction) or no slot can be had. `chain` as in match."""
        key = self._key_of(tokens, length, chain)
        if key is None:
            return None
        if key in self.entries:
            self.entries.move_to_end(key)
            return None
        return self.alloc_slot()

    def alloc_slot(self) -> int | None:
        """A free arena slot, evicting least recently used snapshots while none is free (safe with copies in flight:
        the module docstring says why). None when the cache is off, or every slot is taken by a snapshot not yet
        inserted. The caller owns the slot until it hands it to `insert` (or `arena.free`)."""
        if not self.enabled:
            return None
        while not self.arena.slots.free and self.entries:
            self._evict_oldest()
        return self.arena.alloc()

    def insert(self, tokens, length: int, slot: int, kv_blocks: list[int], chain: bytearray | None = None) -> bytes | None:
        """Store the snapshot of tokens[:length] (length a multiple of block) whose linear states were copied into
        arena `slot`; the cache takes the slot: kept under the returned key, or freed (None: that prefix is cached
        already). `chain` as in match; `tokens` needs only slicing."""
        key = self._key_of(tokens, length, chain)
        if key is None or key in self.entries:
            if key is not None:
                self.entries.move_to_end(key)
            self.arena.free(slot)
            return None
        self.allocator.incref(kv_blocks)
        self.entries[key] = Snapshot(length, slot, self.arena.views(slot), list(kv_blocks), self.arena.slot_bytes)
        self.bytes += self.arena.slot_bytes
        return key

    def _key_of(self, tokens, length: int, chain: bytearray | None) -> bytes | None:
        """The key of tokens[:length], None if no snapshot can be stored there (cache off, not a block multiple)."""
        if not self.enabled or length <= 0 or length % self.block:
            return None
        n = length // self.block
        return _key(extend_chain(bytearray() if chain is None else chain, tokens, self.block, n), n - 1)

    def discard(self, key: bytes | None) -> None:
        """Drop the snapshot stored under key, if it is still there."""
        snap = self.entries.pop(key, None) if key is not None else None
        if snap is not None:
            self.allocator.release(snap.kv_blocks)
            self.arena.free(snap.slot)
            self.bytes -= snap.nbytes

    def evict_for_blocks(self, need: int) -> None:
        """Drop least recently used snapshots until `need` KV blocks are free (or nothing is left to drop)."""
        while self.allocator.num_free < need and self.entries:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        self.discard(next(iter(self.entries)))

    def clear(self) -> None:
        while self.entries:
            self._evict_oldest()

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0
