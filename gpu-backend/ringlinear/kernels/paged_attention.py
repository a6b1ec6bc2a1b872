"""Paged-KV GQA decode attention: the CUDA kernel (csrc/paged_attention.cu) beside its twin
(paged_attention_reference.py). Reads the pod's paged KV cache in place through block tables; on a machine without
CUDA (or when the extension cannot be built) the wrapper runs the twin.

The wrapper never reads ``lengths`` or ``block_tables`` on the host: the split plan depends only on shapes and the
host bound ``max_len``, so one CUDA graph serves every step whose tables and lengths fit those shapes.
"""

from __future__ import annotations

import math

import torch

from . import _build
from .paged_attention_reference import paged_decode_attention_reference

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_REPS = (1, 2, 4, 8, 16)  # query heads per KV head the kernel is instantiated for
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# Split plan: enough (split, KV head, request) CTAs for CTAS_PER_SM resident 128-thread CTAs per SM (bytes in flight
# for a memory-bound stream), but never splits shorter than MIN_SPLIT_KEYS keys (each split costs a partial write and
# a share of the combine pass).
CTAS_PER_SM = 4
MIN_SPLIT_KEYS = 128
# A partial last wave idles SMs for a whole CTA's time (B=198 at 64k: 792 CTAs = 1.5 waves of 528 measured 67 ms per
# decode step vs 40 ms at B=128): splits are added until the waves are at least this full.
WAVE_FILL = 0.9

_sm_counts: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _sm_counts.get(idx)
    if n is None:
        n = _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def plan_splits(max_len: int, batch: int, kv_heads: int, block_size: int, num_sms: int) -> tuple[int, int]:
    """(keys per split, number of splits): splits are whole cache blocks and together cover max_len keys."""
    max_len = max(1, int(max_len))
    conc = num_sms * CTAS_PER_SM
    want = -(-conc // max(1, batch * kv_heads))
    most = max(1, -(-max_len // MIN_SPLIT_KEYS))
    splits = max(1, min(want, most))
    while splits < most:
        total = batch * kv_heads * splits
        if total / (-(-total // conc) * conc) >= WAVE_FILL:
            break
        splits += 1
    split_len = -(-max_len // splits)
    split_len = -(-split_len // block_size) * block_size
    return split_len, -(-max_len // split_len)


def _check(q, k_cache, v_cache, block_tables, lengths, block_size, scale, max_len, out):
    name = "paged_decode_attention"
    if not torch.is_tensor(q) or q.dim() != 3:
        raise ValueError(f"{name}: q must be a [B, H, d] tensor, got {getattr(q, 'shape', type(q))}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: q dtype must be bfloat16, float16 or float32, got {q.dtype}")
    if q.stride(-1) != 1:
        raise ValueError(f"{name}: q's last dim must be contiguous")
    B, H, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: q head dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    for n, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not torch.is_tensor(t) or t.dim() != 3:
            raise ValueError(f"{name}: {n} must be a [rows, Hkv, d] tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: {n} dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: {n} is on {t.device}, q on {q.device}")
        if not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"{name}: {n} must be contiguous and 16-byte aligned")
        if t.shape[2] != d:
            raise ValueError(f"{name}: {n} head dim {t.shape[2]} differs from q's {d}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} shapes differ")
    rows, Hkv = k_cache.shape[0], k_cache.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{name}: q heads ({H}) must be a multiple of k_cache KV heads ({Hkv})")
    if H // Hkv not in SUPPORTED_REPS:
        raise ValueError(f"{name}: q heads per KV head must be one of {SUPPORTED_REPS}, got {H // Hkv}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")
    if rows % block_size:
        raise ValueError(f"{name}: block_size {block_size} does not divide the cache rows ({rows})")
    if not torch.is_tensor(block_tables) or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"{name}: block_tables must be [{B}, max_blocks], got {getattr(block_tables, 'shape', None)}")
    if block_tables.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name}: block_tables dtype must be int32 or int64, got {block_tables.dtype}")
    if block_tables.device != q.device:
        raise ValueError(f"{name}: block_tables is on {block_tables.device}, q on {q.device}")
    if not torch.is_tensor(lengths) or lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"{name}: lengths must be a [{B}] tensor, got {getattr(lengths, 'shape', type(lengths))}")
    if lengths.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name}: lengths dtype must be int32 or int64, got {lengths.dtype}")
    if lengths.device != q.device:
        raise ValueError(f"{name}: lengths is on {lengths.device}, q on {q.device}")
    capacity = block_tables.shape[1] * block_size
    if max_len is None:
        max_len = capacity
    elif isinstance(max_len, bool) or not isinstance(max_len, int) or not 0 <= max_len <= capacity:
        raise ValueError(f"{name}: max_len must be an int in [0, {capacity}] (the block tables' capacity), "
                         f"got {max_len!r}")
    if scale is None:
        scale = d**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be a finite number, got {scale!r}")
    if out is not None:
        if not torch.is_tensor(out) or tuple(out.shape) != (B, H, d) or out.dtype != q.dtype:
            raise ValueError(f"{name}: out must be a {q.dtype} tensor of shape [{B}, {H}, {d}]")
        if out.device != q.device or not out.is_contiguous():
            raise ValueError(f"{name}: out must be contiguous and on {q.device}")
    return float(scale), max_len


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    *,
    max_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token per request against its paged KV.

    q [B, H, d] (bf16/fp16/fp32, last dim contiguous); k_cache / v_cache [rows, Hkv, d] in q's dtype, contiguous;
    query head h uses KV head h // (H / Hkv); d in {64, 128}; H / Hkv in {1, 2, 4, 8, 16}. block_tables [B, max_blocks]
    and lengths [B] (int32/int64, on q's device): request b attends to positions 0..len_b-1, position p at cache row
    block_tables[b, p // block_size] * block_size + p % block_size. len_b <= 0 is a padding row (output zeros);
    lengths above max_len are clamped to it; table entries past a row's used blocks are never read. A used entry
    outside the cache gives NaN for that row on the GPU (the twin raises). scale defaults to d**-0.5; softmax and
    accumulation in fp32. max_len (host int, default max_blocks * block_size) sizes the key splits. Returns [B, H, d]
    in q's dtype, written into ``out`` when given. No host synchronisation: capturable in a CUDA graph.
    """
    scale, max_len = _check(q, k_cache, v_cache, block_tables, lengths, block_size, scale, max_len, out)
    B, H, d = q.shape
    if not (q.is_cuda and _build.available()):
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, lengths, block_size, scale,
                                                max_len=max_len, out=out)
    if out is None:
        out = torch.empty(B, H, d, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    vec = 16 // q.element_size()  # the kernel loads q in 16-byte (or narrower) slices of consecutive dims
    if q.stride(0) % vec or q.stride(1) % vec or q.data_ptr() % 16:
        q = q.clone(memory_format=torch.contiguous_format)
    Hkv = k_cache.shape[1]
    split_len, splits = plan_splits(max_len, B, Hkv, block_size, _num_sms(q.device))
    ws_n = B * H * splits if splits > 1 else 0
    ws_acc = torch.empty(ws_n * d, dtype=torch.float32, device=q.device)
    ws_ml = torch.empty(ws_n * 2, dtype=torch.float32, device=q.device)
    _build.extension().paged_decode_attention(q, k_cache, v_cache, block_tables, lengths, block_size, scale, max_len,
                                              split_len, splits, out, ws_acc, ws_ml)
    return out


__all__ = [
    "paged_decode_attention",
    "plan_splits",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_REPS",
]
