"""Lightning attention: causal linear attention with a per-head constant decay, fp32 (or fp64) state.

    S_t = exp(-s_h) * S_{t-1} + k_t^T v_t          (state S: [d_k, d_v] per head)
    o_t = scale * q_t S_t                           (the token sees its own key)

Three forms of the same operator (fla's layout): `lightning_naive` is the spec (a loop over time),
`lightning_recurrent_step` is one decode step, `lightning_chunked` is the chunk-parallel prefill.
Shapes: q, k, v [B, T, H, d]; decay `s` [H] (positive rates); state [B, H, d_k, d_v].
"""

from __future__ import annotations

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _zero_state(q: torch.Tensor, v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    B, _, H, dk = q.shape
    return torch.zeros(B, H, dk, v.shape[-1], dtype=acc, device=q.device)


def lightning_naive(q, k, v, s, scale: float, initial_state: torch.Tensor | None = None):
    """Reference: one recurrent step per token. Returns (o [B,T,H,dv] in the accumulation dtype, final state)."""
    acc = _acc(q.dtype)
    S = _zero_state(q, v, acc) if initial_state is None else initial_state.to(acc).clone()
    o = torch.empty(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)
    for t in range(q.shape[1]):
        o[:, t], S = lightning_recurrent_step(q[:, t], k[:, t], v[:, t], s, scale, S)
    return o, S


def lightning_recurrent_step(q, k, v, s, scale: float, state: torch.Tensor):
    """One token per sequence. q, k, v: [B, H, d]; state [B, H, dk, dv]. Returns (o [B, H, dv], new state)."""
    acc = state.dtype
    gamma = torch.exp(-s.to(acc))[None, :, None, None]
    S = gamma * state + k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.to(acc) * scale, S)
    return o, S


def lightning_chunked(q, k, v, s, scale: float, initial_state: torch.Tensor | None = None, chunk_size: int = 64):
    """Chunk-parallel form: within a chunk a decay-masked (q k^T) v, across chunks the carried state.

    For chunk tokens i = 0..n-1 and incoming state S:
        o_i    = scale * (sum_{j<=i} g^(i-j) (q_i.k_j) v_j + g^(i+1) q_i S)
        S_next = g^n S + sum_j g^(n-1-j) k_j^T v_j
    """
    acc = _acc(q.dtype)
    B, T, H, dk = q.shape
    S = _zero_state(q, v, acc) if initial_state is None else initial_state.to(acc).clone()
    o = torch.empty(B, T, H, v.shape[-1], dtype=acc, device=q.device)
    rate = s.to(acc).to(q.device)[:, None]  # [H, 1]
    for c0 in range(0, T, chunk_size):
        qc = q[:, c0:c0 + chunk_size].to(acc).transpose(1, 2) * scale  # [B, H, n, dk]
        kc = k[:, c0:c0 + chunk_size].to(acc).transpose(1, 2)
        vc = v[:, c0:c0 + chunk_size].to(acc).transpose(1, 2)
        n = qc.shape[2]
        i = torch.arange(n, device=q.device, dtype=acc)
        diff = i[:, None] - i[None, :]
        mask = torch.exp(-rate[:, :, None] * diff.clamp(min=0)) * (diff >= 0)  # [H, n, n]
        intra = ((qc @ kc.transpose(-1, -2)) * mask) @ vc
        inter = (qc * torch.exp(-rate * (i + 1))[..., None]) @ S
        o[:, c0:c0 + n] = (intra + inter).transpose(1, 2)
        k_decayed = kc * torch.exp(-rate * (n - 1 - i))[..., None]
        S = torch.exp(-rate * n)[..., None] * S + k_decayed.transpose(-1, -2) @ vc
    return o, S
