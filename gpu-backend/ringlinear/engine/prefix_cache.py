"""Prefix-state cache: resume a prompt from a snapshot instead of prefilling it again.

A linear layer's whole past is one fixed-size state, so a prefix of a prompt is summarised by
(every linear layer's state after the prefix, the softmax layers' KV of the prefix). Snapshots are taken at
multiples of `block` tokens (the boundary a prefill chunk ends on anyway, so taking one costs a copy, no compute),
keyed by a chained hash of the token blocks before the boundary. The KV part is not copied: the snapshot holds a
reference on the request's KV blocks, which are full and never written again (block is a multiple of the KV block
size), and a request that hits shares them.

Memory: the linear snapshots are extra device memory, bounded by `budget_bytes` (least recently used go first);
the shared KV blocks stay in the paged pool, and `evict_for_blocks` gives them back when admission needs room.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .pools import BlockAllocator


@dataclass
class Snapshot:
    length: int  # tokens covered (a multiple of the cache block)
    states: dict[int, torch.Tensor]  # linear layer -> [H, d, d] fp32
    kv_blocks: list[int]  # KV blocks covering positions 0..length-1 (a reference is held on each)
    nbytes: int


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
    def __init__(self, block: int, budget_bytes: int, allocator: BlockAllocator):
        self.block = block
        self.budget = budget_bytes
        self.allocator = allocator
        self.entries: OrderedDict[bytes, Snapshot] = OrderedDict()  # LRU order: oldest first
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.tokens_saved = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

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

    def insert(self, tokens: list[int], length: int, states: dict[int, torch.Tensor], kv_blocks: list[int],
               chain: bytearray | None = None) -> bytes | None:
        """Store the snapshot of tokens[:length] (length a multiple of block). Returns its key if it was stored (None if
        not: no room, or that prefix is cached already). `chain` as in match; `tokens` needs only slicing."""
        if not self.enabled or length <= 0 or length % self.block:
            return None
        n = length // self.block
        key = _key(extend_chain(bytearray() if chain is None else chain, tokens, self.block, n), n - 1)
        if key in self.entries:
            self.entries.move_to_end(key)
            return None
        nbytes = sum(s.numel() * s.element_size() for s in states.values())
        if nbytes > self.budget:
            return None
        while self.bytes + nbytes > self.budget:
            self._evict_oldest()
        self.allocator.incref(kv_blocks)
        self.entries[key] = Snapshot(length, states, list(kv_blocks), nbytes)
        self.bytes += nbytes
        return key

    def discard(self, key: bytes | None) -> None:
        """Drop the snapshot stored under key, if it is still there."""
        snap = self.entries.pop(key, None) if key is not None else None
        if snap is not None:
            self.allocator.release(snap.kv_blocks)
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
