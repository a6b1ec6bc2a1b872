"""Causal attention of a prompt chunk over its request's whole prefix: queries at positions start..end-1, keys at
0..end-1 (the mask is aligned to the lower right). This is what every prompt chunk after the first computes in a
softmax layer when a long prompt is prefilled over several engine steps.

    chunk_attention_reference   repeat the KV heads, one SDPA call with the lower-right causal mask (the twin)
    chunk_attention             the KV heads read in place; on CUDA, where neither part below is worth cuDNN, one
                                FlashAttention-2 call (its causal flag is lower-right aligned; it needs no plan);
                                else two calls merged through their log-sum-exps, each on cuDNN where `on_cudnn`:
                                    keys 0..start-1    every query sees every key      -> o_p, lse_p
                                    keys start..end-1  square causal (upper left = lower right)  -> o_c, lse_c
                                    o = (e^lse_p o_p + e^lse_c o_c) / (e^lse_p + e^lse_c)
    cudnn_plan_shapes           the (queries, prefix) shapes whose cuDNN plans a server builds before serving

q: [1, H, n, d]; k, v: [1, Hkv, end, d] with end >= n; H a multiple of Hkv. Returns [1, H, n, d] in q's dtype.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import accum_dtype

# Which attention calls go to cuDNN rather than FlashAttention-2, from the H200 (docs/benchmarks.md, long prompts;
# Ring-mini layer, H 16, d 128). cuDNN's ragged path runs 550-565 TFLOP/s on large calls but costs ~0.2 ms a call
# beyond its work, and few queries use it poorly; FA-2 runs 250-340 TFLOP/s with no fixed cost. Measured, per layer:
# FA-2 takes 512 queries over 127k keys (1.71 ms vs 2.52 on cuDNN) and 1 024 over 16k (0.51 vs 0.66); cuDNN takes
# the prefix of 1 024 queries over 64k (1.26 ms, own keys on FA-2, vs 1.93 all FA-2) and a first chunk of 8 192
# (0.74 vs 0.99). cuDNN also builds a plan for every new size bucket (~50-150 ms each; Engine.warm_up builds them
# before serving); FA-2 needs none.
CUDNN_MIN_QUERIES = 513
CUDNN_MIN_FLOP = {False: 1.8e11, True: 1e11}  # by causal: break-even of 0.2 ms against FA-2's rate on each


def call_flop(heads: int, head_dim: int, queries: int, keys: int, causal: bool) -> float:
    """FLOPs of one attention call (QK^T and PV); causal is square, so it does about half the pairs."""
    return 4.0 * heads * head_dim * queries * ((keys + 1) / 2 if causal else keys)


def on_cudnn(heads: int, head_dim: int, queries: int, keys: int, causal: bool) -> bool:
    return queries >= CUDNN_MIN_QUERIES and call_flop(heads, head_dim, queries, keys, causal) > CUDNN_MIN_FLOP[causal]


def cudnn_calls(heads: int, head_dim: int, n: int, start: int) -> list[tuple[bool, int, int]]:
    """The cuDNN calls (causal, queries, keys) chunk_attention makes on CUDA for n queries after `start` keys; none
    means one FlashAttention-2 call for the whole chunk."""
    calls = [(True, n, n)] if on_cudnn(heads, head_dim, n, n, True) else []
    if start and on_cudnn(heads, head_dim, n, start, False):
        calls.append((False, n, start))
    return calls


def cudnn_without_recompiles() -> None:
    """Ask torch's cuDNN attention to run new sequence lengths through one ragged graph per size bucket (lengths
    rounded up to powers of two) instead of building a graph per (queries, keys) shape: a build costs ~100 ms (H200),
    and a chunked prompt meets a new prefix length at every chunk. Opt-in and read once by torch
    (TORCH_CUDNN_SDPA_AVOID_RECOMPILE, torch >= 2.9); it applies to BSHD tensors, which is how the runner's q, k and v
    are laid out. torch keeps its cuDNN plans per thread: build them on the thread that serves (Engine.warm_up)."""
    os.environ.setdefault("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")


def chunk_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    n, end = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if n == end:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, end), scale=scale)


def flash_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 through torch's op, the Hkv heads read in place; causal is aligned to the lower right (for
    n == keys the same as upper left). Returns (out, lse [1, H, n, 1] fp32)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse.reshape(*q.shape[:3], 1)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T scale) v, logsumexp of each query's scores [1, H, n, 1], fp32 or fp64); causal = square, upper
    left.

    CUDA: cuDNN's fused attention where `on_cudnn`, else FlashAttention-2; both return the log-sum-exp they already
    compute and read the Hkv heads in place. Elsewhere: plain math in fp32 (fp64 for fp64 inputs): the oracle of the
    merge."""
    if q.is_cuda:
        if not on_cudnn(q.shape[1], q.shape[3], q.shape[2], k.shape[2], causal):
            return flash_attention_with_lse(q, k, v, scale, causal)
        # the Hkv heads in place, as SDPA's own enable_gqa dispatch hands them to this op
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
    if q.is_cuda and not cudnn_calls(q.shape[1], q.shape[3], n, start):
        return flash_attention_with_lse(q, k, v, scale, causal=True)[0]
    o_c, lse_c = attention_with_lse(q, k[:, :, start:], v[:, :, start:], scale, causal=True)
    if start == 0:
        return o_c
    o_p, lse_p = attention_with_lse(q, k[:, :, :start], v[:, :, :start], scale, causal=False)
    return merge_attention(o_p, lse_p, o_c, lse_c, q.dtype)


def cudnn_plan_shapes(max_queries: int, max_context: int, heads: int, head_dim: int) -> list[tuple[int, int]]:
    """(queries, prefix) shapes that meet every cuDNN plan chunk_attention can need for chunks of at most
    `max_queries` tokens in requests of at most `max_context`. With TORCH_CUDNN_SDPA_AVOID_RECOMPILE torch keys a plan
    on the lengths rounded up to powers of two, so one shape per (queries bucket, prefix bucket) pair serves every
    length in (bucket/2, bucket]: the pair's largest shape, which makes a cuDNN call wherever any shape of the pair
    does (the work only grows with the lengths). Pairs whose calls all stay on FlashAttention-2 need no shape."""
    shapes, top = [], min(max_queries, max_context)
    nb = 1
    while nb // 2 < top:
        pb, causal_met = 1, False
        while pb // 2 < max_context - (nb // 2 + 1):  # some chunk of this bucket fits after a prefix of this bucket
            n1 = min(nb, top, max_context - (pb // 2 + 1))  # the most queries, or the longest prefix, that fit
            p2 = min(pb, max_context - (nb // 2 + 1))
            n, p = max((n1, min(pb, max_context - n1)), (min(nb, top, max_context - p2), p2), key=lambda s: s[0] * s[1])
            calls = cudnn_calls(heads, head_dim, n, p)
            if any(not causal for causal, _, _ in calls):
                shapes.append((n, p))
                causal_met |= any(causal and q == min(nb, top) for causal, q, _ in calls)
            pb *= 2
        if not causal_met and cudnn_calls(heads, head_dim, min(nb, top), 0):  # the bucket's largest first chunk
            shapes.append((min(nb, top), 0))
        nb *= 2
    return shapes
