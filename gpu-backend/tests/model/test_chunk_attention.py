"""A prompt chunk's attention over its prefix: the split form (prefix keys + square causal keys, merged by their
log-sum-exps) against the reference lower-right masked SDPA. CPU runs the split's plain fp32 math; CUDA runs cuDNN."""

import pytest
import torch

from ringlinear.ops.attention import (attention_with_lse, chunk_attention, chunk_attention_reference,
                                      merge_attention)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n,end", [(64, 4096), (512, 640), (1000, 9000), (128, 128), (3, 515)])
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
