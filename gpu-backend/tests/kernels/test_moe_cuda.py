"""GPU tests: MoE router / sort / SwiGLU / combine / expert kernels against the reference twins (skipped without CUDA)."""

import pytest
import torch

from ringlinear.kernels import _build
from ringlinear.kernels import moe as moe_mod
from ringlinear.kernels.moe import (ROUTER_SPLIT_MIN_TOKENS, SMALL_ROUTE_MAX_TOKENS, SORT_BLOCK, STREAM_FOLD_MAX_TOKENS,
                                   combine, fused_moe, pack_gate_up, pack_moe, packed_gate_up, route, route_align_small,
                                   route_decode, router_logits, scatter_rows, shared_as_expert, stream_gemm, swiglu,
                                   tma_gemm, wide_gemm)
from ringlinear.kernels.moe_reference import (RING_MINI_ROUTER, RouterConfig, combine_reference, moe_reference,
                                              route_align_reference, route_reference, scatter_rows_reference,
                                              sort_assignments_reference, stream_gemm_reference, swiglu_rows_reference)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WEIGHT_ATOL = 1e-5  # router weights: fp32 sigmoid in both
MOE_REL = 2e-2  # bf16 weights and activations, bf16 intermediate h, fp32 accumulation
# SwiGLU / combine: both sides compute in fp32 and round once to bf16; fp32 rounding-order differences (expf ulps,
# FMA vs separate multiply-add) can flip that final rounding by one bf16 step = 2^-7 relative (8-bit significand).
BF16_STEP = 2.0**-7
# ... plus the fp32 error of summing k + 1 terms, relative to the sum of their magnitudes (k <= 8: ~9 * 2^-24, x 10).
FP32_SUM_REL = 1e-6

SMALL = RouterConfig(num_experts=16, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)


@pytest.fixture(scope="module", autouse=True)
def _needs_extension():
    if not _build.available():
        pytest.fail("CUDA is present but the ringlinear extension did not build")


@pytest.mark.parametrize("cfg", [RING_MINI_ROUTER, SMALL], ids=["ring-mini", "small"])
@pytest.mark.parametrize("N", [1, 7, 300])
def test_route_kernel_matches_twin(cfg, N):
    torch.manual_seed(N)
    D = 64
    x = torch.randn(N, D, device="cuda")
    wr = torch.randn(cfg.num_experts, D, device="cuda") * 0.2
    bias = torch.randn(cfg.num_experts, device="cuda") * 0.05
    ids, w = route(x, wr, bias, cfg)
    ids_ref, w_ref = route_reference(x.float() @ wr.float().t(), bias, cfg)
    assert torch.equal(ids.long(), ids_ref)  # both sorted by biased score
    assert (w - w_ref).abs().max().item() < WEIGHT_ATOL


# the one-block router's paths: warp-wide group scores (32-expert groups), the serial fallback, no group limit
ROUTE_SMALL_CFGS = {"ring-mini": RING_MINI_ROUTER, "small": SMALL,
                    "4x32-of-256-threads": RouterConfig(num_experts=128, top_k=4, n_group=4, topk_group=2),
                    "unlimited": RouterConfig(num_experts=64, top_k=6, n_group=2, topk_group=2),
                    "512-experts": RouterConfig(num_experts=512, top_k=8, n_group=16, topk_group=4)}


@pytest.mark.parametrize("cfg", list(ROUTE_SMALL_CFGS.values()), ids=list(ROUTE_SMALL_CFGS))
@pytest.mark.parametrize("N", [1, 2, 3, SMALL_ROUTE_MAX_TOKENS])
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared-appended"])
def test_route_align_small_matches_twin_and_route_kernel(cfg, N, shared):
    """The decode path's one-block routing + sort: the twin's experts, weights and sorted order, and the same
    experts and bitwise the same weights as moe_route_kernel (the prefill/stream router)."""
    torch.manual_seed(100 + N)
    E, D = cfg.num_experts, 64
    x = torch.randn(N, D, device="cuda")
    wr = torch.randn(E, D, device="cuda") * 0.2
    bias = torch.randn(E, device="cuda") * 0.05
    append = E if shared else -1
    logits = x @ wr.t()
    ids, w, offsets, order, active = route_align_small(logits, bias, cfg, append, E + shared)
    ids_r, w_r, off_r, order_r, active_r = route_align_reference(logits, bias, cfg, append, E + shared)
    assert torch.equal(ids, ids_r) and torch.equal(offsets, off_r) and torch.equal(order, order_r)
    used = int(active_r[-1])  # entries past the active experts are unspecified (the expert kernels stop at the count)
    assert int(active[-1]) == used and torch.equal(active[:used], active_r[:used])
    assert (w - w_r).abs().max().item() < WEIGHT_ATOL
    ids_k, w_k = route(x, wr, bias, cfg, append)
    assert torch.equal(ids, ids_k) and torch.equal(w, w_k)
    if shared:
        assert (ids[:, -1] == E).all() and (w[:, -1] == 1).all()


