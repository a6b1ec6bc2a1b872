"""Plain PyTorch twin of the paged-KV GQA decode attention kernel (csrc/paged_attention.cu).

Per request: gather its ``len`` keys through the block table, then an fp32 (fp64 for fp64 inputs) softmax attention of
each query head against its KV head (query head h uses KV head h // rep). Kept simple on purpose: it is the oracle.
"""

from __future__ import annotations

import torch


def paged_decode_attention_reference(
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
    """q [B, H, d]; k_cache / v_cache [rows, Hkv, d]; block_tables [B, max_blocks]; lengths [B] (<= 0: padding row,
    output zeros). Lengths are clamped to max_len (default: the table's capacity). Returns [B, H, d] in q's dtype
    (written into ``out`` when given). Reads lengths on the host: not for CUDA graphs."""
    B, H, d = q.shape
    Hkv = k_cache.shape[1]
    rep = H // Hkv
    if scale is None:
        scale = d**-0.5
    cap = block_tables.shape[1] * block_size
    if max_len is not None:
        cap = min(cap, max_len)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.zeros(B, H, d, dtype=acc, device=q.device)
    for b, n in enumerate(lengths.tolist()):
        n = min(max(int(n), 0), cap)
        if n == 0:
            continue
        pos = torch.arange(n, device=block_tables.device)
        rows = (block_tables[b, pos // block_size].to(torch.int64) * block_size + pos % block_size).to(k_cache.device)
        K = k_cache[rows].to(acc).transpose(0, 1)  # [Hkv, n, d]
        V = v_cache[rows].to(acc).transpose(0, 1)
        qg = q[b].to(acc).view(Hkv, rep, d)
        p = torch.softmax((qg @ K.transpose(1, 2)) * scale, dim=-1)  # [Hkv, rep, n]
        o[b] = (p @ V).reshape(H, d)
    o = o.to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def paged_kv_bytes(lengths: list[int], num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """K + V bytes a decode step must read: every valid key of every request, once per KV head."""
    return 2 * sum(max(0, n) for n in lengths) * num_kv_heads * head_dim * itemsize


__all__ = ["paged_decode_attention_reference", "paged_kv_bytes"]
