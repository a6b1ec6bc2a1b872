"""Fused MoE on the GPU: CUDA router (sigmoid + bias + group-limited top-k), CUDA assignment sort, and two expert
paths - decode (<= DECODE_MAX_TOKENS tokens): CUDA weight-streaming kernels that read only the selected experts;
prefill: tokens permuted by expert and two grouped GEMMs (torch._grouped_mm, CUTLASS on sm90) with SwiGLU between.
Twin: moe_reference.py. Without CUDA the wrappers run the twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _build
from .moe_reference import RING_MINI_ROUTER, RouterConfig, moe_reference, route_reference

DECODE_MAX_TOKENS = 64  # measured on H200: from 128 tokens the grouped-GEMM (tensor-core) path wins


def pack_experts(gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor]):
    """Stack per-expert checkpoint tensors ([I, D], [I, D], [D, I]) into the kernels' [E, I, D] / [E, D, I] layout."""
    if not (len(gate) == len(up) == len(down) and gate):
        raise ValueError("pack_experts: gate/up/down lists must be non-empty and of equal length")
    return torch.stack(gate).contiguous(), torch.stack(up).contiguous(), torch.stack(down).contiguous()


def _check(x, router_weight, w_gate, w_up, w_down, cfg: RouterConfig):
    cfg.validate()
    if x.dim() != 2:
        raise ValueError(f"moe: x must be [N, D], got {tuple(x.shape)}")
    N, D = x.shape
    E = cfg.num_experts
    if router_weight.shape != (E, D):
        raise ValueError(f"moe: router_weight must be [{E}, {D}], got {tuple(router_weight.shape)}")
    if w_gate.dim() != 3 or w_gate.shape[0] != E or w_gate.shape[2] != D or w_up.shape != w_gate.shape:
        raise ValueError(f"moe: w_gate/w_up must be [{E}, I, {D}], got {tuple(w_gate.shape)} / {tuple(w_up.shape)}")
    if w_down.shape != (E, D, w_gate.shape[1]):
        raise ValueError(f"moe: w_down must be [{E}, {D}, {w_gate.shape[1]}], got {tuple(w_down.shape)}")


def route(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor | None,
          cfg: RouterConfig = RING_MINI_ROUTER):
    """Router in fp32: logits = x W^T, then selection. Returns (ids int32 [N, k], weights fp32 [N, k])."""
    logits = x.float() @ router_weight.float().t()
    if logits.is_cuda and _build.available():
        N = x.shape[0]
        ids = torch.empty(N, cfg.top_k, dtype=torch.int32, device=x.device)
        w = torch.empty(N, cfg.top_k, dtype=torch.float32, device=x.device)
        _build.extension().moe_route(
            logits.contiguous(), None if expert_bias is None else expert_bias.float().contiguous(),
            cfg.n_group, cfg.topk_group, cfg.top_k, cfg.norm_topk_prob, float(cfg.routed_scaling_factor), ids, w,
        )
        return ids, w
    ids, w = route_reference(logits, expert_bias, cfg)
    return ids.to(torch.int32), w


def _shared(x, shared):
    if shared is None:
        return None
    g, u, d = shared
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d).float()


def _experts_decode(x, ids, w, w_gate, w_up, w_down):
    ext = _build.extension()
    N, D = x.shape
    k = ids.shape[1]
    E, I = w_gate.shape[0], w_gate.shape[1]
    A = N * k
    offsets = torch.empty(E + 1, dtype=torch.int32, device=x.device)
    order = torch.empty(A, dtype=torch.int32, device=x.device)
    active = torch.empty(E + 1, dtype=torch.int32, device=x.device)
    ext.moe_align(ids.reshape(-1).contiguous(), E, offsets, order, active)
    h = torch.empty(A, I, dtype=torch.bfloat16, device=x.device)
    y = torch.empty(A, D, dtype=torch.float32, device=x.device)
    ext.moe_experts_decode(x.contiguous(), w_gate, w_up, w_down, offsets, order, active, w.reshape(-1).contiguous(), k, h, y)
    return y.view(N, k, D).sum(1)


def _grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor):
    """a [M, K] rows grouped by expert, b_t [E, K, N] (a transposed view) -> [M, N].

    torch._grouped_mm (one CUTLASS grouped GEMM on sm90) when this torch has it, else one GEMM per expert."""
    if hasattr(torch, "_grouped_mm"):
        try:
            return torch._grouped_mm(a, b_t, offs=offs)
        except RuntimeError:  # e.g. a torch/GPU combination without the sm90 kernel
            pass
    counts = counts.tolist()
    out = a.new_empty(a.shape[0], b_t.shape[2])
    start = 0
    for e, c in enumerate(counts):
        if c:
            out[start : start + c] = a[start : start + c] @ b_t[e]
        start += c
    return out


def _experts_grouped(x, ids, w, w_gate, w_up, w_down):
    N, D = x.shape
    k = ids.shape[1]
    E = w_gate.shape[0]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[order // k]
    g = _grouped_mm(xs, w_gate.transpose(1, 2), offs, counts)
    u = _grouped_mm(xs, w_up.transpose(1, 2), offs, counts)
    h = (F.silu(g.float()) * u.float()).to(x.dtype)
    ys = _grouped_mm(h, w_down.transpose(1, 2), offs, counts)
    y = torch.empty(N * k, D, dtype=ys.dtype, device=x.device)
    y[order] = ys
    return (y.view(N, k, D).float() * w[..., None]).sum(1)


def fused_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    cfg: RouterConfig = RING_MINI_ROUTER,
    *,
    path: str = "auto",
) -> torch.Tensor:
    """MoE block forward: x [N, D] bf16 -> [N, D] in x's dtype. path: "auto" | "decode" | "grouped"."""
    _check(x, router_weight, w_gate, w_up, w_down, cfg)
    if path not in ("auto", "decode", "grouped"):
        raise ValueError(f"fused_moe: path must be auto, decode or grouped, got {path!r}")
    if not (x.is_cuda and _build.available() and x.dtype == torch.bfloat16 and w_gate.dtype == torch.bfloat16):
        return moe_reference(x, router_weight, expert_bias, w_gate, w_up, w_down, shared, cfg).to(x.dtype)
    ids, w = route(x, router_weight, expert_bias, cfg)
    use_decode = path == "decode" or (path == "auto" and x.shape[0] <= DECODE_MAX_TOKENS)
    experts = (_experts_decode if use_decode else _experts_grouped)(x, ids, w, w_gate, w_up, w_down)
    s = _shared(x, shared)
    return (experts if s is None else experts + s).to(x.dtype)


__all__ = ["fused_moe", "route", "pack_experts", "DECODE_MAX_TOKENS", "RouterConfig", "RING_MINI_ROUTER"]