@pytest.mark.parametrize("N", [1, 2, SMALL_ROUTE_MAX_TOKENS])
@pytest.mark.parametrize("append", [-1, 256])
def test_route_decode_one_launch(N, append):
    """The decode router in one launch (bf16 GEMV over E/8 blocks, the last block routes and sorts) against its two-
    launch twin; again and again (the arrival counter resets itself), and replayed from a CUDA graph."""
    cfg = RING_MINI_ROUTER
    g = torch.Generator(device="cuda").manual_seed(20 + N)
    x = torch.randn(N, 2048, device="cuda", generator=g).to(torch.bfloat16)
    wr = (torch.randn(256, 2048, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.randn(256, device="cuda", generator=g) * 0.01
    E_out = 256 + (append >= 0)
    want = route_align_small(router_logits(x, wr), bias, cfg, append, E_out)
    used = int(want[4][-1])

    def check(got):
        ids, w, offsets, order, active = got
        assert torch.equal(ids, want[0]) and torch.equal(offsets, want[2]) and torch.equal(order, want[3])
        assert int(active[-1]) == used and torch.equal(active[:used], want[4][:used])
        assert (w - want[1]).abs().max().item() < WEIGHT_ATOL

    first = route_decode(x, wr, bias, cfg, append, E_out)
    check(first)
    for _ in range(3):
        again = route_decode(x, wr, bias, cfg, append, E_out)
        check(again)
        assert torch.equal(again[1], first[1])  # bitwise the same weights every time
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        route_decode(x, wr, bias, cfg, append, E_out)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = route_decode(x, wr, bias, cfg, append, E_out)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        check(out)


def test_route_align_small_ties_and_nan_rows():
    """Equal scores: the lower expert (and group) index wins in both routers, so they agree on exact ties; a row of
    NaN logits still yields distinct in-range experts."""
    cfg = RING_MINI_ROUTER
    E = cfg.num_experts
    g = torch.Generator(device="cuda").manual_seed(3)
    base = torch.randn(4, E // 4, device="cuda", generator=g)
    logits = base.repeat(1, 4).contiguous()  # every score appears 4 times, in 4 different groups
    logits[1, 40:72] = 0.5  # a whole group tied
    bias = torch.zeros(E, device="cuda")
    ids, w, *_ = route_align_small(logits, bias, cfg)
    ids_k = torch.empty_like(ids)
    w_k = torch.empty_like(w)
    _build.extension().moe_route(logits, bias, cfg.n_group, cfg.topk_group, cfg.top_k, cfg.norm_topk_prob,
                                 float(cfg.routed_scaling_factor), -1, ids_k, w_k)
    assert torch.equal(ids, ids_k) and torch.equal(w, w_k)
    nan = torch.full((1, E), float("nan"), device="cuda")
    ids, w, offsets, order, active = route_align_small(nan, None, cfg, E, E + 1)
    assert ids.min() >= 0 and ids.max() <= E and ids[0, :-1].unique().numel() == cfg.top_k
    assert int(offsets[-1]) == cfg.top_k + 1 and sorted(order.tolist()) == list(range(cfg.top_k + 1))
    with pytest.raises(ValueError, match="at most"):
        route_align_small(torch.zeros(SMALL_ROUTE_MAX_TOKENS + 1, E, device="cuda"), None, cfg)


@pytest.mark.parametrize("n_group,topk_group,topk", [(8, 4, 8), (32, 8, 8), (1, 1, 8), (4, 2, 32), (16, 16, 6)])
@pytest.mark.parametrize("append", [-1, 256])
@pytest.mark.parametrize("with_bias", [True, False])
def test_route_256_experts_matches_general_kernel(n_group, topk_group, topk, append, with_bias):
    """moe_route's register path for 256 experts (8 per lane, a warp max per pick) against the shared-memory kernel,
    which a logits view off 16-byte alignment still takes: the same experts in the same order and bitwise the same
    weights, on scores rounded to quarters so that exact ties (within and across lanes and groups) are everywhere."""
    g = torch.Generator(device="cuda").manual_seed(n_group * 100 + topk + append)
    N, E = 3000, 256
    logits = (torch.randn(N, E, device="cuda", generator=g) * 4).round() / 4
    bias = (torch.randn(E, device="cuda", generator=g) * 4).round() / 16 if with_bias else None
    k = topk + (append >= 0)

    def run(lg):
        ids = torch.empty(N, k, dtype=torch.int32, device="cuda")
        w = torch.empty(N, k, device="cuda")
        _build.extension().moe_route(lg, bias, n_group, topk_group, topk, True, 2.5, append, ids, w)
        return ids, w

    buf = torch.empty(N * E + 1, device="cuda")
    buf[1:].copy_(logits.reshape(-1))
    shifted = buf[1:].view(N, E)  # 4 bytes off alignment: the general kernel
    assert shifted.data_ptr() % 16
    ids, w = run(logits)
    ids_g, w_g = run(shifted)
    assert torch.equal(ids, ids_g) and torch.equal(w, w_g)
    # and the twin's picks on continuous scores. Even these tie now and then (3 000 x 256 sigmoids, 2^-24 apart near
    # the top), and torch.topk orders ties as it likes: so the picked scores must be the twin's, in its order.
    logits = torch.randn(N, E, device="cuda", generator=g)
    ids, w = run(logits)
    cfg = RouterConfig(num_experts=E, top_k=topk, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5)
    ids_r, w_r = route_reference(logits, bias, cfg)
    biased = torch.sigmoid(logits) + (bias if bias is not None else 0.0)
    assert torch.equal(biased.gather(1, ids[:, :topk].long()), biased.gather(1, ids_r))
    assert (ids[:, :topk].long() == ids_r).float().mean().item() > 0.99
    assert (w[:, :topk] - w_r).abs().max().item() < WEIGHT_ATOL
    if append >= 0:
        assert (ids[:, -1] == append).all() and (w[:, -1] == 1).all()


def test_router_logits_bf16_weights_one_gemm():
    """bf16 router weights (a bf16 model): one GEMM with fp32 accumulation, the fp32 GEMM of the upcast operands up
    to the summation order."""
    g = torch.Generator(device="cuda").manual_seed(9)
    for N in (1, 5, 4096):
        x = torch.randn(N, 2048, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(256, 2048, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        got = router_logits(x, w)
        ref = x.double() @ w.double().t()
        assert got.dtype == torch.float32 and got.shape == (N, 256)
        assert (got.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


# Split router GEMM vs the fp32 GEMM's own error against fp64. Tensor-core fp32 accumulation may truncate (2x the
# error of round-to-nearest) and three GEMM results are added: allow 16x; dropping the split's middle part would
# cost ~2^-17 per product, over 100x the fp32 error.
ROUTER_SPLIT_ERR_FACTOR = 16


@pytest.mark.parametrize("N", [ROUTER_SPLIT_MIN_TOKENS, 8192])
def test_router_logits_split_matches_fp32_accuracy(N):
    g = torch.Generator(device="cuda").manual_seed(N)
    D, E = 2048, 256
    x = torch.randn(N, D, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(E, D, device="cuda", generator=g) * 0.02
    exact = x.double() @ w.double().t()
    got = router_logits(x, w)
    assert got.dtype == torch.float32 and got.shape == (N, E)
    err = (got.double() - exact).abs().max().item()
    fp32_err = ((x.float() @ w.t()).double() - exact).abs().max().item()
    assert err <= ROUTER_SPLIT_ERR_FACTOR * fp32_err + 1e-7, (err, fp32_err)


# ------------------------------------------------------------------------------------------------ sort kernel
def _sort_cuda(ids, E):
    N, k = ids.shape
    A = N * k
    i32 = dict(dtype=torch.int32, device="cuda")
    counts = torch.full((max(1, -(-A // SORT_BLOCK)) * E,), -7, **i32)
    offsets, ends = torch.full((E + 1,), -7, **i32), torch.full((E,), -7, **i32)
    sorted_a, inv, tok = (torch.full((A,), -7, **i32) for _ in range(3))
    _build.extension().moe_sort(ids.reshape(-1).to(torch.int32).contiguous(), E, k, counts, offsets, ends, sorted_a, inv, tok)
    return sorted_a, inv, tok, offsets, ends


@pytest.mark.parametrize("N,k,E,used", [(1, 8, 256, 256), (37, 4, 16, 16), (256, 8, 256, 256), (300, 8, 256, 5),
                                        (4096, 8, 256, 256), (5000, 8, 256, 40), (32768, 8, 256, 256), (3, 2, 1024, 1024)])
def test_sort_kernel_is_the_stable_sort(N, k, E, used):
    g = torch.Generator(device="cuda").manual_seed(N * k + used)
    ids = torch.randint(0, used, (N, k), device="cuda", generator=g) * (E // used)  # `used` experts, others get none
    sorted_a, inv, tok, offsets, ends = _sort_cuda(ids, E)
    order, inv_ref, off_ref = sort_assignments_reference(ids, E)
    assert torch.equal(sorted_a.long(), order)
    assert torch.equal(inv.long(), inv_ref)
    assert torch.equal(tok.long(), order // k)
    assert torch.equal(offsets.long(), off_ref)
    assert torch.equal(ends.long(), off_ref[1:])


@pytest.mark.parametrize("N,k,D,dtype", [(1, 8, 2048, torch.bfloat16), (37, 4, 256, torch.bfloat16),
                                         (5000, 8, 2048, torch.bfloat16), (300, 8, 520, torch.bfloat16),
                                         (70, 3, 100, torch.float32), (9, 32, 64, torch.float16)])
def test_scatter_rows_is_the_sorted_gather(N, k, D, dtype):
    # the grouped path's input rows: xs[p] = x[tok[p]], written token by token through the inverse permutation
    g = torch.Generator(device="cuda").manual_seed(N + k + D)
    ids = torch.randint(0, 256, (N, k), device="cuda", generator=g)
    _, inv, tok, _, _ = _sort_cuda(ids, 256)
    x_wide = torch.randn(N, D + 8, device="cuda", generator=g).to(dtype)
    for x in (x_wide[:, :D].contiguous(), x_wide[:, :D]):  # contiguous and strided rows
        xs = scatter_rows(x, inv, k)
        assert xs.shape == (N * k, D) and xs.dtype == dtype
        assert torch.equal(xs, x.index_select(0, tok.long()))
        assert torch.equal(xs, scatter_rows_reference(x, inv, k))


# ------------------------------------------------------------------------------------------------ SwiGLU / combine
def _close_bf16(got, ref, scale):
    """got bf16 vs an fp32/fp64 reference: one bf16 rounding step plus fp32 summation error over `scale`."""
    err = (got.double() - ref.double()).abs()
    bound = BF16_STEP * ref.double().abs() + FP32_SUM_REL * scale.double() + 1e-30
    assert (err <= bound).all(), (err - bound).max().item()


@pytest.mark.parametrize("M,I,packed", [(1, 8, True), (300, 512, True), (300, 512, False), (70000, 520, True)])
def test_swiglu_kernel(M, I, packed):
    g0 = torch.Generator(device="cuda").manual_seed(M + I)
    t = (torch.randn(M, 2 * I, device="cuda", generator=g0) * 3).to(torch.bfloat16)
    g, u = (t[:, :I], t[:, I:]) if packed else (t[:, :I].contiguous(), t[:, I:].contiguous())
    h = swiglu(g, u)
    assert h.shape == (M, I) and h.dtype == torch.bfloat16 and h.is_contiguous()
    ref = torch.nn.functional.silu(g.double()) * u.double()
    _close_bf16(h, ref, torch.zeros_like(ref))
    assert torch.equal(h, swiglu(g, u))  # deterministic
    assert (h.float() - swiglu_rows_reference(g, u).float()).abs().max().item() <= BF16_STEP * ref.abs().max().item()


@pytest.mark.parametrize("N,k,D", [(1, 8, 2048), (37, 4, 256), (4096, 8, 2048), (5, 1, 8)])
@pytest.mark.parametrize("ys_dtype,shared_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, None),
                                                   (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("permuted", [True, False])
def test_combine_kernel(N, k, D, ys_dtype, shared_dtype, permuted):
    g = torch.Generator(device="cuda").manual_seed(N * k + D)
    ys = torch.randn(N * k, D, device="cuda", generator=g).to(ys_dtype)
    rows = torch.randperm(N * k, device="cuda", generator=g).to(torch.int32) if permuted else None
    w = torch.rand(N, k, device="cuda", generator=g) if permuted else None
    shared = None if shared_dtype is None else torch.randn(N, D, device="cuda", generator=g).to(shared_dtype)
    out = combine(ys, rows, w, shared, k)
    assert out.shape == (N, D) and out.dtype == torch.bfloat16
    idx = torch.arange(N * k, device="cuda") if rows is None else rows.long()
    terms = ys.double()[idx].view(N, k, D) * (1.0 if w is None else w.double()[..., None])
    ref = terms.sum(1) + (0.0 if shared is None else shared.double())
    scale = terms.abs().sum(1) + (0.0 if shared is None else shared.double().abs())
    _close_bf16(out, ref, scale)
    _close_bf16(combine_reference(ys, rows, w, shared, k), ref, scale)  # the twin obeys the same bound
    assert torch.equal(out, combine(ys, rows, w, shared, k))


@pytest.mark.parametrize("N,k,D", [(1, 8, 2048), (37, 4, 256), (300, 8, 4096), (5, 2, 800), (3, 8, 4800)])
@pytest.mark.parametrize("ys_dtype,shared_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, None)])
def test_combine_with_add_norm_is_the_two_kernels_bitwise(N, k, D, ys_dtype, shared_dtype):
    """combine(..., add_norm=(x, weight, eps)) writes add_rms_norm(x, combine(...), weight, eps) - s and the normed
    rows - bitwise, from one kernel (add_rms_norm's thread layout for D = 800: 128 threads, and 4 800: 160 threads of
    4 vectors), with x a strided view of a wider residual buffer; nothing is written to x."""
    from ringlinear.kernels.elementwise import add_rms_norm

    g = torch.Generator(device="cuda").manual_seed(N * k + D)
    ys = torch.randn(N * k, D, device="cuda", generator=g).to(ys_dtype)
    rows = torch.randperm(N * k, device="cuda", generator=g).to(torch.int32)
    w = torch.rand(N, k, device="cuda", generator=g)
    shared = None if shared_dtype is None else torch.randn(N, D, device="cuda", generator=g).to(shared_dtype)
    wide = (torch.randn(N, D + 64, device="cuda", generator=g) * 3).to(torch.bfloat16)
    x, x0 = wide[:, :D], wide.clone()
    weight = torch.rand(D, device="cuda", generator=g) + 0.5
    s, h = combine(ys, rows, w, shared, k, add_norm=(x, weight, 1e-6))
    s_ref, h_ref = add_rms_norm(x, combine(ys, rows, w, shared, k), weight, 1e-6)
    assert torch.equal(s, s_ref) and torch.equal(h, h_ref)
    assert s.is_contiguous() and h.is_contiguous() and torch.equal(wide, x0)


@pytest.mark.parametrize("path", ["decode", "stream", "wide", "grouped"])
@pytest.mark.parametrize("shape", ["small-37", "mini-4", "mini-300"])
def test_fused_moe_with_add_norm_is_moe_then_add_rms_norm(path, shape):
    """fused_moe(..., add_norm=...) on every path: bitwise add_rms_norm(residual, fused_moe(...)), the engine's MoE
    layout (the shared expert as expert E where a path folds it in)."""
    from ringlinear.kernels.elementwise import add_rms_norm

    E, I, D, N, cfg = SHAPES[shape]
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=N + 3, packed="moe")
    g = torch.Generator(device="cuda").manual_seed(N)
    res = torch.randn(N, D, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.rand(D, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    s, h = fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path=path, add_norm=(res, weight, 1e-6))
    s_ref, h_ref = add_rms_norm(res, fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path=path), weight, 1e-6)
    assert torch.equal(s, s_ref) and torch.equal(h, h_ref)
    with pytest.raises(ValueError, match="add_norm's residual"):
        fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path=path, add_norm=(res[:-1], weight, 1e-6))


# ------------------------------------------------------------------------------------------------ fused_moe
def _moe_inputs(E, I, D, N, seed, packed=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.05).to(torch.bfloat16)  # noqa: E731
    x = (torch.randn(N, D, device="cuda", generator=g)).to(torch.bfloat16)
    wr = torch.randn(E, D, device="cuda", generator=g) * 0.05
    bias = torch.randn(E, device="cuda", generator=g) * 0.01
    wg, wu, wd = mk(E, I, D), mk(E, I, D), mk(E, D, I)
    sg, su, sd = mk(I, D), mk(I, D), mk(D, I)
    if packed == "moe":  # the engine's layout: + the shared expert stored as expert E
        wg, wu, wd, (sg, su, sd) = pack_moe(wg, wu, wd, (sg, su, sd))
        assert shared_as_expert(wg, wu, wd, (sg, su, sd)) is not None
    elif packed:
        _, wg, wu = pack_gate_up(wg, wu)
        _, sg, su = pack_gate_up(sg, su)
        assert packed_gate_up(wg, wu) is not None and packed_gate_up(sg, su) is not None
    return x, wr, bias, wg, wu, wd, (sg, su, sd)


SHAPES = {
    "small-1": (16, 128, 256, 1, SMALL),  # 12 of 16 experts get no token
    "small-37": (16, 128, 256, 37, SMALL),
    "mini-1": (256, 512, 2048, 1, RING_MINI_ROUTER),
    "mini-4": (256, 512, 2048, 4, RING_MINI_ROUTER),
    "mini-64": (256, 512, 2048, 64, RING_MINI_ROUTER),
    "mini-300": (256, 512, 2048, 300, RING_MINI_ROUTER),
    "mini-4096": (256, 512, 2048, 4096, RING_MINI_ROUTER),
}


@pytest.mark.parametrize("packed", [False, True, "moe"], ids=["unpacked", "packed", "moe-layout"])
@pytest.mark.parametrize("with_shared", [True, False], ids=["shared", "no-shared"])
@pytest.mark.parametrize("path", ["decode", "stream", "wide", "grouped"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_fused_moe_matches_twin(path, shape, with_shared, packed):
    E, I, D, N, cfg = shape
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=N + E, packed=packed)
    shared = shared if with_shared else None
    y = fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path=path)
    y_ref = moe_reference(x, wr, bias, wg, wu, wd, shared, cfg)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y.float()).all()
    rel = ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item()
    assert rel < MOE_REL, rel
    assert torch.equal(y, fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path=path))  # deterministic, bitwise


@pytest.mark.parametrize("path,N", [("decode", 1), ("decode", 2), ("decode", 9), ("stream", 3),
                                    ("stream", STREAM_FOLD_MAX_TOKENS), ("stream", STREAM_FOLD_MAX_TOKENS + 1)])
def test_shared_expert_as_expert_e(path, N):
    """pack_moe's layout: the decode and small stream steps compute the shared expert in the routed experts'
    launches (one more assignment of weight 1). Same result as the separate shared GEMMs up to their rounding (the
    stream kernel rounds like the GEMMs, the decode kernel keeps gate and up in fp32), routed part unchanged."""
    E, I, D, _, cfg = SHAPES["mini-1"]
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=70 + N)
    wr = wr.to(torch.bfloat16)  # the engine's bf16 router: the decode path's one-launch router
    pg, pu, pd, psh = pack_moe(wg, wu, wd, shared)
    y_fold = fused_moe(x, wr, bias, pg, pu, pd, psh, cfg, path=path)
    y_sep = fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path=path)
    y_ref = moe_reference(x, wr, bias, wg, wu, wd, shared, cfg)
    for y in (y_fold, y_sep):
        assert ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item() < MOE_REL
    # a few bf16 roundings apart (elementwise bounds fail where the routed and shared parts cancel)
    assert ((y_fold.double() - y_sep.double()).norm() / y_sep.double().norm()).item() < BF16_STEP
    # the routed part alone: the same kernels on the same weights (views of the packed buffers)
    assert torch.equal(fused_moe(x, wr, bias, pg, pu, pd, None, cfg, path=path),
                       fused_moe(x, wr, bias, wg, wu, wd, None, cfg, path=path))


@pytest.mark.parametrize("I,D", [(128, 256), (264, 264), (1024, 256), (2048, 128)])
def test_decode_down_variants_and_packed_views_agree(I, D):
    """Every moe_down_kernel register layout (I/8 chunks <= 32, 64, 128, 256; ragged rows) against the twin; packed
    views run the same arithmetic as separate tensors, so the decode path must agree bitwise."""
    E, N, cfg = 16, 9, SMALL
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=I + D)
    y = fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path="decode")
    y_ref = moe_reference(x, wr, bias, wg, wu, wd, shared, cfg)
    assert ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item() < MOE_REL
    _, pg, pu = pack_gate_up(wg, wu)
    _, psg, psu = pack_gate_up(shared[0], shared[1])
    y_packed = fused_moe(x, wr, bias, pg, pu, wd, (psg, psu, shared[2]), cfg, path="decode")
    # the shared expert's packed GEMM may tile differently from two GEMMs: compare the routed part exactly
    y_np = fused_moe(x, wr, bias, wg, wu, wd, None, cfg, path="decode")
    y_p = fused_moe(x, wr, bias, pg, pu, wd, None, cfg, path="decode")
    assert torch.equal(y_np, y_p)
    assert ((y_packed.double() - y_ref.double()).norm() / y_ref.double().norm()).item() < MOE_REL


@pytest.mark.parametrize("N", [1, 2, 3, 20])
@pytest.mark.parametrize("I,D,E", [(512, 2048, 256), (1024, 256, 16), (2048, 128, 16), (128, 264, 16)],
                         ids=["mini", "wide", "widest", "small"])  # every down register layout at one token
def test_decode_small_passes_change_no_bit(N, I, D, E, monkeypatch):
    """The one- and two-token layouts (passes of 2 / 1 assignments) run the same per-lane arithmetic in the same
    order as the 8-assignment passes: bitwise the same outputs (pack_moe's layout, the shared expert E included), and
    the twin's within MOE_REL. N = 3 and 20 take the 8-assignment passes either way."""
    from ringlinear.kernels import moe as moe_mod

    cfg = RING_MINI_ROUTER if E == 256 else SMALL
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=300 + N + I, packed="moe")
    wr = wr.to(torch.bfloat16)
    outs = []
    for small in (False, True):
        monkeypatch.setattr(moe_mod, "DECODE_SMALL_PASSES", small)
        outs.append(fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path="decode"))
    for y in outs[1:]:
        assert torch.equal(y, outs[0])
    y_ref = moe_reference(x, wr, bias, wg, wu, wd, shared, cfg)
    assert ((outs[0].double() - y_ref.double()).norm() / y_ref.double().norm()).item() < MOE_REL


def test_many_tokens_per_expert_decode_passes():
    """An expert with more than 8 assignments takes several 8-token passes over register-held weights."""
    E, I, D, N = 16, 512, 256, 64  # top-4 of 16: ~16 assignments per expert
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=5)
    y = fused_moe(x, wr, bias, wg, wu, wd, shared, SMALL, path="decode")
    y_ref = moe_reference(x, wr, bias, wg, wu, wd, shared, SMALL)
    assert ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item() < MOE_REL


@pytest.mark.parametrize("path, shape, seed, packed", [("decode", "mini-64", 11, True), ("stream", "mini-300", 14, True),
                                                       ("grouped", "mini-300", 12, True), ("decode", "mini-1", 15, "moe"),
                                                       ("stream", "mini-4", 16, "moe"), ("wide", "mini-300", 17, True),
                                                       ("wide", "mini-4096", 18, "moe")])
def test_path_captures_in_a_cuda_graph(path, shape, seed, packed):
    """Neither path synchronises with the host (capture would fail on one); the replay equals the eager result."""
    E, I, D, N, cfg = SHAPES[shape]
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=seed, packed=packed)
    want, out = _eager_and_replayed(lambda: fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path=path))
    assert torch.equal(out, want)


def _eager_and_replayed(fn):
    """fn() run eagerly (on a side stream, as before a capture), and the output of its CUDA graph's replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        want = fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return want, out


def test_wide_path_256_row_passes(monkeypatch):
    """A prefill-sized step (8 192 tokens: ~256 rows per expert) takes 256-row passes: close to the twin, bitwise the
    layer of 128-row passes, and capturable in a CUDA graph."""
    E, I, D, _, cfg = SHAPES["mini-4096"]
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, 8192, seed=19, packed="moe")
    assert moe_mod.wide_config(8192 * cfg.top_k, wg.shape[0]) == (4, 256)
    fn = lambda: fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path="wide")  # noqa: E731
    y, out = _eager_and_replayed(fn)
    y_ref = moe_reference(x, wr, bias, wg, wu, wd, shared, cfg)
    assert ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item() < MOE_REL
    assert torch.equal(out, y)
    monkeypatch.setattr(moe_mod, "WIDE_LONG_PASS_MEAN_ROWS", 1 << 30)  # 128-row passes
    assert torch.equal(fn(), y)


@pytest.mark.parametrize("path", ["decode", "stream", "wide", "grouped"])
def test_gate_view_with_separate_up(path):
    """w_gate a strided view of a bigger buffer (expert stride 2I*D) but w_up a separate tensor: not packed, so two
    gate/up GEMMs on the grouped path and different expert strides for gate and up in the decode kernel."""
    E, I, D, N, cfg = SHAPES["mini-64"]
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=13)
    _, pg, _ = pack_gate_up(wg, torch.zeros_like(wu))
    assert packed_gate_up(pg, wu) is None and pg.stride(0) == 2 * I * D
    y = fused_moe(x, wr, bias, pg, wu, wd, shared, cfg, path=path)
    y_ref = moe_reference(x, wr, bias, wg, wu, wd, shared, cfg)
    assert ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item() < MOE_REL
    if path in ("decode", "stream", "wide"):  # same arithmetic as contiguous weights
        assert torch.equal(y, fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path=path))


# ---------------------------------------------------------------------------------------------------------------------
# moe_stream_gemm (the stream path's tensor-core grouped GEMM) against its twin
STREAM_CASES = {
    # name: (rows per expert, F, K): empty experts, 1..8 rows (one n8 tile), 9..32 (several), > 32 (several passes);
    # F and K not multiples of the 64/128-row and 64-column tiles (bounds and zero-filled k tails)
    "ragged": ([0, 1, 7, 8, 9, 33, 70, 0, 5, 32], 200, 136),
    "mini-gate-up": (None, 512, 2048),
    "mini-down": (None, 2048, 512),
}


def _stream_inputs(case, gate_up, seed):
    counts, F, K = STREAM_CASES[case]
    g = torch.Generator(device="cuda").manual_seed(seed)
    if counts is None:  # Ring-mini decode batch: 256 experts, ~8 rows each (256 tokens x top-8), some empty
        counts = torch.randint(0, 17, (256,), generator=g, device="cuda").tolist()
    E = len(counts)
    offsets = torch.tensor([0] + counts, device="cuda").cumsum(0).to(torch.int32)
    A = int(offsets[-1])
    N = max(1, A // 3)
    x = torch.randn(N, K, device="cuda", generator=g).to(torch.bfloat16)
    gather = torch.randint(0, N, (A,), generator=g, device="cuda").to(torch.int32) if gate_up else None
    if not gate_up:
        x = torch.randn(A, K, device="cuda", generator=g).to(torch.bfloat16)
    mk = lambda: (torch.randn(E, F, K, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)  # noqa: E731
    return x, gather, mk(), mk() if gate_up else None, offsets


def _assert_bf16_close(y, y_ref):
    """Both sides are one fp32 dot product per element rounded to bf16 (after SwiGLU for gate/up); the kernel's k order
    differs from the twin's GEMM, so a rounding may flip by one bf16 step (two through the SwiGLU's double rounding)."""
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == torch.bfloat16
    d, r = (y.float() - y_ref.float()).abs(), y_ref.float().abs()
    bound = 2 * BF16_STEP * r + 1e-3 * r.max()
    assert (d <= bound).all(), (d - bound).max().item()
    assert (d == 0).float().mean().item() > 0.9  # most roundings agree exactly


@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize("gate_up", [True, False], ids=["gate-up-swiglu", "plain"])
@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_stream_gemm_matches_twin(case, gate_up, stages):
    if case.startswith("mini") and gate_up != (case == "mini-gate-up"):
        pytest.skip("the Ring-mini shapes run as the engine uses them")
    x, gather, w, w_up, offsets = _stream_inputs(case, gate_up, seed=len(case) + stages)
    y = stream_gemm(x, gather, w, w_up, offsets, stages=stages)
    _assert_bf16_close(y, stream_gemm_reference(x, gather, w, w_up, offsets))
    assert torch.equal(y, stream_gemm(x, gather, w, w_up, offsets, stages=stages))  # deterministic
    assert torch.equal(y, stream_gemm(x, gather, w, w_up, offsets, stages=7 - stages))  # depth changes no arithmetic
    # the weights issued before the dependent-launch wait (the down GEMM's launch; offsets were written long before)
    assert torch.equal(y, stream_gemm(x, gather, w, w_up, offsets, stages=stages, early=True))


def test_stream_gemm_gate_up_is_swiglu_of_two_plain_gemms():
    """The fused epilogue equals the CUDA SwiGLU (the grouped path's) applied to the two plain GEMMs' bf16 outputs,
    bit for bit: the same k order per element and the same fp32 formula."""
    x, gather, w, w_up, offsets = _stream_inputs("ragged", True, seed=3)
    g = stream_gemm(x, gather, w, None, offsets)
    u = stream_gemm(x, gather, w_up, None, offsets)
    assert torch.equal(stream_gemm(x, gather, w, w_up, offsets), swiglu(g, u))


def test_stream_gemm_rejects_bad_inputs():
    """The extension's argument checks raise ValueError naming the argument (RL_CHECK), with nothing written."""
    x, gather, w, w_up, offsets = _stream_inputs("ragged", True, seed=4)
    ext = _build.extension()
    y = torch.zeros(gather.numel(), w.shape[1], dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="stages"):
        ext.moe_stream_gemm(x, gather, w, w_up, offsets, y, 5, False)
    with pytest.raises(ValueError, match=r"w_up must be bf16 \[10, 200, 136\]"):
        ext.moe_stream_gemm(x, gather, w, w_up[:, :-1], offsets, y, 4, False)
    with pytest.raises(ValueError, match="gather"):
        ext.moe_stream_gemm(x, gather[:-1], w, w_up, offsets, y, 4, False)
    with pytest.raises(ValueError, match="offsets"):
        ext.moe_stream_gemm(x, gather, w, w_up, offsets.long(), y, 4, False)
    assert not y.any()


def test_formatted_check_messages_raise_in_other_kernels_too():
    """A failing check with a formatted message (ints in it) raises instead of crashing the process: moe_align."""
    ids = torch.zeros(4, dtype=torch.int32, device="cuda")
    out = torch.empty(5001, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="at most 1024 experts"):
        _build.extension().moe_align(ids, 5000, out, ids.clone(), out)


# ---------------------------------------------------------------------------------------------------------------------
# moe_wide_gemm (the wide path's wgmma grouped GEMM) against the same twin
WIDE_CASES = {
    # rows per expert around every pass width (32 / 64 / 128 / 256) and several passes; F, K off the 64/128 tiles
    "ragged": ([0, 1, 31, 32, 33, 64, 65, 127, 128, 129, 255, 256, 257, 300, 0, 7, 513], 200, 136),
    # one expert with 8 passes of 128 (4 of 256) where the grid gives each expert 4 (2) concurrent ones (1.75x the
    # mean): CTAs loop
    "crowded": ([1000, 0, 3, 0], 64, 128),
    "mini-gate-up": ("prefill", 512, 2048),
    "mini-down": ("prefill", 2048, 512),
}


def _grouped_inputs(cases, case, gate_up, seed, prefill_rows, device="cuda"):
    """(x, gather, w, w_up, offsets) of a grouped-GEMM case: (rows per expert or "prefill", F, K); "prefill" = 256
    experts of 0 .. prefill_rows - 1 rows (a Ring-mini prompt step). gate_up: x of A / 3 tokens gathered, with w_up."""
    counts, F, K = cases[case]
    g = torch.Generator(device=device).manual_seed(seed)
    if counts == "prefill":
        counts = torch.randint(0, prefill_rows, (256,), generator=g, device=device).tolist()
    E = len(counts)
    offsets = torch.tensor([0] + counts, device=device).cumsum(0).to(torch.int32)
    A = int(offsets[-1])
    N = max(1, A // 3)
    if gate_up:
        x = torch.randn(N, K, device=device, generator=g).to(torch.bfloat16)
        gather = torch.randint(0, N, (A,), generator=g, device=device).to(torch.int32)
    else:
        x, gather = torch.randn(A, K, device=device, generator=g).to(torch.bfloat16), None
    mk = lambda: (torch.randn(E, F, K, device=device, generator=g) * K**-0.5).to(torch.bfloat16)  # noqa: E731
    return x, gather, mk(), mk() if gate_up else None, offsets


def _wide_inputs(case, gate_up, seed):
    return _grouped_inputs(WIDE_CASES, case, gate_up, seed, prefill_rows=300)  # ~0-300 rows: a prompt chunk


@pytest.mark.parametrize("gate_up", [True, False], ids=["gate-up-swiglu", "plain"])
@pytest.mark.parametrize("case", list(WIDE_CASES))
def test_wide_gemm_matches_twin(case, gate_up):
    if case.startswith("mini") and gate_up != (case == "mini-gate-up"):
        pytest.skip("the Ring-mini shapes run as the engine uses them")
    x, gather, w, w_up, offsets = _wide_inputs(case, gate_up, seed=len(case) + gate_up)
    y = wide_gemm(x, gather, w, w_up, offsets, stages=5, pass_rows=128)
    _assert_bf16_close(y, stream_gemm_reference(x, gather, w, w_up, offsets))
    assert torch.equal(y, wide_gemm(x, gather, w, w_up, offsets, stages=5, pass_rows=128))  # deterministic
    assert torch.equal(y, wide_gemm(x, gather, w, w_up, offsets, stages=4, pass_rows=128))  # ring depth: no arithmetic
    assert torch.equal(y, wide_gemm(x, gather, w, w_up, offsets, stages=4, pass_rows=256))  # pass width: none either


def test_wide_gemm_gate_up_is_swiglu_of_two_plain_gemms():
    """The fused epilogue equals the CUDA SwiGLU applied to the two plain GEMMs' bf16 outputs, bit for bit."""
    x, gather, w, w_up, offsets = _wide_inputs("ragged", True, seed=5)
    g = wide_gemm(x, gather, w, None, offsets)
    u = wide_gemm(x, gather, w_up, None, offsets)
    assert torch.equal(wide_gemm(x, gather, w, w_up, offsets), swiglu(g, u))


def test_wide_gemm_rows_do_not_depend_on_their_neighbours():
    """A row's output is the same whichever pass (and pass width) carries it: expert 0 with 300 rows (passes of
    128, 128, 44, or 256 and 44) against the same rows as 300 experts of one row each (passes of width 32)."""
    g = torch.Generator(device="cuda").manual_seed(9)
    K, F, R = 256, 64, 300
    x = torch.randn(R, K, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(1, F, K, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)
    one = wide_gemm(x, None, w, None, torch.tensor([0, R], dtype=torch.int32, device="cuda"), pass_rows=128)
    split = wide_gemm(x, None, w.expand(R, F, K), None, torch.arange(R + 1, dtype=torch.int32, device="cuda"))
    assert torch.equal(one, split)
    assert torch.equal(one, wide_gemm(x, None, w, None, torch.tensor([0, R], dtype=torch.int32, device="cuda"),
                                      pass_rows=256))


def test_wide_gemm_rejects_bad_inputs():
    """The extension's argument checks raise ValueError naming the kernel and the argument, with nothing written."""
    x, gather, w, w_up, offsets = _wide_inputs("ragged", True, seed=4)
    ext = _build.extension()
    y = torch.zeros(gather.numel(), w.shape[1], dtype=torch.bfloat16, device="cuda")
    for stages in (3, 6):
        with pytest.raises(ValueError, match="moe_wide_gemm: stages must be 4 or 5"):
            ext.moe_wide_gemm(x, gather, w, w_up, offsets, y, stages, 128)
    with pytest.raises(ValueError, match="moe_wide_gemm: pass_rows must be 128, or 256 with stages 4; got 256 with"):
        ext.moe_wide_gemm(x, gather, w, w_up, offsets, y, 5, 256)  # five 48 KB slots do not fit
    with pytest.raises(ValueError, match="moe_wide_gemm: pass_rows"):
        ext.moe_wide_gemm(x, gather, w, w_up, offsets, y, 4, 64)
    with pytest.raises(ValueError, match=r"moe_wide_gemm: w_up must be bf16 \[17, 200, 136\]"):
        ext.moe_wide_gemm(x, gather, w, w_up[:, :-1], offsets, y, 4, 128)
    with pytest.raises(ValueError, match="moe_wide_gemm: gather"):
        ext.moe_wide_gemm(x, gather[:-1], w, w_up, offsets, y, 4, 128)
    with pytest.raises(ValueError, match="moe_wide_gemm: F"):
        ext.moe_wide_gemm(x, gather, w[:, :-4].contiguous(), w_up[:, :-4].contiguous(), offsets, y[:, :-4].contiguous(),
                          4, 128)
    assert not y.any()


# ---------------------------------------------------------------------------------------------------------------------
# moe_tma_gemm (the wide path's GEMMs from TMA_*_MIN_MEAN_ROWS rows per expert) against the same twin
TMA_CASES = {
    # rows per expert around the 128-row x tile and several tiles, empty experts; F and K off the feature tiles (256
    # for down, 128 for gate+up) and the 64-column k-step (features past F and columns past K come in as the copies'
    # zero fill, x rows past an expert's end are the next expert's and are not stored)
    "ragged": ([0, 1, 63, 64, 65, 127, 128, 129, 255, 256, 257, 0, 7, 700, 0], 200, 136),
    "one-tile-per-expert": ([128] * 3 + [1] * 5, 256, 64),
    "mini-gate-up": ("prefill", 512, 2048),
    "mini-down": ("prefill", 2048, 512),
}


def _tma_inputs(case, gate_up, seed):
    return _grouped_inputs(TMA_CASES, case, gate_up, seed, prefill_rows=1500)  # ~0-1 500 rows: a long prompt step


@pytest.mark.parametrize("gate_up", [True, False], ids=["gate-up-swiglu", "plain"])
@pytest.mark.parametrize("case", list(TMA_CASES))
def test_tma_gemm_matches_twin(case, gate_up):
    if case.startswith("mini") and gate_up != (case == "mini-gate-up"):
        pytest.skip("the Ring-mini shapes run as the engine uses them")
    x, gather, w, w_up, offsets = _tma_inputs(case, gate_up, seed=len(case) + gate_up)
    y = tma_gemm(x, gather, w, w_up, offsets)
    _assert_bf16_close(y, stream_gemm_reference(x, gather, w, w_up, offsets))
    assert torch.equal(y, tma_gemm(x, gather, w, w_up, offsets))  # deterministic
    assert torch.equal(y, tma_gemm(x, gather, w, w_up, offsets, stages=3))  # ring depth: no arithmetic


def test_tma_gemm_gate_up_is_swiglu_of_two_plain_gemms():
    """The fused epilogue equals the CUDA SwiGLU applied to the two plain GEMMs' bf16 outputs, bit for bit (the plain
    GEMMs on x rows gathered beforehand: a row's result does not depend on how it reached shared memory)."""
    x, gather, w, w_up, offsets = _tma_inputs("ragged", True, seed=5)
    xs = x[gather.long()].contiguous()
    g = tma_gemm(xs, None, w, None, offsets)
    u = tma_gemm(xs, None, w_up, None, offsets)
    assert torch.equal(tma_gemm(x, gather, w, w_up, offsets), swiglu(g, u))


def test_tma_gemm_rows_do_not_depend_on_their_tile():
    """A row's output is the same whichever x tile carries it (and whatever the tile's other rows are): 300 rows of
    one expert against the same rows shifted by 5 behind a second expert (the same weights), so every row sits at
    another place of another tile; and the same for the gathered gate+up GEMM."""
    g = torch.Generator(device="cuda").manual_seed(21)
    K, F, R = 512, 264, 300
    x = torch.randn(R, K, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(1, F, K, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(1, F, K, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)
    i32 = dict(dtype=torch.int32, device="cuda")
    one = tma_gemm(x, None, w, None, torch.tensor([0, R], **i32))
    junk = torch.randn(5, K, device="cuda", generator=g).to(torch.bfloat16)
    two = torch.tensor([0, 5, R + 5], **i32)
    assert torch.equal(one, tma_gemm(torch.cat([junk, x]), None, torch.cat([w, w]), None, two)[5:])
    rows = torch.arange(R, **i32).flip(0)
    gu = tma_gemm(x, rows, w, w2, torch.tensor([0, R], **i32))
    shifted = tma_gemm(x, torch.cat([rows[:5], rows]), torch.cat([w, w]), torch.cat([w2, w2]), two)
    assert torch.equal(gu, shifted[5:])


def test_tma_gemm_reads_strided_expert_views():
    """w / w_up may be views whose experts are further apart than F x K (the halves of a packed gate|up buffer): the
    weight copies follow the expert stride, with the same result as contiguous weights."""
    x, gather, w, w_up, offsets = _tma_inputs("ragged", True, seed=8)
    _, gv, uv = pack_gate_up(w, w_up)
    assert gv.stride(0) == 2 * w.shape[1] * w.shape[2]
    assert torch.equal(tma_gemm(x, gather, gv, uv, offsets), tma_gemm(x, gather, w, w_up, offsets))
    xs = x[gather.long()].contiguous()
    assert torch.equal(tma_gemm(xs, None, gv, None, offsets), tma_gemm(xs, None, w, None, offsets))


def test_tma_gemm_rejects_bad_inputs():
    """The argument checks raise ValueError naming the kernel and the argument, with nothing written."""
    x, gather, w, w_up, offsets = _tma_inputs("ragged", True, seed=4)
    ext = _build.extension()
    y = torch.zeros(gather.numel(), w.shape[1], dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="moe_tma_gemm: gather and w_up go together"):
        ext.moe_tma_gemm(x, gather, w, None, offsets, y, 0)
    with pytest.raises(ValueError, match="tma_gemm: gather and w_up go together"):
        tma_gemm(x, None, w, w_up, offsets)
    with pytest.raises(ValueError, match="moe_tma_gemm: F"):
        ext.moe_tma_gemm(x, gather, w[:, :-4].contiguous(), w_up[:, :-4].contiguous(), offsets, y[:, :-4].contiguous(),
                         0)
    with pytest.raises(ValueError, match="moe_tma_gemm: gather"):
        ext.moe_tma_gemm(x, gather[:-1], w, w_up, offsets, y, 0)
    with pytest.raises(ValueError, match=r"moe_tma_gemm: w_up must be bf16 \[15, 200, 136\]"):
        ext.moe_tma_gemm(x, gather, w, w_up.float(), offsets, y, 0)
    with pytest.raises(ValueError, match="moe_tma_gemm: offsets"):
        ext.moe_tma_gemm(x, gather, w, w_up, offsets.long(), y, 0)
    many = torch.zeros(1026, dtype=torch.int32, device="cuda")
    w8 = torch.zeros(1025, 8, 136, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="moe_tma_gemm: at most 1024 experts, got 1025"):
        ext.moe_tma_gemm(x, gather, w8, w8, many, y[:, :8].contiguous(), 0)
    for stages in (2, 5):
        with pytest.raises(ValueError, match="moe_tma_gemm: stages must be 0"):
            ext.moe_tma_gemm(x, gather, w, w_up, offsets, y, stages)
    xs = x[gather.long()].contiguous()
    with pytest.raises(ValueError, match=r"moe_tma_gemm: stages must be .*; got 4"):
        ext.moe_tma_gemm(xs, None, w, None, offsets, y, 4)  # the down GEMM's 32 KB output tiles leave room for 3
    assert not y.any()


def test_wide_path_on_tma_gemms(monkeypatch):
    """A long step (16 384 tokens: ~512 rows per expert) on the TMA GEMMs: close to the twin, capturable in a CUDA
    graph, and close to the layer on the wide kernel's GEMMs (the k order inside an MMA may differ)."""
    E, I, D, _, cfg = SHAPES["mini-4096"]
    N = 16384
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=23, packed="moe")
    assert moe_mod.tma_path(N * cfg.top_k, wg.shape[0]) == (True, True)
    fn = lambda: fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path="wide")  # noqa: E731
    y, out = _eager_and_replayed(fn)
    y_ref = moe_reference(x, wr, bias, wg, wu, wd, shared, cfg)
    assert ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item() < MOE_REL
    assert torch.equal(out, y)
    monkeypatch.setattr(moe_mod, "TMA_GATE_UP_MIN_MEAN_ROWS", 1 << 30)  # the wide kernel's GEMMs
    monkeypatch.setattr(moe_mod, "TMA_DOWN_MIN_MEAN_ROWS", 1 << 30)
    y_wide = fn()
    assert ((y.double() - y_wide.double()).norm() / y_wide.double().norm()).item() < 1e-2
