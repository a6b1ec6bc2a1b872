"""RMSNorm and the grouped RMSNorm of the lightning layers' output."""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * (x * rsqrt(mean(x^2) + eps)) over the last dim, normalised in >= fp32 and cast back to x's dtype first."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(x.dtype) * normed


def group_rms_norm(x: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """RMSNorm applied separately to `groups` contiguous slices of the last dim (no mean subtraction), then * weight.

    Differs from a plain RMSNorm over the whole dim unless every group has the same mean square.
    """
    *lead, n = x.shape
    if n % groups:
        raise ValueError(f"group_rms_norm: last dim {n} is not divisible by groups={groups}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = x.to(acc).reshape(*lead, groups, n // groups)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(acc) * xg.reshape(*lead, n).to(acc)
