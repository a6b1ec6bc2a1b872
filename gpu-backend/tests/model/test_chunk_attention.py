"""A prompt chunk's attention over its prefix: the split form (prefix keys + square causal keys, merged by their
log-sum-exps) against the reference lower-right masked SDPA. CPU runs the split's plain fp32 math; CUDA runs cuDNN
and FlashAttention-2 by size. And the cuDNN plan shapes the server builds at start-up cover every size bucket."""

import pytest
import torch

from ringlinear.ops.attention import (attention_with_lse, call_flop, chunk_attention, chunk_attention_reference,
                                      cudnn_calls, cudnn_plan_shapes, merge_attention, on_cudnn)


def _qkv(H, Hkv, n, end, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, n, d, generator=g)
    # K/V as the runner hands them: cache rows [end, Hkv, d] viewed as [1, Hkv, end, d] (not contiguous)
    k = torch.randn(end, Hkv, d, generator=g).transpose(0, 1)[None]
    v = torch.randn(end, Hkv, d, generator=g).transpose(0, 1)[None]
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


@pytest.mark.parametrize("H,Hkv,n,end", [(4, 2, 7, 30), (4, 4, 16, 16), (8, 2, 64, 200), (2, 1, 1, 9), (4, 1, 33, 34)])
def test_split_chunk_attention_equals_the_masked_reference(H, Hkv, n, end):
    q, k, v = _qkv(H, Hkv, n, end, 16, torch.float64, "cpu", n * end)
    ref = chunk_attention_reference(q, k, v, 0.25)
    torch.testing.assert_close(chunk_attention(q, k, v, 0.25), ref, rtol=1e-10, atol=1e-10)


def test_lse_is_the_log_of_the_softmax_denominator():
    q, k, v = _qkv(2, 1, 5, 5, 8, torch.float64, "cpu", 1)
    o, lse = attention_with_lse(q, k, v, 0.5, causal=True)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1, keepdim=True))
    torch.testing.assert_close(o, torch.softmax(s, -1) @ v.repeat_interleave(2, 1))
    # merging with a key set of weight ~0 (lse -> -inf) leaves the output as it was
    far = torch.full_like(lse, -1e4)
    torch.testing.assert_close(merge_attention(o, lse, torch.zeros_like(o), far, o.dtype), o)


def _bucket(x):
    return 1 << max(0, x - 1).bit_length()


def _cudnn_keys(n, start, H, d):
    """The cuDNN plan keys of one chunk: torch's AVOID_RECOMPILE rounds the lengths up to powers of two."""
    return {(causal, _bucket(q), _bucket(k)) for causal, q, k in cudnn_calls(H, d, n, start)}


def test_small_chunks_stay_on_flash_and_large_ones_split_onto_cudnn():
    H, d = 16, 128  # Ring-mini; the H200 figures that set the thresholds
    assert cudnn_calls(H, d, 1024, 16384) == []  # one FlashAttention-2 call
    assert cudnn_calls(H, d, 512, 126976) == []  # too few queries for cuDNN, however long the prefix
    assert cudnn_calls(H, d, 1024, 65536) == [(False, 1024, 65536)]  # the prefix on cuDNN, its own keys on FA-2
    assert cudnn_calls(H, d, 16384, 114688) == [(True, 16384, 16384), (False, 16384, 114688)]
    assert cudnn_calls(H, d, 8192, 0) == [(True, 8192, 8192)]
    assert cudnn_calls(H, d, 4096, 0) == []
    assert on_cudnn(H, d, 8192, 8192, True) and not on_cudnn(H, d, 512, 1 << 20, False)
    assert call_flop(H, d, 4, 6, False) == 4 * H * d * 24 and call_flop(H, d, 3, 3, True) == 4 * H * d * 6


@pytest.mark.parametrize("max_queries,max_context,H,d", [(16384, 131072, 16, 128), (2048, 32768, 16, 128),
                                                         (4096, 3000, 16, 128), (5000, 9000, 32, 128),
                                                         (512, 65536, 16, 128), (16384, 20000, 4, 64),
                                                         (3000, 70000, 32, 128), (16384, 17000, 16, 128),
                                                         (12000, 12000, 16, 128), (16384, 24000, 16, 128),
                                                         (6000, 40000, 16, 128)])
def test_cudnn_plan_shapes_cover_every_bucket_a_chunk_can_meet(max_queries, max_context, H, d):
    shapes = cudnn_plan_shapes(max_queries, max_context, H, d)
    assert all(0 < n <= max_queries and n + p <= max_context for n, p in shapes)
    warmed = set().union(*[_cudnn_keys(n, p, H, d) for n, p in shapes]) if shapes else set()
    edges = lambda hi: sorted({x for b in (1 << e for e in range(1, 19)) for x in (b // 2 + 1, b) if x <= hi}  # noqa: E731
                              | {1, hi} | set(range(1, hi + 1, 499)))
    needed = set()
    for n in edges(min(max_queries, max_context)):
        for start in [0] + edges(max_context - n):
            needed |= _cudnn_keys(n, start, H, d)
    assert needed <= warmed, sorted(needed - warmed)[:5]
    assert len(shapes) <= len(warmed)  # no shape without a plan of its own to build


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n,end", [(64, 4096), (512, 640), (1000, 9000), (128, 128), (3, 515),
                                   # around the FlashAttention-2 / cuDNN switch (on_cudnn): one FA-2 call; cuDNN
                                   # prefix + FA-2 own keys; both on cuDNN; a first chunk on cuDNN; FA-2 with a
                                   # long prefix
                                   (1024, 1024 + 16384), (1024, 1024 + 65536), (16384, 16384 + 4096), (9000, 9000),
                                   (512, 512 + 70000)])
def test_cudnn_chunk_attention_matches_the_reference_on_cuda(n, end):
    # Ring-mini softmax layer: 16 query heads over 4 KV heads of 128, bf16
    q, k, v = _qkv(16, 4, n, end, 128, torch.bfloat16, "cuda", n + end)
    ref = chunk_attention_reference(q.float(), k.float(), v.float(), 128 ** -0.5)
    out = chunk_attention(q, k, v, 128 ** -0.5)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.float() - ref).abs().max().item()
    assert err <= 2e-2, f"max |diff| {err:.3e} vs the fp32 reference"
    # and as close to the fp32 reference as the bf16 reference path is
    bf = chunk_attention_reference(q, k, v, 128 ** -0.5)
    assert err <= 2 * (bf.float() - ref).abs().max().item() + 4e-3
