"""CPU tests of the MoE reference twin (router and experts) and of fused_moe's validation / CPU fallback."""

import pytest
import torch
import torch.nn.functional as F

from ringlinear.kernels import moe as moe_mod
from ringlinear.kernels.moe import (_grouped_mm, fused_moe, pack_experts, pack_gate_up, pack_moe, packed_gate_up, route,
                                   route_align_small, router_logits, shared_as_expert, split_bf16x3, tma_gemm, tma_path,
                                   wide_config)
from ringlinear.kernels.moe_reference import (RouterConfig, combine_reference, experts_touched_bytes, moe_reference,
                                              route_reference, sort_assignments_reference,
                                              stream_gemm_reference, swiglu_rows_reference)

SMALL = RouterConfig(num_experts=16, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)


def _brute_route(logits, bias, cfg):
    """Per-token Python loops, written independently of the tensor version."""
    ids_all, w_all = [], []
    gs = cfg.num_experts // cfg.n_group
    for row in logits.tolist():
        p = [1.0 / (1.0 + torch.exp(torch.tensor(-x, dtype=torch.float64)).item()) for x in row]
        b = [pi + bi for pi, bi in zip(p, bias.tolist())]
        gscore = [sum(sorted(b[g * gs:(g + 1) * gs], reverse=True)[:2]) for g in range(cfg.n_group)]
        kept = sorted(range(cfg.n_group), key=lambda g: -gscore[g])[: cfg.topk_group]
        cand = [e for e in range(cfg.num_experts) if e // gs in kept]
        ids = sorted(cand, key=lambda e: -b[e])[: cfg.top_k]
        w = [p[e] for e in ids]
        s = sum(w)
        ids_all.append(ids)
        w_all.append([x / (s + 1e-20) * cfg.routed_scaling_factor for x in w])
    return torch.tensor(ids_all), torch.tensor(w_all, dtype=torch.float64)


@pytest.mark.parametrize("N", [1, 5, 33])
def test_route_reference_matches_brute_force(N):
    g = torch.Generator().manual_seed(N)
    logits = torch.randn(N, SMALL.num_experts, generator=g, dtype=torch.float64)
    bias = torch.randn(SMALL.num_experts, generator=g, dtype=torch.float64) * 0.3
    ids, w = route_reference(logits, bias, SMALL)
    ids_b, w_b = _brute_route(logits, bias, SMALL)
    assert torch.equal(ids, ids_b)
    assert torch.allclose(w.double(), w_b, atol=1e-6)


def test_bias_selects_but_does_not_weight():
    cfg = RouterConfig(num_experts=8, top_k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0)
    logits = torch.zeros(1, 8)
    bias = torch.zeros(8)
    bias[5] = 1.0
    bias[2] = 0.5
    ids, w = route_reference(logits, bias, cfg)
    assert ids.tolist() == [[5, 2]]
    assert torch.allclose(w, torch.tensor([[0.5, 0.5]]))  # unbiased sigmoid(0) each, renormalised


def _weights(E, I, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(dtype)  # noqa: E731
    return mk(E, D), torch.randn(E, generator=g) * 0.1, mk(E, I, D), mk(E, I, D), mk(E, D, I), (mk(I, D), mk(I, D), mk(D, I))


def test_moe_reference_equals_dense_formulation():
    E, I, D, N = SMALL.num_experts, 32, 24, 9
    wr, bias, wg, wu, wd, shared = _weights(E, I, D, 1)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    y = moe_reference(x, wr, bias, wg, wu, wd, shared, SMALL)
    ids, w = route_reference(x @ wr.t(), bias, SMALL)
    dense = torch.stack([F.linear(F.silu(F.linear(x, wg[e])) * F.linear(x, wu[e]), wd[e]) for e in range(E)], 1)  # [N, E, D]
    gate = torch.zeros(N, E).scatter_(1, ids, w)
    want = (gate[..., None] * dense).sum(1) + F.linear(F.silu(F.linear(x, shared[0])) * F.linear(x, shared[1]), shared[2])
    assert torch.allclose(y, want, atol=1e-5)


def test_fused_moe_falls_back_on_cpu_and_route_returns_int32():
    E, I, D, N = SMALL.num_experts, 32, 24, 4
    wr, bias, wg, wu, wd, shared = _weights(E, I, D, 3)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(fused_moe(x, wr, bias, wg, wu, wd, shared, SMALL), moe_reference(x, wr, bias, wg, wu, wd, shared, SMALL))
    ids, w = route(x, wr, bias, SMALL)
    assert ids.dtype == torch.int32 and w.shape == (N, SMALL.top_k)


def test_pack_experts_and_touched_bytes():
    gate = [torch.zeros(4, 8, dtype=torch.bfloat16) for _ in range(3)]
    down = [torch.zeros(8, 4, dtype=torch.bfloat16) for _ in range(3)]
    wg, wu, wd = pack_experts(gate, gate, down)
    assert wg.shape == (3, 4, 8) and wd.shape == (3, 8, 4)
    assert experts_touched_bytes(torch.tensor([[0, 2], [2, 0]]), wg, wd) == 2 * 3 * 32 * 2


@pytest.mark.parametrize(
    "cfg,match",
    [
        (RouterConfig(num_experts=16, n_group=3), "n_group"),
        (RouterConfig(num_experts=16, n_group=4, topk_group=5), "topk_group"),
        (RouterConfig(num_experts=16, n_group=4, topk_group=1, top_k=5), "top_k"),
    ],
)
def test_bad_router_config_rejected(cfg, match):
    E, I, D = 16, 8, 8
    wr, bias, wg, wu, wd, shared = _weights(E, I, D, 5)
    with pytest.raises(ValueError, match=match):
        fused_moe(torch.zeros(2, D), wr, bias, wg, wu, wd, shared, cfg)


def test_bad_weight_shapes_rejected():
    E, I, D = 16, 16, 8
    wr, bias, wg, wu, wd, shared = _weights(E, I, D, 6)
    with pytest.raises(ValueError, match="w_down"):
        fused_moe(torch.zeros(2, D), wr, bias, wg, wu, wd.transpose(1, 2), shared, SMALL)
    with pytest.raises(ValueError, match="router_weight"):
        fused_moe(torch.zeros(2, D), wr[:, :4], bias, wg, wu, wd, shared, SMALL)


# ------------------------------------------------------------------------------------------------ packed gate/up
@pytest.mark.parametrize("shape", [(3, 4, 8), (4, 8)], ids=["experts", "shared"])
def test_pack_gate_up_views_share_storage(shape):
    g = torch.Generator().manual_seed(7)
    gate, up = torch.randn(*shape, generator=g).to(torch.bfloat16), torch.randn(*shape, generator=g).to(torch.bfloat16)
    packed, gv, uv = pack_gate_up(gate, up)
    I, D = shape[-2], shape[-1]
    assert packed.shape == (*shape[:-2], 2 * I, D) and packed.is_contiguous()
    assert torch.equal(gv, gate) and torch.equal(uv, up)
    assert gv.data_ptr() == packed.data_ptr() and uv.data_ptr() == packed.data_ptr() + I * D * packed.element_size()
    found = packed_gate_up(gv, uv)
    assert found is not None and found.data_ptr() == packed.data_ptr() and torch.equal(found, packed)
    gv.mul_(2)  # writes through to the packed buffer
    assert torch.equal(packed[..., :I, :], gate * 2)


def test_packed_gate_up_rejects_other_layouts():
    gate, up = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    assert packed_gate_up(gate, up) is None  # separate tensors
    packed, gv, uv = pack_gate_up(gate, up)
    assert packed_gate_up(uv, gv) is None  # wrong order
    assert packed_gate_up(gv[:, :2], uv[:, :2]) is None  # not the full halves
    big = torch.randn(3, 12, 8)
    assert packed_gate_up(big[:, :4], big[:, 8:]) is None  # not adjacent
    assert packed_gate_up(big[:, :4], big[:, 4:8]) is None  # adjacent rows but the expert stride is 12 rows, not 8
    flat = torch.randn(8, 8)
    assert packed_gate_up(flat[:4], flat[4:]) is not None  # a [2I, D] buffer's halves are a packed shared expert
    with pytest.raises(ValueError, match="pack_gate_up"):
        pack_gate_up(gate, up[:, :2])


@pytest.mark.parametrize("shared_I", [32, 48, None], ids=["same-size", "other-size", "none"])
def test_pack_moe_layout(shared_I):
    """pack_moe: routed gate/up halves of one buffer, down one buffer, the shared expert stored as expert E when it has
    the experts' size (found again by shared_as_expert), else packed on its own; values unchanged."""
    E, I, D = SMALL.num_experts, 32, 24
    g = torch.Generator().manual_seed(12)
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    wg, wu, wd = mk(E, I, D), mk(E, I, D), mk(E, D, I)
    shared = None if shared_I is None else (mk(shared_I, D), mk(shared_I, D), mk(D, shared_I))
    pg, pu, pd, psh = pack_moe(wg, wu, wd, shared)
    assert torch.equal(pg, wg) and torch.equal(pu, wu) and torch.equal(pd, wd)
    assert packed_gate_up(pg, pu) is not None and pd.stride() == (D * I, I, 1)
    if shared is None:
        assert psh is None
        return
    assert all(torch.equal(a, b) for a, b in zip(psh, shared)) and packed_gate_up(psh[0], psh[1]) is not None
    both = shared_as_expert(pg, pu, pd, psh)
    if shared_I != I:
        assert both is None
        return
    assert both is not None and [t.shape[0] for t in both] == [E + 1] * 3
    assert all(torch.equal(t[:E], w) and torch.equal(t[E], sw) for t, w, sw in zip(both, (wg, wu, wd), shared))
    assert shared_as_expert(wg, wu, wd, shared) is None  # separate tensors
    assert shared_as_expert(pg, pu, pd, (psh[1], psh[0], psh[2])) is None  # gate and up swapped
    assert shared_as_expert(pg[:-1], pu[:-1], pd[:-1], psh) is None  # not right after the experts


def test_route_align_reference_sorts_by_expert():
    """The decode router's twin: route_reference's experts (+ the appended column), the assignments grouped by
    expert in ascending order, the active experts listed ascending with their count last."""
    g = torch.Generator().manual_seed(13)
    E, N = SMALL.num_experts, 3
    logits, bias = torch.randn(N, E, generator=g), torch.randn(E, generator=g) * 0.1
    ids_r, w_r = route_reference(logits, bias, SMALL)
    for append in (-1, E):
        E_out = E + (append >= 0)
        ids, w, offsets, order, active = route_align_small(logits, bias, SMALL, append, E_out)  # CPU: the twin
        k = SMALL.top_k + (append >= 0)
        assert ids.shape == (N, k) and ids.dtype == torch.int32 and torch.equal(ids[:, :SMALL.top_k].long(), ids_r)
        assert torch.allclose(w[:, :SMALL.top_k], w_r)
        if append >= 0:
            assert (ids[:, -1] == E).all() and (w[:, -1] == 1).all()
        flat = ids.reshape(-1).tolist()
        want = [a for e in range(E_out) for a in range(len(flat)) if flat[a] == e]
        assert order.tolist() == want
        counts = [flat.count(e) for e in range(E_out)]
        assert offsets.tolist() == [sum(counts[:e]) for e in range(E_out + 1)]
        used = [e for e in range(E_out) if counts[e]]
        assert active[: len(used)].tolist() == used and int(active[E_out]) == len(used)
        assert torch.equal(route(torch.eye(E), torch.eye(E), None, SMALL, append)[0][:, -1] == E,
                           torch.full((E,), append >= 0))


def test_fused_moe_cpu_fallback_accepts_packed_views():
    E, I, D, N = SMALL.num_experts, 32, 24, 5
    wr, bias, wg, wu, wd, shared = _weights(E, I, D, 8)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    _, pg, pu = pack_gate_up(wg, wu)
    _, psg, psu = pack_gate_up(shared[0], shared[1])
    want = fused_moe(x, wr, bias, wg, wu, wd, shared, SMALL)
    assert torch.allclose(fused_moe(x, wr, bias, pg, pu, wd, (psg, psu, shared[2]), SMALL), want, atol=1e-6)


# ------------------------------------------------------------------------------------------------ grouped-path twins
def test_sort_assignments_reference_is_stable_and_inverse():
    g = torch.Generator().manual_seed(10)
    E, N, k = 16, 50, 4
    ids = torch.randint(0, 12, (N, k), generator=g)  # experts 12..15 unused
    order, inv, offsets = sort_assignments_reference(ids, E)
    flat = ids.reshape(-1)
    assert torch.equal(inv[order], torch.arange(N * k)) and torch.equal(order[inv], torch.arange(N * k))
    for e in range(E):
        rows = order[offsets[e]:offsets[e + 1]]
        assert torch.equal(rows, (flat == e).nonzero().flatten())  # this expert's assignments in ascending order
    assert offsets[0] == 0 and offsets[-1] == N * k and (offsets[13:] == offsets[12]).all()


def test_fused_moe_add_norm_on_cpu_is_moe_then_add_rms_norm():
    """add_norm on the CPU fallback: (residual + MoE(x), rms_norm of that), as the runner's two steps give them; a
    residual of another shape is refused by name."""
    from ringlinear.kernels.elementwise_reference import add_rms_norm_reference

    E, I, D, N = SMALL.num_experts, 32, 24, 4
    wr, bias, wg, wu, wd, shared = _weights(E, I, D, 3)
    g = torch.Generator().manual_seed(5)
    x, res, weight = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g), torch.rand(D, generator=g) + 0.5
    s, h = fused_moe(x, wr, bias, wg, wu, wd, shared, SMALL, add_norm=(res, weight, 1e-6))
    s_ref, h_ref = add_rms_norm_reference(res, fused_moe(x, wr, bias, wg, wu, wd, shared, SMALL), weight, 1e-6)
    assert torch.equal(s, s_ref) and torch.equal(h, h_ref)
    with pytest.raises(ValueError, match="add_norm's residual"):
        fused_moe(x, wr, bias, wg, wu, wd, shared, SMALL, add_norm=(res[:, :-1], weight, 1e-6))


def test_combine_reference_equals_scatter_then_weighted_sum():
    """The combine twin against the old un-permute formulation (y[order] = ys; sum_j w_j y[n, j] + shared)."""
    g = torch.Generator().manual_seed(11)
    N, k, D, E = 9, 4, 16, 8
    ids = torch.randint(0, E, (N, k), generator=g)
    order, inv, _ = sort_assignments_reference(ids, E)
    ys = torch.randn(N * k, D, generator=g)
    w = torch.rand(N, k, generator=g)
    shared = torch.randn(N, D, generator=g)
    y = torch.empty_like(ys)
    y[order] = ys
    want = (y.view(N, k, D) * w[..., None]).sum(1) + shared
    assert torch.allclose(combine_reference(ys, inv, w, shared, k, torch.float32), want, atol=1e-6)
    plain = combine_reference(ys, None, None, None, k, torch.float32)  # identity rows, unit weights
    assert torch.allclose(plain, ys.view(N, k, D).sum(1), atol=1e-6)


def test_swiglu_rows_reference():
    g, u = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.allclose(swiglu_rows_reference(g, u), g * torch.sigmoid(g) * u, atol=1e-6)
    assert swiglu_rows_reference(g.to(torch.bfloat16), u.to(torch.bfloat16)).dtype == torch.bfloat16


def test_grouped_mm_per_expert_groups():
    """The grouped GEMM wrapper (torch._grouped_mm, or its per-expert fallback) on groups incl. empty ones."""
    g = torch.Generator().manual_seed(12)
    E, K, Nn = 4, 16, 8
    counts = [3, 0, 5, 2]
    offsets = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)
    a = torch.randn(10, K, generator=g)
    b = torch.randn(E, Nn, K, generator=g)  # [E, N, K] like w_down, used transposed
    out = _grouped_mm(a, b.transpose(1, 2), offsets[1:].contiguous(), offsets)
    start = 0
    for e, c in enumerate(counts):
        assert torch.allclose(out[start:start + c], a[start:start + c] @ b[e].t(), atol=1e-4)
        start += c


