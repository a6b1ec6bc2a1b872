"""The host side of a step's indices: KV cache rows of a position range, the queued host-to-device copy, and the
router weight split kept between steps."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from ringlinear.config import RingLinearConfig
from ringlinear.engine.pools import PagedKVCache
from ringlinear.kernels import moe
from ringlinear.ops.transfer import to_device


def _kv(tiny_ckpt, block_size):
    cfg = RingLinearConfig.from_file(tiny_ckpt / "config.json")
    return PagedKVCache(cfg, num_blocks=64, block_size=block_size, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_kv_rows_match_the_block_table(tiny_ckpt, block_size):
    kv = _kv(tiny_ckpt, block_size)
    rng = np.random.default_rng(0)
    table = [int(b) for b in rng.permutation(64)[:20]]
    n = len(table) * block_size
    for start, end in [(0, 1), (0, n), (3, 4), (n - 1, n), (5, 9), (block_size, n - 2), (7, 7 + 64 // block_size)]:
        start, end = min(start, n - 1), min(max(end, start + 1), n)
        want = [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        got = kv.rows(table, start, end)
        assert got.dtype == np.int64 and got.tolist() == want, (start, end)


def test_to_device_copies():
    t = torch.arange(10, dtype=torch.int64)
    out = to_device(t, "cpu")
    assert torch.equal(out, t)
    if torch.cuda.is_available():
        g = to_device(t, "cuda")
        assert g.device.type == "cuda" and torch.equal(g.cpu(), t)


def test_router_split_is_kept_until_the_weight_changes_or_dies():
    w = torch.randn(16, 32)
    a = moe._router_split(w)
    assert moe._router_split(w) is a  # kept
    hi, mid, lo = a
    assert torch.equal(hi.float() + mid.float() + lo.float(), w)
    w.mul_(2)  # changed in place: split again
    b = moe._router_split(w)
    assert b is not a and torch.equal(b[0].float() + b[1].float() + b[2].float(), w)
    key = id(w)
    del w, a, b, hi, mid, lo
    gc.collect()
    assert key not in moe._SPLITS  # dropped with its weight
