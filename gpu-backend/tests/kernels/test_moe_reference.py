"""CPU tests of the MoE reference twin (router and experts) and of fused_moe's validation / CPU fallback."""

import pytest
import torch
import torch.nn.functional as F

from ringlinear.kernels.moe import fused_moe, pack_experts, route
from ringlinear.kernels.moe_reference import RouterConfig, experts_touched_bytes, moe_reference, route_reference

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
