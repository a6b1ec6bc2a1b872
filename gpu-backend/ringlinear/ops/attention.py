"""Causal attention of a prompt chunk over its request's whole prefix: queries at positions start..end-1, keys at
0..end-1 (the mask is aligned to the lower right). This is what every prompt chunk after the first computes in a
softmax layer when a long prompt is prefilled over several engine steps.

    chunk_attention_reference   repeat the KV heads, one SDPA call with the lower-right causal mask (the twin)
    chunk_attention             two unmasked/square-causal calls that cuDNN runs natively (no mask tensor, KV heads
                                read in place), merged through their log-sum-exps:
                                    keys 0..start-1    every query sees every key      -> o_p, lse_p
                                    keys start..end-1  square causal (upper left = lower right)  -> o_c, lse_c
                                    o = (e^lse_p o_p + e^lse_c o_c) / (e^lse_p + e^lse_c)
                                torch's lower-right mask would take the flash backend instead (FlashAttention-2, no
                                Hopper instructions), and the repeat costs rep x the prefix's K/V in copies per layer.

q: [1, H, n, d]; k, v: [1, Hkv, end, d] with end >= n; H a multiple of Hkv. Returns [1, H, n, d] in q's dtype.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import accum_dtype


def cudnn_without_recompiles() -> None:
    """Ask torch's cuDNN attention to run new sequence lengths through one ragged graph instead of building a graph
    per (queries, keys) shape: a build costs ~100 ms (H200), and a chunked prompt meets a new prefix length at every
    chunk. Opt-in and read once by torch (TORCH_CUDNN_SDPA_AVOID_RECOMPILE, torch >= 2.9); it applies to BSHD tensors,
    which is how the runner's q, k and v are laid out. Measured in docs/benchmarks.md (long prompts)."""
    os.environ.setdefault("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")


def chunk_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    n, end = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if n == end:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, end), scale=scale)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T scale) v, logsumexp of each query's scores [1, H, n, 1], fp32 or fp64); causal = square, upper
    left.

    CUDA: cuDNN's fused attention, which returns the log-sum-exp it already computes and reads the Hkv heads in place.
    Elsewhere: plain math in fp32 (fp64 for fp64 inputs): the oracle of the merge."""
    if q.is_cuda:  # the Hkv heads in place, as SDPA's own enable_gqa dispatch hands them to this op
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                      scale=scale)[:2]
        return out, lse.reshape(*q.shape[:3], 1).float()
    rep, acc = q.shape[1] // k.shape[1], accum_dtype(q.dtype)
    kf = k.to(acc).repeat_interleave(rep, 1)
    vf = v.to(acc).repeat_interleave(rep, 1)
    s = (q.to(acc) @ kf.transpose(-1, -2)) * scale
    if causal:
        n = q.shape[2]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    return (torch.exp(s - lse) @ vf).to(q.dtype), lse


def merge_attention(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """Attention over the union of two disjoint key sets, from each set's output and log-sum-exp (computed in fp32,
    fp64 for fp64 outputs; one rounding to `dtype`)."""
    acc = accum_dtype(dtype)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    return ((o_a.to(acc) * wa + o_b.to(acc) * wb) / (wa + wb)).to(dtype)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    n, end = q.shape[2], k.shape[2]
    start = end - n
    if start == 0:  # cuDNN reads the Hkv heads in place: bit-identical to repeating them, without the copies
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    o_p, lse_p = attention_with_lse(q, k[:, :, :start], v[:, :, :start], scale, causal=False)
    o_c, lse_c = attention_with_lse(q, k[:, :, start:], v[:, :, start:], scale, causal=True)
    return merge_attention(o_p, lse_p, o_c, lse_c, q.dtype)
