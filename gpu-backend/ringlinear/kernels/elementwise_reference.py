"""Plain PyTorch twins of the fused elementwise kernels (csrc/fused_elementwise.cu).

Both are compositions of the `ringlinear.ops` functions in the order `engine/runner.py` and `model.py` apply them, so
they are the reference model's semantics by construction:

    qkv_prologue_reference         x = qkv in the compute dtype (fp32; fp64 for fp64 input); [silu]; round to norm_dtype;
                                   q, k = ops.rms_norm per head (if a weight is given); q, k = ops.apply_partial_rope
                                   with ops.rope_cos_sin at `positions`; q, k, v cast to out_dtype
    gated_group_rmsnorm_reference  ops.group_rms_norm(o, weight, groups, eps) * sigmoid(gate in the compute dtype)
    add_rms_norm_reference         s = x + delta (torch's add in x's dtype; x itself without delta),
                                   ops.rms_norm(s, weight, eps): the runner's residual step and the next norm

`norm_dtype` exists because the two layer kinds normalise in different dtypes today: lightning layers cast the
projection to fp32 before QK-norm (norm_dtype = compute dtype, the default), softmax layers normalise the projection
in its own dtype (ops.rms_norm rounds the normalised value and the weight product to bf16; pass norm_dtype=qkv.dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import accum_dtype, apply_partial_rope, group_rms_norm, rms_norm, rope_cos_sin


def qkv_prologue_reference(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    silu: bool,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    rotary_dim: int,
    rope_theta: float,
    out_dtype: torch.dtype = torch.bfloat16,
    norm_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [N, (Hq + 2 Hkv) d] -> q [N, Hq, d], k [N, Hkv, d], v [N, Hkv, d] (contiguous, out_dtype)."""
    N = qkv.shape[0]
    acc = accum_dtype(qkv.dtype)
    x = qkv.to(acc)
    if silu:
        x = F.silu(x)
    x = x.to(norm_dtype or acc)
    q, k, v = x.view(1, N, num_q_heads + 2 * num_kv_heads, head_dim).split([num_q_heads, num_kv_heads, num_kv_heads], 2)
    if q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, eps)
    if rotary_dim:
        cos, sin = rope_cos_sin(positions[None], rotary_dim, rope_theta, acc)
        q, k = apply_partial_rope(q.to(acc), cos, sin), apply_partial_rope(k.to(acc), cos, sin)
    return tuple(t[0].to(out_dtype).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def gated_group_rmsnorm_reference(
    o: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    eps: float,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """o, gate [N, C] -> group_rms_norm(o) * sigmoid(gate) [N, C] in out_dtype; `groups` contiguous groups of C/groups."""
    acc = accum_dtype(o.dtype)
    return (group_rms_norm(o, weight, groups, eps) * torch.sigmoid(gate.to(acc))).to(out_dtype)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s, weight, eps)) with s = x + delta, or s = x itself (the same tensor) when delta is None."""
    s = x if delta is None else x + delta
    return s, rms_norm(s, weight, eps)


def add_rms_norm_bytes(N: int, D: int, dtype: torch.dtype, with_delta: bool) -> int:
    """Bytes the fused step must move: x (and delta) in, s (with delta) and the normed rows out."""
    return N * D * _size(dtype) * (4 if with_delta else 2)


def qkv_prologue_bytes(N: int, num_q_heads: int, num_kv_heads: int, head_dim: int, in_dtype: torch.dtype,
                       out_dtype: torch.dtype) -> int:
    """Bytes the fused prologue must move: the qkv rows in, positions in, q/k/v out (norm weights are negligible)."""
    W = (num_q_heads + 2 * num_kv_heads) * head_dim
    return N * (W * (_size(in_dtype) + _size(out_dtype)) + 8)


def gated_group_rmsnorm_bytes(N: int, C: int, gate_dtype: torch.dtype, out_dtype: torch.dtype,
                              o_dtype: torch.dtype = torch.float32) -> int:
    """Bytes the fused gate must move: o and gate in, the result out."""
    return N * C * (_size(o_dtype) + _size(gate_dtype) + _size(out_dtype))


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
