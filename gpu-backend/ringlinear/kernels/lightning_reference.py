"""Plain PyTorch twins of the lightning-attention kernels (the readable spec the CUDA kernels are tested against).

Shapes: q, k, v [T, H, d] per packed batch (decode: [B, H, d]); state pool [slots, H, d_k, d_v] fp32; gamma [H] is
the per-head multiplicative decay exp(-slope_h * layer_factor). Math (architecture doc §3.1):

    S_t = gamma * S_{t-1} + k_t^T v_t          o_t = (d^-1/2 q_t) S_t   (the updated state)

Everything is computed in the inputs' float precision upcast to at least fp32 (pass float64 for a tighter twin).
"""

from __future__ import annotations


import torch


def _work_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def rope_inv_freq(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/r), i < r/2, in fp32 exactly as the reference model builds it."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim, in x's (float) dtype."""
    return weight.to(x.dtype) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_neox_partial(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE on the first 2*len(inv_freq) dims of x [N, H, d]; positions [N]."""
    half = inv_freq.numel()
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :].to(torch.float32)  # fp32 like the model
    cos, sin = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half :]], dim=-1)


def lightning_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    slots: torch.Tensor,
    gamma: torch.Tensor,
    *,
    scale: float | None = None,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    positions: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step for B requests; updates state[slots] in place and returns o [B, H, d] (fp32/fp64).

    slots < 0 are padding rows: their output is zero and no state is touched.
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    wd = _work_dtype(q, state)
    qf, kf, vf = q.to(wd), k.to(wd), v.to(wd)
    if q_norm_weight is not None:
        qf = rms_norm_heads(qf, q_norm_weight, eps)
    if k_norm_weight is not None:
        kf = rms_norm_heads(kf, k_norm_weight, eps)
    if inv_freq is not None and inv_freq.numel() > 0:
        qf = rope_neox_partial(qf, positions, inv_freq)
        kf = rope_neox_partial(kf, positions, inv_freq)
    out = torch.zeros(q.shape, dtype=wd, device=q.device)
    valid = (slots >= 0).nonzero().flatten()
    if valid.numel() == 0:
        return out
    sl = slots[valid].long()
    S = state[sl].to(wd)
    S = gamma.to(wd)[None, :, None, None] * S + kf[valid][..., :, None] * vf[valid][..., None, :]
    state[sl] = S.to(state.dtype)
    out[valid] = torch.einsum("bhd,bhde->bhe", qf[valid] * scale, S)
    return out


def lightning_recurrent_reference(q, k, v, gamma, scale=None, initial_state=None):
    """Token-by-token recurrence for one sequence: q,k,v [T, H, d] -> (o [T, H, d], final state [H, d, d])."""
    T, H, d = q.shape
    scale = d**-0.5 if scale is None else scale
    wd = _work_dtype(q, *(x for x in [initial_state] if x is not None))
    S = torch.zeros(H, d, d, dtype=wd, device=q.device) if initial_state is None else initial_state.to(wd).clone()
    g = gamma.to(wd)[:, None, None]
    qf, kf, vf = q.to(wd), k.to(wd), v.to(wd)
    out = torch.empty(T, H, d, dtype=wd, device=q.device)
    for t in range(T):
        S = g * S + kf[t][:, :, None] * vf[t][:, None, :]
        out[t] = torch.einsum("hd,hde->he", qf[t] * scale, S)
    return out, S


def lightning_chunked_reference(q, k, v, gamma, scale=None, initial_state=None, chunk: int = 64):
    """Chunked form (the algorithm of the prefill kernel), same contract as lightning_recurrent_reference."""
    T, H, d = q.shape
    scale = d**-0.5 if scale is None else scale
    wd = _work_dtype(q, *(x for x in [initial_state] if x is not None))
    S = torch.zeros(H, d, d, dtype=wd, device=q.device) if initial_state is None else initial_state.to(wd).clone()
    lg = torch.log(gamma.to(wd))[:, None, None]  # [H, 1, 1]
    qf, kf, vf = (x.to(wd).transpose(0, 1) for x in (q, k, v))  # [H, T, d]
    out = torch.empty(H, T, d, dtype=wd, device=q.device)
    for c0 in range(0, T, chunk):
        Q, K, V = qf[:, c0 : c0 + chunk], kf[:, c0 : c0 + chunk], vf[:, c0 : c0 + chunk]
        L = Q.shape[1]
        idx = torch.arange(L, device=q.device, dtype=wd)
        diff = idx[:, None] - idx[None, :]  # t - s
        decay = torch.exp(lg * diff.clamp(min=0)) * (diff >= 0)
        O = ((Q @ K.transpose(-1, -2)) * decay) @ V + torch.exp(lg * (idx[None, :, None] + 1)) * (Q @ S)
        out[:, c0 : c0 + L] = O * scale
        S = torch.exp(lg * L) * S + (K * torch.exp(lg * (L - 1 - idx)[None, :, None])).transpose(-1, -2) @ V
    return out.transpose(0, 1), S


def lightning_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens,
    slots,
    gamma: torch.Tensor,
    *,
    scale: float | None = None,
    use_initial_state=None,
    chunk: int = 64,
) -> torch.Tensor:
    """Varlen prefill twin: sequence n = tokens cu_seqlens[n]:cu_seqlens[n+1]; its initial state is state[slots[n]]
    when use_initial_state[n] (default: all True) else zeros; its final state is written to state[slots[n]].
    Returns o [T, H, d] in fp32 (fp64 for fp64 inputs)."""
    cu = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    sl = [int(x) for x in (slots.tolist() if torch.is_tensor(slots) else slots)]
    n = len(cu) - 1
    use = [True] * n if use_initial_state is None else [bool(x) for x in (use_initial_state.tolist() if torch.is_tensor(use_initial_state) else use_initial_state)]
    wd = _work_dtype(q, state)
    out = torch.empty(q.shape, dtype=wd, device=q.device)
    for i in range(n):
        a, b = cu[i], cu[i + 1]
        init = state[sl[i]] if use[i] else None
        o, S = lightning_chunked_reference(q[a:b], k[a:b], v[a:b], gamma, scale, init, chunk)
        out[a:b] = o
        state[sl[i]] = S.to(state.dtype)
    return out


def lightning_flops(total_tokens: int, heads: int, d: int, chunk: int = 64) -> float:
    """Nominal FLOPs of a chunked lightning prefill (the count gpu-peers.md uses): 4*T*d^2 + 4*T*C*d per head."""
    return heads * (4.0 * total_tokens * d * d + 4.0 * total_tokens * chunk * d)


def prefill_dram_bytes(total_tokens: int, heads: int, d: int, state_pass_tokens: int = 0) -> int:
    """Minimal DRAM traffic of a prefill (bf16 q, k, v read and o written once), plus k and v read again for the tokens
    that a state pass walks (a split sequence's blocks before its last; 0 for a single pass). The fp32 states between
    the passes stay in L2 and are not counted; neither are k and v the L2 still holds when the output pass reads them."""
    return 2 * heads * d * (4 * total_tokens + 2 * state_pass_tokens)


def decode_state_bytes(batch: int, heads: int, d: int) -> int:
    """Minimal HBM traffic of one decode step: the fp32 state read and written once per request."""
    return 2 * batch * heads * d * d * 4


__all__ = [
    "rope_inv_freq",
    "rms_norm_heads",
    "rope_neox_partial",
    "lightning_decode_reference",
    "lightning_recurrent_reference",
    "lightning_chunked_reference",
    "lightning_prefill_reference",
    "lightning_flops",
    "prefill_dram_bytes",
    "decode_state_bytes",
]
