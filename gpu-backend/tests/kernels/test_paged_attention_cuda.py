"""GPU tests: the paged-KV decode attention kernel against its twin (skipped without CUDA).

Every cache row the kernel must not read (unused blocks, table entries past a row's used blocks) holds NaN, so a
stray read shows up as a non-finite output.
"""

import pytest
import torch

from ringlinear.kernels import available
from ringlinear.kernels import paged_attention as PA
from ringlinear.kernels.paged_attention import paged_decode_attention, plan_splits
from ringlinear.kernels.paged_attention_reference import paged_decode_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Kernel output vs the fp64 twin on the same (already rounded) inputs, max error relative to the row's max |ref|.
# The kernel computes in fp32, so the budget is the final rounding to q's dtype (half an ulp: 2^-9 for bf16,
# 2^-11 for fp16) with a 2x margin, and for fp32 the fp32 scores / exp2f / sums over up to 70k keys.
TOL = {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 5e-5}
OUT_OF_RANGE_BLOCK = (1 << 30) + 7  # garbage table entry far outside the cache


def make_case(B, H, Hkv, d, bs, lengths, dtype, *, extra_blocks=2, spare=4, seed=0, q_gain=1.0):
    """Cache with shuffled blocks; unused blocks and garbage entries (past each row's used blocks) point at NaN."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lengths]
    used = sum(need)
    num_blocks = used + spare
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(need) + extra_blocks
    tables = torch.empty(B, max_blocks, dtype=torch.int64)
    for b in range(B):
        for j in range(max_blocks):  # garbage: alternately a NaN block and an out-of-range id
            tables[b, j] = perm[used + (b + j) % spare] if (b + j) % 2 else OUT_OF_RANGE_BLOCK
    at = 0
    for b, nb in enumerate(need):
        tables[b, :nb] = perm[at:at + nb]
        at += nb
    rows = num_blocks * bs
    k = torch.full((num_blocks, bs, Hkv, d), float("nan"), dtype=torch.float32)
    v = torch.full_like(k, float("nan"))
    ids = perm[:used]
    k[ids] = torch.randn(used, bs, Hkv, d, generator=g)
    v[ids] = torch.randn(used, bs, Hkv, d, generator=g)
    q = torch.randn(B, H, d, generator=g) * q_gain
    dev = "cuda"
    return (q.to(dev, dtype), k.view(rows, Hkv, d).to(dev, dtype), v.view(rows, Hkv, d).to(dev, dtype),
            tables.to(dev), torch.tensor(lengths, dtype=torch.int64, device=dev))


def twin64(q, k, v, t, n, bs, scale=None, max_len=None):
    return paged_decode_attention_reference(q.double(), k.double(), v.double(), t, n, bs, scale, max_len=max_len)


def assert_close_rows(o, ref, lengths, tol):
    assert o.shape == ref.shape
    for b, n in enumerate(lengths):
        if n <= 0:
            assert torch.all(o[b] == 0), f"padding row {b} is not zero"
            continue
        assert torch.isfinite(o[b]).all(), f"row {b} (len {n}) is not finite: a stray read of a NaN row"
        err = ((o[b].double() - ref[b]).abs().max() / ref[b].abs().max()).item()
        assert err < tol, f"row {b} (len {n}): relative error {err:.3g} >= {tol}"


def lengths_for(B, seed):
    g = torch.Generator().manual_seed(seed)
    if B == 1:
        return [4099]
    if B == 3:
        return [0, 70000, 17]  # a long row exercises many splits beside a padding row and a short one
    special = [0, 1, 15, 16, 17, 31, 32, 33, 4999, 5000]
    return special + torch.randint(0, 5001, (B - len(special),), generator=g).tolist()


def test_extension_builds():
    assert available()


@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("rep", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_twin(B, rep, d, dtype):
    Hkv = 16 // rep if rep > 1 else 4
    bs = 16 if rep in (1, 4) else 32
    lengths = lengths_for(B, seed=B + rep + d)
    q, k, v, t, n = make_case(B, Hkv * rep, Hkv, d, bs, lengths, dtype, seed=B * 7 + rep + d)
    o = paged_decode_attention(q, k, v, t, n, bs)
    assert o.dtype == dtype
    assert_close_rows(o, twin64(q, k, v, t, n, bs), lengths, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_rep16_sharp_softmax_int32_indices(dtype, d):
    lengths = [300, 0, 2049, 16, 1]
    q, k, v, t, n = make_case(5, 16, 1, d, 16, lengths, dtype, seed=d, q_gain=4.0)  # large scores: peaked softmax
    o = paged_decode_attention(q, k, v, t.to(torch.int32), n.to(torch.int32), 16, 0.2)
    assert_close_rows(o, twin64(q, k, v, t, n, 16, 0.2), lengths, TOL[dtype])


def test_ring_mini_batch_256_single_split():
    lengths = torch.randint(0, 600, (256,), generator=torch.Generator().manual_seed(1)).tolist()
    q, k, v, t, n = make_case(256, 16, 4, 128, 16, lengths, torch.bfloat16, seed=2)
    assert plan_splits(t.shape[1] * 16, 256, 4, 16, PA._num_sms(q.device))[1] == 1  # the direct-write path
    o = paged_decode_attention(q, k, v, t, n, 16)
    assert_close_rows(o, twin64(q, k, v, t, n, 16), lengths, TOL[torch.bfloat16])


@pytest.mark.parametrize("max_len", [None, 5000, 1])
def test_max_len_plans_agree_with_twin(max_len):
    lengths = [4990, 3, 0, 1500]
    q, k, v, t, n = make_case(4, 16, 4, 128, 16, lengths, torch.float32, seed=5)
    o = paged_decode_attention(q, k, v, t, n, 16, max_len=max_len)
    ref = twin64(q, k, v, t, n, 16, max_len=max_len)
    clamped = [min(x, max_len) if max_len is not None else x for x in lengths]
    assert_close_rows(o, ref, clamped, TOL[torch.float32])


def test_long_context_uses_many_splits():
    q, k, v, t, n = make_case(1, 16, 4, 128, 16, [131072], torch.bfloat16, seed=6)
    assert plan_splits(t.shape[1] * 16, 1, 4, 16, PA._num_sms(q.device))[1] > 8
    o = paged_decode_attention(q, k, v, t, n, 16)
    assert_close_rows(o, twin64(q, k, v, t, n, 16), [131072], TOL[torch.bfloat16])


def test_out_parameter_and_strided_q():
    lengths = [37, 0, 800]
    B, H, Hkv, d = 3, 16, 4, 128
    q, k, v, t, n = make_case(B, H, Hkv, d, 16, lengths, torch.bfloat16, seed=8)
    qkv = torch.randn(B, H + 2 * Hkv, d, device="cuda", dtype=torch.bfloat16)
    qkv[:, :H] = q
    qs = qkv[:, :H]  # a view of the fused projection, as the runner produces it
    assert not qs.is_contiguous()
    out = torch.full_like(q, float("nan"))
    r = paged_decode_attention(qs, k, v, t, n, 16, out=out)
    assert r is out
    assert_close_rows(out, twin64(q, k, v, t, n, 16), lengths, TOL[torch.bfloat16])


def test_corrupt_used_table_entry_gives_nan_for_that_row_only():
    lengths = [40, 40]
    q, k, v, t, n = make_case(2, 8, 2, 64, 16, lengths, torch.float32, seed=9)
    ref = twin64(q, k, v, t, n, 16)
    t[1, 1] = OUT_OF_RANGE_BLOCK
    o = paged_decode_attention(q, k, v, t, n, 16)
    assert torch.isnan(o[1]).all()
    assert_close_rows(o[:1], ref[:1], lengths[:1], TOL[torch.float32])


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cuda_graph_replay_with_new_lengths_tables_and_q(index_dtype):
    """Capture once, then change lengths, tables and q in place between replays: the graph must follow them."""
    B, H, Hkv, d, bs, max_blocks = 8, 16, 4, 128, 16, 80
    max_len = max_blocks * bs
    g = torch.Generator().manual_seed(10)
    num_blocks = B * max_blocks + 4
    k = torch.randn(num_blocks * bs, Hkv, d, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(num_blocks * bs, Hkv, d, generator=g).to("cuda", torch.bfloat16)
    k[-4 * bs:] = float("nan")  # the last 4 blocks are never used
    v[-4 * bs:] = float("nan")

    def scenario(lengths):
        perm = torch.randperm(B * max_blocks, generator=g)
        tab = perm.view(B, max_blocks).clone()
        for b, n in enumerate(lengths):
            tab[b, -(-n // bs):] = num_blocks - 1 - b % 4  # past-the-end entries: NaN blocks
        return (torch.randn(B, H, d, generator=g).to("cuda", torch.bfloat16), tab.to("cuda", index_dtype),
                torch.tensor(lengths, device="cuda", dtype=index_dtype))

    cases = [[5, 1000, 0, 17, 1280, 64, 3, 900], [1280, 0, 0, 1, 640, 33, 1279, 16], [0] * 8,
             [100, 200, 300, 400, 500, 600, 700, 800]]
    q_s, t_s, n_s = scenario(cases[0])
    out = torch.empty(B, H, d, device="cuda", dtype=torch.bfloat16)
    run = lambda: paged_decode_attention(q_s, k, v, t_s, n_s, bs, max_len=max_len, out=out)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lengths in cases:
        qn, tn, nn = scenario(lengths)
        q_s.copy_(qn)
        t_s.copy_(tn)
        n_s.copy_(nn)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_rows(out, twin64(qn, k, v, tn, nn, bs), lengths, TOL[torch.bfloat16])
