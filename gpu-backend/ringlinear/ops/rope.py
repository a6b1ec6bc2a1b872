"""Partial NeoX (rotate-half) rotary embedding on the first `rot_dim` dims of each head."""

import torch


def rope_cos_sin(positions: torch.Tensor, rot_dim: int, theta: float, dtype=torch.float32):
    """cos, sin of shape [*positions.shape, rot_dim], halves duplicated (NeoX layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64, device=positions.device) / rot_dim))
    ang = positions.to(torch.float64)[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, d]; cos/sin: [B or 1, T, r]. Rotates x[..., :r], passes the rest through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    c, s = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * c + rotated * s, rest], dim=-1)
