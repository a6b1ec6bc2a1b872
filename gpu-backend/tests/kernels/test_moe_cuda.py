"""GPU tests: MoE router / expert kernels against the reference twin (skipped without CUDA)."""

import pytest
import torch

from ringlinear.kernels.moe import fused_moe, route
from ringlinear.kernels.moe_reference import RING_MINI_ROUTER, RouterConfig, moe_reference, route_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WEIGHT_ATOL = 1e-5  # router weights: fp32 sigmoid in both
MOE_REL = 2e-2  # bf16 weights and activations, bf16 intermediate h, fp32 accumulation

SMALL = RouterConfig(num_experts=16, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)


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


def _moe_inputs(E, I, D, N, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.05).to(torch.bfloat16)  # noqa: E731
    x = (torch.randn(N, D, device="cuda", generator=g)).to(torch.bfloat16)
    wr = torch.randn(E, D, device="cuda", generator=g) * 0.05
    bias = torch.randn(E, device="cuda", generator=g) * 0.01
    return x, wr, bias, mk(E, I, D), mk(E, I, D), mk(E, D, I), (mk(I, D), mk(I, D), mk(D, I))


@pytest.mark.parametrize("path", ["decode", "grouped"])
@pytest.mark.parametrize(
    "shape", [(16, 128, 256, 1, SMALL), (16, 128, 256, 37, SMALL), (256, 512, 2048, 4, RING_MINI_ROUTER),
              (256, 512, 2048, 64, RING_MINI_ROUTER)], ids=["small-1", "small-37", "mini-4", "mini-64"]
)
def test_fused_moe_matches_twin(path, shape):
    E, I, D, N, cfg = shape
    x, wr, bias, wg, wu, wd, shared = _moe_inputs(E, I, D, N, seed=N + E)
    y = fused_moe(x, wr, bias, wg, wu, wd, shared, cfg, path=path)
    y_ref = moe_reference(x, wr, bias, wg, wu, wd, shared, cfg)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    rel = ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item()
    assert rel < MOE_REL, rel
