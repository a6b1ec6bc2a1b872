"""Plain PyTorch twin of the fused MoE (architecture doc §4): fp32 sigmoid router, expert bias for selection only,
group-limited top-k, normalised and scaled weights, SwiGLU experts and the always-on shared expert.

Expert weights are stacked: w_gate, w_up [E, I, D]; w_down [E, D, I] (see moe.pack_experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RouterConfig:
    num_experts: int = 256
    top_k: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True

    def validate(self) -> None:
        if self.num_experts % self.n_group:
            raise ValueError(f"RouterConfig: n_group {self.n_group} must divide num_experts {self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"RouterConfig: topk_group must be in 1..n_group, got {self.topk_group}")
        if self.num_experts // self.n_group < 2 and self.topk_group < self.n_group:
            raise ValueError("RouterConfig: group-limited routing needs at least 2 experts per group")
        if not 1 <= self.top_k <= self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"RouterConfig: top_k {self.top_k} exceeds the experts of the kept groups")


RING_MINI_ROUTER = RouterConfig()


def route_reference(logits: torch.Tensor, expert_bias: torch.Tensor | None, cfg: RouterConfig):
    """logits [N, E] (fp32) -> (ids int64 [N, k] sorted by biased score, weights fp32 [N, k])."""
    scores = torch.sigmoid(logits.float())
    biased = scores + (expert_bias.float() if expert_bias is not None else 0.0)
    N, E = biased.shape
    if cfg.topk_group < cfg.n_group:
        grouped = biased.view(N, cfg.n_group, E // cfg.n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, n_group]
        keep = group_score.topk(cfg.topk_group, dim=-1).indices
        gmask = torch.zeros(N, cfg.n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        biased = biased.masked_fill(~gmask.repeat_interleave(E // cfg.n_group, dim=1), float("-inf"))
    ids = biased.topk(cfg.top_k, dim=-1).indices
    w = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * cfg.routed_scaling_factor


def swiglu_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) in fp32 on (possibly bf16) weights."""
    xf = x.float()
    return F.linear(F.silu(F.linear(xf, w_gate.float())) * F.linear(xf, w_up.float()), w_down.float())


def moe_reference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    cfg: RouterConfig = RING_MINI_ROUTER,
) -> torch.Tensor:
    """x [N, D] -> y [N, D] (fp32): sum_i w_i Expert_{id_i}(x) + SharedExpert(x), one expert at a time."""
    logits = x.float() @ router_weight.float().t()
    ids, w = route_reference(logits, expert_bias, cfg)
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        y.index_add_(0, tok, w[tok, slot][:, None] * swiglu_reference(x[tok], w_gate[e], w_up[e], w_down[e]))
    if shared is not None:
        y += swiglu_reference(x, *shared)
    return y


def sort_assignments_reference(ids: torch.Tensor, num_experts: int):
    """ids [N, k] -> (sorted [A] assignment ids a = n*k + j grouped by expert, stable; inv [A] with inv[sorted[p]] = p;
    offsets [E+1] expert starts). Twin of the CUDA moe_sort."""
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return order, inv, offsets


def route_align_reference(logits: torch.Tensor, expert_bias: torch.Tensor | None, cfg: RouterConfig, append: int = -1,
                          num_experts_out: int | None = None):
    """Twin of the CUDA moe_route_align_small: route_reference's selection, then (append >= 0) one more column of
    expert `append` with weight 1, then the assignments sorted by expert. Returns (ids int32 [N, k'], weights fp32
    [N, k'], offsets [E'+1] expert starts, sorted [A] assignment ids ascending inside each expert, active [E'+1]: the
    experts with assignments ascending, their count last), E' = num_experts_out (default: the logits' experts)."""
    ids, w = route_reference(logits, expert_bias, cfg)
    N = ids.shape[0]
    if append >= 0:
        ids = torch.cat([ids, ids.new_full((N, 1), append)], 1)
        w = torch.cat([w, w.new_ones(N, 1)], 1)
    E_out = logits.shape[1] if num_experts_out is None else num_experts_out
    order, _, offsets = sort_assignments_reference(ids, E_out)
    counts = offsets[1:] - offsets[:-1]
    used = torch.nonzero(counts > 0)[:, 0]
    active = torch.zeros(E_out + 1, dtype=torch.int32, device=logits.device)
    active[: used.numel()] = used.to(torch.int32)
    active[E_out] = used.numel()
    return ids.to(torch.int32), w, offsets.to(torch.int32), order.to(torch.int32), active


def scatter_rows_reference(x: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    """xs [N*k, D] with xs[inv[n*k + j]] = x[n]: the token rows in expert-sorted order. Twin of moe_scatter_rows."""
    xs = x.new_empty(inv.numel(), x.shape[1])
    xs[inv.reshape(-1).long()] = x.repeat_interleave(top_k, 0)
    return xs


def swiglu_rows_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in fp32, rounded to g's dtype. Twin of the CUDA moe_swiglu."""
    return (F.silu(g.float()) * u.float()).to(g.dtype)


def stream_gemm_reference(x: torch.Tensor, gather: torch.Tensor | None, w: torch.Tensor, w_up: torch.Tensor | None,
                          offsets: torch.Tensor) -> torch.Tensor:
    """Twin of the CUDA moe_stream_gemm. Rows offsets[e]..offsets[e+1] (of x, or of x[gather]) belong to expert e:
    y = bf16(rows . w[e]^T) in fp32, or with w_up the SwiGLU bf16(silu(bf16(rows . w[e]^T)) * bf16(rows . w_up[e]^T))."""
    rows = x if gather is None else x[gather.long()]
    bounds = offsets.tolist()
    y = torch.zeros(rows.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    for e in range(len(bounds) - 1):
        s0, s1 = bounds[e], bounds[e + 1]
        if s1 <= s0:
            continue
        a = rows[s0:s1].float()
        g = (a @ w[e].float().t()).to(x.dtype)
        y[s0:s1] = g if w_up is None else swiglu_rows_reference(g, (a @ w_up[e].float().t()).to(x.dtype))
    return y


def combine_reference(ys: torch.Tensor, rows: torch.Tensor | None, w: torch.Tensor | None, shared: torch.Tensor | None,
                      top_k: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """out[n] = sum_j w[n*k+j] * ys[rows[n*k+j]] + shared[n] in fp32 (rows None = identity, w None = ones), rounded
    to out_dtype. Twin of the CUDA moe_combine."""
    A = ys.shape[0] if rows is None else rows.numel()
    idx = torch.arange(A, device=ys.device) if rows is None else rows.reshape(-1).long()
    y = ys.float()[idx].view(A // top_k, top_k, ys.shape[1])
    if w is not None:
        y = y * w.reshape(-1, top_k, 1).float()
    out = y.sum(1)
    if shared is not None:
        out = out + shared.float()
    return out.to(out_dtype)


def experts_touched_bytes(ids: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor) -> int:
    """HBM bytes of the distinct experts a batch selects (gate + up + down weights), the decode roofline numerator."""
    distinct = int(ids.unique().numel())
    per_expert = (2 * w_gate[0].numel() + w_down[0].numel()) * w_gate.element_size()
    return distinct * per_expert


__all__ = ["RouterConfig", "RING_MINI_ROUTER", "route_reference", "route_align_reference", "swiglu_reference", "moe_reference", "experts_touched_bytes",
           "sort_assignments_reference", "scatter_rows_reference", "swiglu_rows_reference", "combine_reference"]