def test_split_bf16x3_is_exact():
    g = torch.Generator().manual_seed(13)
    w = torch.cat([torch.randn(4096, generator=g) * 0.02, torch.randn(4096, generator=g) * 1e3,
                   torch.tensor([0.0, -0.0, 1.0, -3.0e-30, 7.0e30])])
    hi, mid, lo = split_bf16x3(w)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    assert torch.equal(hi.double() + mid.double() + lo.double(), w.double())


def test_router_logits_on_cpu_is_the_fp32_gemm():
    x = torch.randn(3000, 16).to(torch.bfloat16)  # many tokens, but on the CPU: the plain fp32 GEMM
    w = torch.randn(8, 16)
    assert torch.equal(router_logits(x, w), x.float() @ w.t())


class _TwinSortExtension:
    """Stands in for the CUDA extension's moe_sort (filled from the reference twin) so that the grouped path's
    Python orchestration - gather, packed gate/up split, SwiGLU, combine through the inverse permutation - runs on
    the CPU; SwiGLU and combine already fall back to their twins off the GPU."""

    @staticmethod
    def moe_sort(ids, E, k, counts, offsets, ends, sorted_a, inv, tok):
        order, inv_ref, off = sort_assignments_reference(ids, E)
        sorted_a.copy_(order)
        inv.copy_(inv_ref)
        tok.copy_(order // k)
        offsets.copy_(off)
        ends.copy_(off[1:])


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("with_shared", [True, False], ids=["shared", "no-shared"])
def test_grouped_path_orchestration_matches_twin_on_cpu(monkeypatch, packed, with_shared):
    from ringlinear.kernels import moe as M

    monkeypatch.setattr(M._build, "extension", lambda: _TwinSortExtension)
    E, I, D, N = SMALL.num_experts, 32, 24, 11
    wr, bias, wg, wu, wd, shared = _weights(E, I, D, 14)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(15))
    if packed:
        _, pg, pu = pack_gate_up(wg, wu)
        _, psg, psu = pack_gate_up(shared[0], shared[1])
        run_shared = (psg, psu, shared[2])
    else:
        pg, pu, run_shared = wg, wu, shared
    ids, w = route(x, wr, bias, SMALL)
    shared_h = M._shared_hidden(x, run_shared) if with_shared else None
    y = M._experts_grouped(x, (ids, w), pg, pu, wd, shared_h)
    want = moe_reference(x, wr, bias, wg, wu, wd, shared if with_shared else None, SMALL)
    assert y.shape == (N, D) and y.dtype == torch.bfloat16  # combine writes bf16 (x's dtype on the kernel path)
    assert torch.allclose(y.float(), want, rtol=2.0**-8, atol=1e-6)  # fp32 math, one final bf16 rounding (2^-9 rel)


