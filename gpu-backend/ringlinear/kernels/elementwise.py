"""Fused per-token elementwise kernels of the attention layers, each beside its twin (elementwise_reference.py).

    qkv_prologue          the fused QKV projection's output -> [silu] -> per-head QK RMSNorm -> partial NeoX RoPE
                          -> q, k, v [N, H, d], in one pass over the rows instead of ~15 eager launches
    gated_group_rmsnorm   lightning output -> group RMSNorm * sigmoid(gate) -> out dtype, in one pass
    add_rms_norm          residual add + the next RMSNorm (s = x + delta; rms_norm(s)) in one pass, both outputs

Arguments are validated (ValueError naming the argument) before any work. On CUDA with the extension the kernel runs
(head_dim 64/128; group width a multiple of 4 channels, C <= 8192; add_rms_norm rows of whole 16-byte vectors,
D <= 8192; fp16/bf16/fp32 tensors); anything else (CPU, fp64
golden runs, other shapes) runs the twin, so callers never branch. Neither path synchronises with the host, so both
can be captured in CUDA graphs.
"""

from __future__ import annotations

import math
import operator

import torch

from . import _build
from ..ops.rope import rope_cos_sin as _rope_tables
from .elementwise_reference import add_rms_norm_reference, gated_group_rmsnorm_reference, qkv_prologue_reference

PROLOGUE_HEAD_DIMS = (64, 128)
GATE_MAX_CHANNELS = 8192  # csrc: 256 threads x 8 float4 vectors per row
ADD_NORM_MAX_DIM = 8192  # csrc kAddNormMaxDim: 256 threads x <= 4 (16-bit) / 8 (fp32) 16-byte vectors per row
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NORM_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc kNormF32 / kNormBF16 / kNormF16
_DTYPES = _KERNEL_DTYPES + (torch.float64,)


def _int(name: str, fn: str, value, lo: int) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{fn}: {name} must be an int, got {type(value).__name__}") from None
    if isinstance(value, bool) or v < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {value!r}")
    return v


