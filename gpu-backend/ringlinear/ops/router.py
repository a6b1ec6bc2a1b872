"""The MoE router: fp32 sigmoid scores, bias for selection only, group-limited top-k, normalised weights."""

import torch


def route(logits: torch.Tensor, expert_bias: torch.Tensor | None, n_group: int, topk_group: int, top_k: int,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """logits: [N, E] (computed in fp32 or wider). Returns (expert ids [N, k] int64, weights [N, k]).

    Ties are broken towards the lower expert / group index (stable sort), so every engine can agree.
    """
    N, E = logits.shape
    scores = torch.sigmoid(logits)
    biased = scores + expert_bias.to(scores.dtype) if expert_bias is not None else scores
    per_group = E // n_group
    grouped = biased.view(N, n_group, per_group)
    group_score = grouped.sort(dim=-1, descending=True, stable=True).values[..., : min(2, per_group)].sum(-1)
    keep = group_score.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]  # [N, topk_group]
    group_mask = torch.zeros(N, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
    masked = biased.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), float("-inf"))
    ids = masked.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * routed_scaling_factor