def test_stream_twin_composes_to_the_moe_twin():
    """The stream path's twins (gate+up SwiGLU over gathered rows, down, combine) give the MoE twin's output."""
    torch.manual_seed(0)
    E, I, D, N, k = 16, 32, 64, 9, 4
    cfg = RouterConfig(num_experts=E, top_k=k, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    x = torch.randn(N, D).to(torch.bfloat16)
    wr = torch.randn(E, D) * 0.1
    wg, wu = (torch.randn(E, I, D) * 0.1).to(torch.bfloat16), (torch.randn(E, I, D) * 0.1).to(torch.bfloat16)
    wd = (torch.randn(E, D, I) * 0.1).to(torch.bfloat16)
    ids, w = route_reference(x.float() @ wr.t(), None, cfg)
    order, inv, offsets = sort_assignments_reference(ids, E)
    tok = (order // k).to(torch.int32)
    h = stream_gemm_reference(x, tok, wg, wu, offsets)
    ys = stream_gemm_reference(h, None, wd, None, offsets)
    y = combine_reference(ys, inv, w, None, k)
    y_ref = moe_reference(x, wr, None, wg, wu, wd, None, cfg)
    assert ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item() < 2e-2


def test_wide_config_picks_the_pass_width_by_mean_rows_and_keeps_given_arguments(monkeypatch):
    """The wide kernel's (ring slots, rows per pass): 256-row passes (4 slots, the only depth that fits them) from
    WIDE_LONG_PASS_MEAN_ROWS rows per expert on average, else 128 with WIDE_STAGES slots; what a caller gives is kept,
    a ring depth alone meaning 128-row passes."""
    monkeypatch.setattr(moe_mod, "WIDE_LONG_PASS_MEAN_ROWS", 192)
    monkeypatch.setattr(moe_mod, "WIDE_STAGES", 5)
    E = 257  # Ring-mini's routed experts and the shared one (pack_moe)
    assert wide_config(192 * E, E) == (4, 256)
    assert wide_config(192 * E - 1, E) == (5, 128)
    assert wide_config(8192 * 8, E) == (4, 256) and wide_config(4096 * 8, E) == (5, 128)
    assert wide_config(10**6, E, stages=5) == (5, 128)
    assert wide_config(10, E, pass_rows=256) == (4, 256)
    assert wide_config(10**6, E, pass_rows=128) == (5, 128)
    assert wide_config(10**6, E, stages=4, pass_rows=128) == (4, 128)


def test_tma_path_takes_each_gemm_by_mean_rows(monkeypatch):
    """The wide path's GEMMs move to moe_tma_gemm at their own mean rows per expert (the host knows A and E)."""
    monkeypatch.setattr(moe_mod, "TMA_GATE_UP_MIN_MEAN_ROWS", 384)
    monkeypatch.setattr(moe_mod, "TMA_DOWN_MIN_MEAN_ROWS", 16)
    E = 257
    assert tma_path(16 * E - 1, E) == (False, False)
    assert tma_path(16 * E, E) == (False, True)
    assert tma_path(384 * E - 1, E) == (False, True)
    assert tma_path(384 * E, E) == (True, True)
    assert tma_path(16384 * 8, E) == (True, True)  # a 16 384-token prompt step


def test_tma_gemm_falls_back_to_the_twin_and_checks_its_pairing():
    """Without CUDA tma_gemm is the twin; gather without w_up (or the reverse) is refused before anything runs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, generator=g).to(torch.bfloat16)
    w, w2 = (torch.randn(2, 8, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    offsets = torch.tensor([0, 4, 9], dtype=torch.int32)
    gather = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2], dtype=torch.int32)
    assert torch.equal(tma_gemm(x, gather, w, w2, offsets), stream_gemm_reference(x, gather, w, w2, offsets))
    xs = x[gather.long()]
    assert torch.equal(tma_gemm(xs, None, w, None, offsets), stream_gemm_reference(xs, None, w, None, offsets))
    with pytest.raises(ValueError, match="gather and w_up go together"):
        tma_gemm(x, gather, w, None, offsets)