def _float(name: str, fn: str, value, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: {name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{fn}: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _tensor(name: str, fn: str, t, dim: int, device: torch.device | None = None, floating: bool = True):
    if not torch.is_tensor(t) or t.dim() != dim:
        raise ValueError(f"{fn}: {name} must be a {dim}-d tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if floating and t.dtype not in _DTYPES:
        raise ValueError(f"{fn}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device}")
    return t


def _dtype(name: str, fn: str, dtype) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"{fn}: {name} must be one of {[str(d) for d in _DTYPES]}, got {dtype!r}")
    return dtype


def _aligned_rows(t: torch.Tensor, row_align: int) -> torch.Tensor:
    """t with unit column stride, a 16-byte aligned base and row strides a multiple of row_align elements."""
    if t.stride(-1) != 1 or t.stride(0) % row_align or t.data_ptr() % 16:
        t = t.contiguous()
        if t.data_ptr() % 16:  # a contiguous view at an odd offset
            t = t.clone()
    return t


def _weight_f32(w: torch.Tensor | None) -> torch.Tensor | None:
    if w is None:
        return None
    w = w.to(torch.float32).contiguous()
    return w.clone() if w.data_ptr() % 16 else w


def _rope_table_args(fn: str, rope_cos_sin, N: int, rot: int, dev: torch.device) -> list[torch.Tensor] | None:
    """A caller's (cos, sin) of ops.rope_cos_sin, checked and as the kernels read them: contiguous fp32 [N, rot]."""
    if rope_cos_sin is None or not rot:
        return None
    if len(rope_cos_sin) != 2:
        raise ValueError(f"{fn}: rope_cos_sin must be the (cos, sin) pair of ops.rope_cos_sin")
    tables = []
    for name, t in zip(("cos", "sin"), rope_cos_sin):
        if not (torch.is_tensor(t) and t.is_floating_point() and t.device == dev and t.dim() >= 1
                and t.shape[-1] == rot and t.numel() == N * rot):
            raise ValueError(f"{fn}: rope_cos_sin {name} must be a float tensor [..., {N}, {rot}] on {dev}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        tables.append(t.reshape(N, rot).to(torch.float32).contiguous())
    return tables


def _use_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and _build.available()


# ---------------------------------------------------------------------------------------------------------------
def qkv_prologue(
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
    rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    out: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
    v_in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection qkv [N, (Hq + 2 Hkv) d] (q heads, then k heads, then v heads) into q [N, Hq, d],
    k [N, Hkv, d], v [N, Hkv, d] (contiguous, out_dtype), computing in fp32:

        x = qkv.float(); if silu: x = silu(x)          (all of q, k, v)
        q, k = RMSNorm per head * q_norm_weight / k_norm_weight   (skipped where the weight is None)
        q, k = NeoX RoPE on the first rotary_dim dims at positions [N] (int, on qkv's device; 0 = no RoPE)

    exactly as ops.rms_norm / ops.rope_cos_sin / ops.apply_partial_rope (angles in fp64). norm_dtype: the dtype
    the QK-norm rounds to, as ops.rms_norm does in its input's dtype. None (default) = fp32: the lightning layers,
    which cast the projection to fp32 first. The softmax layers normalise the bf16 projection itself: pass
    norm_dtype=qkv.dtype there to reproduce model.py bit for bit (the fp32 norm differs by <= 1 bf16 ulp). The kernel
    takes these two; another norm dtype runs the twin.
    rope_cos_sin: ops.rope_cos_sin(positions, rotary_dim, rope_theta) for these positions ([..., N, rotary_dim]
    each), when the caller has it (the runner computes it once per step for every layer); without it the tables are
    built here from positions (the kernel reads its angles from them). Same values either way.
    kv_cache: (K, V, rows) with K, V [R, Hkv, d] contiguous caches of out_dtype and rows int [N] (distinct, < R): k and
    v go straight to K[rows], V[rows] (one kernel instead of the prologue and two index_put copies); the returned k
    and v are then K and V themselves.
    v_in_place: return v as a view of qkv's v columns ([N, Hkv, d], token stride qkv.stride(0)) instead of a copy: v
    is qkv's own values when there is no silu and out_dtype is qkv's dtype (both required), and the lightning prefill
    kernel reads such a view in place - a third of the prologue's traffic saved. Not with kv_cache or an out v.
    out: (q, k, v) buffers to write instead of new tensors (contiguous, out_dtype, the shapes above; k and v None
    with kv_cache): a step replayed from CUDA graphs keeps them at fixed addresses.
    """
    fn = "qkv_prologue"
    _tensor("qkv", fn, qkv, 2)
    dev = qkv.device
    Hq = _int("num_q_heads", fn, num_q_heads, 1)
    Hkv = _int("num_kv_heads", fn, num_kv_heads, 1)
    d = _int("head_dim", fn, head_dim, 1)
    N, W = qkv.shape
    if W != (Hq + 2 * Hkv) * d:
        raise ValueError(f"{fn}: qkv has {W} columns, expected (num_q_heads + 2 * num_kv_heads) * head_dim = "
                         f"{(Hq + 2 * Hkv) * d}")
    _tensor("positions", fn, positions, 1, dev, floating=False)
    if positions.shape[0] != N or positions.dtype.is_floating_point or positions.dtype.is_complex \
            or positions.dtype == torch.bool:
        raise ValueError(f"{fn}: positions must be an integer tensor [{N}], got {positions.dtype} {tuple(positions.shape)}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            _tensor(name, fn, w, 1, dev)
            if w.shape[0] != d:
                raise ValueError(f"{fn}: {name} must be [{d}], got {tuple(w.shape)}")
    if not isinstance(silu, bool):
        raise ValueError(f"{fn}: silu must be a bool, got {silu!r}")
    eps = _float("eps", fn, eps)
    rot = _int("rotary_dim", fn, rotary_dim, 0)
    if rot % 2 or rot > d:
        raise ValueError(f"{fn}: rotary_dim must be even and <= head_dim ({d}), got {rot}")
    theta = _float("rope_theta", fn, rope_theta, positive=True) if rot else 0.0  # unused without RoPE
    _dtype("out_dtype", fn, out_dtype)
    if norm_dtype is not None:
        _dtype("norm_dtype", fn, norm_dtype)
    tables = _rope_table_args(fn, rope_cos_sin, N, rot, dev)

    if kv_cache is not None:
        K, V, rows = kv_cache
        for name, c in (("K", K), ("V", V)):
            if not (torch.is_tensor(c) and c.dim() == 3 and tuple(c.shape[1:]) == (Hkv, d) and c.dtype == out_dtype
                    and c.device == dev and c.is_contiguous()):
                raise ValueError(f"{fn}: kv_cache {name} must be a contiguous {out_dtype} [rows, {Hkv}, {d}] on {dev}")
        _tensor("kv_cache rows", fn, rows, 1, dev, floating=False)
        if rows.shape[0] != N or rows.dtype.is_floating_point or rows.dtype == torch.bool or K.shape != V.shape:
            raise ValueError(f"{fn}: kv_cache rows must be an integer tensor [{N}] and K, V of one shape")

    bufs = (None, None, None) if out is None else tuple(out)
    if len(bufs) != 3:
        raise ValueError(f"{fn}: out must be a (q, k, v) tuple")
    if not isinstance(v_in_place, bool):
        raise ValueError(f"{fn}: v_in_place must be a bool, got {v_in_place!r}")
    if v_in_place:
        if silu or out_dtype != qkv.dtype or kv_cache is not None or bufs[2] is not None:
            raise ValueError(f"{fn}: v_in_place needs silu=False, out_dtype == qkv.dtype ({qkv.dtype}), no kv_cache "
                             "and no out v: v is then qkv's own columns")
        bufs = (bufs[0], bufs[1], qkv[:, (Hq + Hkv) * d:].unflatten(1, (Hkv, d)))
    for name, b, heads in zip(("q", "k", "v"), bufs, (Hq, Hkv, Hkv)):
        if b is None:
            if out is not None and (name == "q" or kv_cache is None):
                raise ValueError(f"{fn}: out {name} is missing")
            continue
        if v_in_place and name == "v":
            continue
        if kv_cache is not None and name != "q":
            raise ValueError(f"{fn}: out {name} must be None with kv_cache (k and v go to the cache)")
        if not (torch.is_tensor(b) and tuple(b.shape) == (N, heads, d) and b.dtype == out_dtype and b.device == dev
                and b.is_contiguous()):
            raise ValueError(f"{fn}: out {name} must be a contiguous {out_dtype} [{N}, {heads}, {d}] on {dev}")

    kernel_ok = (d in PROLOGUE_HEAD_DIMS and qkv.dtype in _KERNEL_DTYPES and out_dtype in _KERNEL_DTYPES
                 and (norm_dtype is None or norm_dtype in (torch.float32, qkv.dtype)))
    if not (kernel_ok and _use_cuda(qkv)):
        q, k, v = qkv_prologue_reference(qkv, positions, Hq, Hkv, d, silu=silu, q_norm_weight=q_norm_weight,
                                         k_norm_weight=k_norm_weight, eps=eps, rotary_dim=rot, rope_theta=theta,
                                         out_dtype=out_dtype, norm_dtype=norm_dtype)
        if kv_cache is not None:
            K[rows], V[rows] = k, v
            k, v = K, V
        res = []
        for t, b in zip((q, k, v), bufs[:2]):
            res.append(t if b is None else b.copy_(t))
        return (*res, bufs[2] if v_in_place else (v if bufs[2] is None else bufs[2].copy_(v)))
    q = torch.empty(N, Hq, d, dtype=out_dtype, device=dev) if bufs[0] is None else bufs[0]
    if kv_cache is None:
        k = torch.empty(N, Hkv, d, dtype=out_dtype, device=dev) if bufs[1] is None else bufs[1]
        v = torch.empty(N, Hkv, d, dtype=out_dtype, device=dev) if bufs[2] is None else bufs[2]
    else:
        k, v = K, V
    if N == 0:
        return q, k, v
    if rot and tables is None:  # the kernel reads the angles from tables: the ones the runner builds once per step
        tables = _rope_tables(positions, rot, theta, torch.float32)
    _build.extension().qkv_prologue(
        _aligned_rows(qkv, 16 // qkv.element_size()),
        _weight_f32(q_norm_weight),
        _weight_f32(k_norm_weight),
        q, k, None if v_in_place else v,
        silu,
        _NORM_CODES[norm_dtype or torch.float32],
        eps,
        rot,
        *(tables or (None, None)),
        None if kv_cache is None else rows.to(torch.int64).contiguous(),
    )
    return q, k, v


# ---------------------------------------------------------------------------------------------------------------
def gated_group_rmsnorm(
    o: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    eps: float,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """ops.group_rms_norm(o, weight, groups, eps) * sigmoid(gate.float()) in out_dtype [N, C].

    o [N, C] (the attention output: fp32, or bf16 straight from the prefill kernel - read as fp32), gate [N, C] (the
    gate projection, any float dtype), weight [C]. `groups` is the NUMBER of contiguous groups (C / groups channels
    each), the meaning of ops.group_rms_norm's argument and of the config's group_norm_size (Ring-mini: 4 groups of
    512 channels).
    """
    fn = "gated_group_rmsnorm"
    _tensor("o", fn, o, 2)
    dev = o.device
    N, C = o.shape
    _tensor("gate", fn, gate, 2, dev)
    if gate.shape != o.shape:
        raise ValueError(f"{fn}: gate must have o's shape {tuple(o.shape)}, got {tuple(gate.shape)}")
    _tensor("weight", fn, weight, 1, dev)
    if weight.shape[0] != C:
        raise ValueError(f"{fn}: weight must be [{C}], got {tuple(weight.shape)}")
    G = _int("groups", fn, groups, 1)
    if C % G:
        raise ValueError(f"{fn}: groups={G} must divide the {C} channels")
    eps = _float("eps", fn, eps)
    _dtype("out_dtype", fn, out_dtype)

    kernel_ok = (o.dtype in _KERNEL_DTYPES and gate.dtype in _KERNEL_DTYPES and out_dtype in _KERNEL_DTYPES
                 and (C // G) % 4 == 0 and C <= GATE_MAX_CHANNELS)
    if not (kernel_ok and _use_cuda(o)):
        return gated_group_rmsnorm_reference(o, gate, weight, G, eps, out_dtype)
    out = torch.empty(N, C, dtype=out_dtype, device=dev)
    if N == 0:
        return out
    _build.extension().gated_group_rmsnorm(_aligned_rows(o, 4), _aligned_rows(gate, 4), _weight_f32(weight), out,
                                           G, eps)
    return out


# ---------------------------------------------------------------------------------------------------------------
def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, normed) with s = x + delta and normed = ops.rms_norm(s, weight, eps), in one pass over the rows.

    x [N, D] (a 2-d view of the residual stream), delta None or [N, D] of x's dtype (the attention / MLP output),
    weight [D] (cast to x's dtype as ops.rms_norm does). s is torch's `x + delta` bit for bit (fp32 sum, one rounding
    to x's dtype), contiguous; without delta s is x itself, not a copy. normed is contiguous in x's dtype and follows
    ops.rms_norm's roundings (s * rsqrt(mean(s^2) + eps) rounded to x's dtype, then times the weight, rounded); only
    the fp32 sum of squares is reduced in another order than torch's, so it may differ from the twin by one ulp.
    """
    fn = "add_rms_norm"
    _tensor("x", fn, x, 2)
    dev = x.device
    N, D = x.shape
    if delta is not None:
        _tensor("delta", fn, delta, 2, dev)
        if delta.shape != x.shape or delta.dtype != x.dtype:
            raise ValueError(f"{fn}: delta must be {x.dtype} {tuple(x.shape)} like x, got {delta.dtype} "
                             f"{tuple(delta.shape)}")
    _tensor("weight", fn, weight, 1, dev)
    if weight.shape[0] != D:
        raise ValueError(f"{fn}: weight must be [{D}], got {tuple(weight.shape)}")
    eps = _float("eps", fn, eps)

    vec = 16 // x.element_size()
    kernel_ok = x.dtype in _KERNEL_DTYPES and D % vec == 0 and D <= ADD_NORM_MAX_DIM
    if not (kernel_ok and _use_cuda(x)):
        return add_rms_norm_reference(x, delta, weight, eps)
    s = x if delta is None else torch.empty(N, D, dtype=x.dtype, device=dev)
    y = torch.empty(N, D, dtype=x.dtype, device=dev)
    if N == 0:
        return s, y
    w = weight.to(x.dtype).contiguous()
    if w.data_ptr() % 16:
        w = w.clone()
    _build.extension().add_rms_norm(
        _aligned_rows(x, vec),
        None if delta is None else _aligned_rows(delta, vec),
        w,
        None if delta is None else s,
        y,
        eps,
    )
    return s, y
