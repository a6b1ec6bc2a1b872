"""Preallocated device memory of the engine: linear-state slots, prefix snapshots and the paged KV cache of the
softmax layers.

All are allocated once, at start, from the memory plan; nothing in the serving loop allocates per request or per
snapshot.

    LinearStatePool   per linear layer a tensor [slots, H, d, d] fp32; a request owns one slot index for its life
    SnapshotArena     the same layout for the prefix cache's snapshots; a cached snapshot owns one arena slot
    PagedKVCache      per softmax layer K and V tensors [blocks * block_size, Hkv, d] in the model dtype; a request
                      owns a block table (list of block ids); token at position p lives at row
                      table[p // block_size] * block_size + p % block_size; one extra block past the allocator's
                      (`scratch_row`) takes the K/V writes of padding rows in graphed decode steps
    BlockAllocator    free list + reference counts, so the prefix cache can share full blocks with requests
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import RingLinearConfig


class OutOfBlocks(RuntimeError):
    pass


class SlotAllocator:
    def __init__(self, n: int):
        self.free = list(range(n - 1, -1, -1))
        self.n = n

    def alloc(self) -> int:
        if not self.free:
            raise OutOfBlocks("no free state slot")
        return self.free.pop()

    def release(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def used(self) -> int:
        return self.n - len(self.free)


class LinearStatePool:
    def __init__(self, cfg: RingLinearConfig, slots: int, device: torch.device):
        H, d = cfg.num_attention_heads, cfg.d_head
        self.states = {l: torch.zeros(slots, H, d, d, dtype=torch.float32, device=device) for l in cfg.linear_layers}
        self.slots = SlotAllocator(slots)

    @staticmethod
    def bytes_per_slot(cfg: RingLinearConfig) -> int:
        return len(cfg.linear_layers) * cfg.num_attention_heads * cfg.d_head * cfg.d_head * 4

    def alloc(self) -> int:
        slot = self.slots.alloc()
        for s in self.states.values():
            s[slot].zero_()
        return slot

    def release(self, slot: int) -> None:
        self.slots.release(slot)

    def restore(self, slot: int, snap: dict[int, torch.Tensor]) -> None:
        for l, s in self.states.items():
            s[slot].copy_(snap[l])


class SnapshotArena:
    """The prefix cache's linear snapshots: per linear layer a tensor [n, H, d, d] fp32, allocated once at start.

    A snapshot owns one slot index; its states are views of that slot (`views`), written by copies queued on the
    engine's stream (the runner's prompt snapshots, `copy_from` for reply snapshots) and read by
    `LinearStatePool.restore`. Fresh tensors per snapshot (16 x 1 MiB for Ring-mini) would come from torch's caching
    allocator, whose new segments are cudaMallocs that serialise with the queued steps."""

    def __init__(self, cfg: RingLinearConfig, n: int, device: torch.device):
        H, d = cfg.num_attention_heads, cfg.d_head
        # empty, not zeros: a slot is written before it is read, and untouched memory costs nothing (CPU tests build
        # many engines with the default 1 GiB budget, a quarter of it for the arena)
        self.states = {l: torch.empty(n, H, d, d, dtype=torch.float32, device=device) for l in cfg.linear_layers}
        self.slots = SlotAllocator(n)
        self.slot_bytes = LinearStatePool.bytes_per_slot(cfg)

    def alloc(self) -> int | None:
        """A free slot, or None when every slot is taken."""
        return self.slots.alloc() if self.slots.free else None

    def free(self, slot: int) -> None:
        self.slots.release(slot)

    def views(self, slot: int) -> dict[int, torch.Tensor]:
        return {l: s[slot] for l, s in self.states.items()}

    def copy_from(self, slot: int, pool: LinearStatePool, src: int) -> None:
        """Queue the copy of state slot `src` of the pool into arena slot `slot`."""
        for l, s in self.states.items():
            s[slot].copy_(pool.states[l][src])


class BlockAllocator:
    def __init__(self, n: int):
        self.free = list(range(n - 1, -1, -1))
        self.refs = [0] * n
        self.n = n

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def used(self) -> int:
        return self.n - len(self.free)

    def alloc(self, count: int) -> list[int]:
        if count > len(self.free):
            raise OutOfBlocks(f"need {count} KV blocks, {len(self.free)} free")
        out = [self.free.pop() for _ in range(count)]
        for b in out:
            self.refs[b] = 1
        return out

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        refs, free = self.refs, self.free  # locals: a 64k-token request frees 4096 blocks
        for b in blocks:
            r = refs[b] - 1
            refs[b] = r
            if not r:
                free.append(b)


class PagedKVCache:
    def __init__(self, cfg: RingLinearConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        Hkv, d = cfg.num_key_value_heads, cfg.d_head
        rows = (num_blocks + 1) * block_size  # + the scratch block, never handed out
        self.scratch_row = num_blocks * block_size
        self.k = {l: torch.zeros(rows, Hkv, d, dtype=dtype, device=device) for l in cfg.softmax_layers}
        self.v = {l: torch.zeros(rows, Hkv, d, dtype=dtype, device=device) for l in cfg.softmax_layers}
        self.block_size = block_size
        self.blocks = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(cfg: RingLinearConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * len(cfg.softmax_layers) * block_size * cfg.num_key_value_heads * cfg.d_head * itemsize

    def rows(self, table: list[int], start: int, end: int) -> np.ndarray:
        """Cache rows of positions start..end-1 of a request with block table `table`: int64 [end-start] on the
        host (a step gathers every segment's rows and copies them to the device once)."""
        bs = self.block_size
        if end - start <= 4:  # decode tokens: plain arithmetic beats setting up arrays
            return np.array([table[p // bs] * bs + p % bs for p in range(start, end)], dtype=np.int64)
        first = start // bs
        tab = np.asarray(table[first:-(-end // bs)], dtype=np.int64)
        pos = np.arange(start, end, dtype=np.int64)
        return tab[pos // bs - first] * bs + pos % bs
