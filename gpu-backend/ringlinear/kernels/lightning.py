"""Lightning-attention CUDA kernels: decode step and varlen prefill, each beside its reference twin
(lightning_reference.py). On a machine without CUDA (or when the extension cannot be built) the wrappers run the
twin, so callers never need to branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.transfer import to_device
from . import _build
from .elementwise import _weight_f32, qkv_prologue
from .lightning_reference import (
    lightning_decode_reference,
    lightning_prefill_reference,
    rope_inv_freq,
)

CHUNK = 64  # tokens per tensor-core chunk inside the prefill kernel
SUPPORTED_HEAD_DIMS = (64, 128)
DECODE_COLS = 64  # state columns per decode block (64 or 32; 32 = twice the blocks, a shorter last wave)
# How far ahead (bytes of state, in launch order) each decode block prefetches into L2; 0 = off. H200, slot order,
# do_bench timing: 3.88 -> 4.02-4.04 TB/s at 256 requests, 3.30 -> 3.41-3.56 at 64; 6-8 MiB best at 64-512 requests,
# 12 MiB and more thrash the L2 (bench/decode_bandwidth.py --prefetch-mib). Read per call: decode graphs keep the
# value they were captured with.
DECODE_PREFETCH_BYTES = 8 << 20
JSPLIT = 1  # CTAs sharing one (block, head) at d=128, each owning d/JSPLIT state rows (2: each recomputes the scores; slower)
# Prefill block length L: the smallest (a multiple of CHUNK, at least MIN_BLOCK_CHUNKS chunks) whose output pass is one
# wave, heads x blocks <= SMs (one 8-warp CTA fits per SM), or one block per sequence when the sequences alone exceed
# that. H200 sweep (bench/sweep_prefill_block.py, H=16): best L = 512 / 1024 / 2048 / 4096 / 8192 / 16384 at
# T = 4k / 8k / 16k / 32k / 64k / 128k and 2048 / 8192 for 4 x 4k / 4 x 16k - exactly this rule (8 blocks per head).
MIN_BLOCK_CHUNKS = 8  # shorter blocks lose: the state pass and scan cost more than the extra parallelism gains

_inv_freq_cache: dict[tuple, torch.Tensor] = {}


def _cached_inv_freq(rotary_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    key = (rotary_dim, float(theta), str(device))
    t = _inv_freq_cache.get(key)
    if t is None:
        t = rope_inv_freq(rotary_dim, theta, device)
        _inv_freq_cache[key] = t
    return t


def _use_cuda(*ts: torch.Tensor) -> bool:
    return all(t.is_cuda for t in ts) and _build.available()


def _check_qkv(name: str, q, k, v, rank: int):
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != rank:
            raise ValueError(f"{name}: {n} must be a {rank}-d tensor, got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: {n} must be floating point, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{name}: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _check_state(name: str, state: torch.Tensor, H: int, d: int):
    if state.dim() != 4 or tuple(state.shape[1:]) != (H, d, d):
        raise ValueError(f"{name}: state must be [slots, {H}, {d}, {d}], got {tuple(state.shape)}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"{name}: state must be contiguous float32, got {state.dtype}")


def _check_gamma(name: str, gamma: torch.Tensor, H: int) -> torch.Tensor:
    if gamma.dim() != 1 or gamma.numel() != H:
        raise ValueError(f"{name}: gamma must be [{H}], got {tuple(gamma.shape)}")
    return gamma.to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------------
def lightning_decode(
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
    rotary_dim: int = 0,
    rope_theta: float = 1e6,
    out: torch.Tensor | None = None,
    cols_per_block: int | None = None,
    prefetch_bytes: int | None = None,
) -> torch.Tensor:
    """One lightning decode step for B requests, updating ``state[slots]`` in place.

    q, k, v: [B, H, d] (fp32/bf16/fp16, last dim contiguous); state: [slots, H, d, d] fp32; slots: int64 [B]
    (distinct; < 0 marks a padding row, e.g. CUDA-graph batch padding: output 0, state untouched; >= slots gives NaN
    output on the GPU path); gamma: [H] per-head decay. Optional fused prologue: per-head RMSNorm of q and k with
    ``q_norm_weight`` / ``k_norm_weight`` [d] and NeoX RoPE on the first ``rotary_dim`` dims at ``positions`` [B].
    Returns o = (d^-1/2 q) S_new as fp32 [B, H, d] (into ``out`` when given). No host synchronisation and, with
    ``out`` given and fp32 weights, no allocation: safe inside CUDA-graph capture. ``prefetch_bytes`` (None:
    DECODE_PREFETCH_BYTES) is the GPU kernel's L2 read-ahead distance; it changes no result.
    """
    _check_qkv("lightning_decode", q, k, v, 3)
    B, H, d = q.shape
    _check_state("lightning_decode", state, H, d)
    gamma = _check_gamma("lightning_decode", gamma, H)
    if slots.dim() != 1 or slots.numel() != B:
        raise ValueError(f"lightning_decode: slots must be [{B}], got {tuple(slots.shape)}")
    if rotary_dim:
        if rotary_dim % 2 or not 0 < rotary_dim <= d:
            raise ValueError(f"lightning_decode: rotary_dim must be even and in (0, {d}], got {rotary_dim}")
        if positions is None or positions.shape != (B,):
            raise ValueError("lightning_decode: rotary_dim needs positions [B]")
    inv_freq = _cached_inv_freq(rotary_dim, rope_theta, q.device) if rotary_dim else None
    if scale is None:
        scale = d**-0.5
    if out is not None and (out.shape != (B, H, d) or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"lightning_decode: out must be contiguous float32 [{B}, {H}, {d}]")
    if prefetch_bytes is not None and prefetch_bytes < 0:
        raise ValueError(f"lightning_decode: prefetch_bytes must be >= 0, got {prefetch_bytes}")

    if d in SUPPORTED_HEAD_DIMS and _use_cuda(q, k, v, state, slots):
        if out is None:
            out = torch.empty(B, H, d, dtype=torch.float32, device=q.device)
        fw = lambda w: None if w is None else w.to(torch.float32).contiguous()  # noqa: E731
        _build.extension().lightning_decode(
            q if q.stride(-1) == 1 else q.contiguous(),
            k if k.stride(-1) == 1 else k.contiguous(),
            v if v.stride(-1) == 1 else v.contiguous(),
            state,
            slots.to(torch.int64),
            gamma,
            out,
            float(scale),
            fw(q_norm_weight),
            fw(k_norm_weight),
            float(eps),
            None if positions is None else positions.to(torch.int64),
            inv_freq,
            DECODE_COLS if cols_per_block is None else int(cols_per_block),
            (DECODE_PREFETCH_BYTES if prefetch_bytes is None else int(prefetch_bytes)) // (d * d * 4),
        )
        return out
    o = lightning_decode_reference(
        q, k, v, state, slots, gamma, scale=scale, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
        eps=eps, positions=positions, inv_freq=inv_freq,
    ).to(torch.float32)
    if out is not None:
        out.copy_(o)
        return out
    return o


# ---------------------------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefillPlan:
    """Host-side cut of a varlen batch into blocks (see csrc/lightning_prefill.cu for the three passes)."""

    block_len: int
    items_state: list[tuple[int, int, int, int]]  # (start, len, ws index, -1) for every block but a sequence's last
    items_out: list[tuple[int, int, int, int]]  # (start, len, ws index, final slot or -1) for every block
    scan: list[tuple[int, int, int, int, int]]  # (ws_begin, n_blocks, block_len, use_init, slot) per sequence
    n_ws: int


def _one_wave_block_len(seq_lens: list[int], heads: int, num_sms: int) -> int:
    """The rule above: smallest chunk-multiple L >= MIN_BLOCK_CHUNKS chunks with sum(ceil(len / L)) <= the budget."""
    lens = [n for n in seq_lens if n > 0]
    low = CHUNK * MIN_BLOCK_CHUNKS
    if not lens:
        return low
    budget = max(num_sms // max(1, heads), len(lens))
    blocks = lambda L: sum(-(-n // L) for n in lens)  # noqa: E731 - non-increasing in L
    lo, hi = low // CHUNK, max(low // CHUNK, -(-max(lens) // CHUNK))  # in chunks; blocks(hi) = len(lens) <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if blocks(mid * CHUNK) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo * CHUNK


def plan_prefill(seq_lens: list[int], slots: list[int], use_init: list[bool], heads: int, num_sms: int,
                 block_len: int | None = None) -> PrefillPlan:
    """Choose the block length (a multiple of CHUNK; rule above) and list the work of the three passes."""
    if block_len is None:
        block_len = _one_wave_block_len(seq_lens, heads, num_sms)
    if block_len % CHUNK:
        raise ValueError(f"plan_prefill: block_len must be a multiple of {CHUNK}, got {block_len}")
    items_state, items_out, scan = [], [], []
    start, ws = 0, 0
    for n, length in enumerate(seq_lens):
        nblk = -(-length // block_len)
        for b in range(nblk):
            s, ln = start + b * block_len, min(block_len, length - b * block_len)
            last = b == nblk - 1
            items_out.append((s, ln, ws + b, slots[n] if last else -1))
            if not last:
                items_state.append((s, ln, ws + b, -1))
        scan.append((ws, nblk, block_len, int(use_init[n]), slots[n]))
        ws += nblk
        start += length
    return PrefillPlan(block_len, items_state, items_out, scan, ws)


@dataclass(frozen=True)
class PreparedPrefill:
    """A plan uploaded to the GPU, with its fp32 workspace: build it while the previous step runs, launch it later."""

    plan: PrefillPlan
    heads: int
    head_dim: int
    items_state: torch.Tensor
    items_out: torch.Tensor
    scan: torch.Tensor
    ws: torch.Tensor
    jsplit: int = 1
    tokens: int = 0  # T_total the plan covers
    max_slot: int = -1


def prepare_prefill(seq_lens: list[int], slots: list[int], use_init: list[bool], heads: int, head_dim: int,
                    device, block_len: int | None = None, jsplit: int | None = None) -> PreparedPrefill:
    device = torch.device(device)
    jsplit = (JSPLIT if jsplit is None else jsplit) if head_dim == 128 else 1
    if jsplit not in (1, 2):
        raise ValueError(f"prepare_prefill: jsplit must be 1 or 2, got {jsplit}")
    plan = plan_prefill(seq_lens, slots, use_init, heads, torch.cuda.get_device_properties(device).multi_processor_count,
                        block_len)

    def table(rows, width):  # queued without a host sync: a step's plan is built between its kernel launches
        return to_device(torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width), device)

    scan_rows = [(w, nb, bl, u, s & 0xFFFFFFFF, s >> 32) for (w, nb, bl, u, s) in plan.scan]
    ws = torch.empty(max(plan.n_ws, 1), heads, head_dim, head_dim, dtype=torch.float32, device=device)
    return PreparedPrefill(plan, heads, head_dim, table(plan.items_state, 4), table(plan.items_out, 4),
                           table(scan_rows, 6), ws, jsplit, sum(seq_lens), max(slots, default=-1))


@dataclass(frozen=True)
class QKPrologue:
    """The lightning layers' QK-norm and partial RoPE, for a prefill handed raw q, k (the qkv projection's columns):
    qkv_prologue's arithmetic with silu off and the norm in fp32. q_norm_weight / k_norm_weight [d]; cos, sin: the rows'
    rope tables, ops.rope_cos_sin(positions, rotary_dim, rope_theta) [T, rotary_dim]; positions [T] and rope_theta
    (the twin builds its angles from them).
    With d = 128 and rotary_dim = 64 (the released models) the prefill kernel applies it to each chunk's tiles as it
    loads them: bitwise qkv_prologue's q and k, without that kernel's pass over them. Otherwise qkv_prologue runs first."""

    q_norm_weight: torch.Tensor
    k_norm_weight: torch.Tensor
    eps: float
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    rope_theta: float

    def rows(self, index) -> "QKPrologue":
        """The same prologue for rows `index` (a slice or a list of (start, stop) runs) of the tables."""
        if isinstance(index, slice):
            pick = lambda t: t[index]  # noqa: E731
        else:
            pick = lambda t: torch.cat([t[a:b] for a, b in index])  # noqa: E731
        return QKPrologue(self.q_norm_weight, self.k_norm_weight, self.eps, pick(self.cos), pick(self.sin),
                          pick(self.positions), self.rope_theta)

    def fused(self, head_dim: int, jsplit: int) -> bool:
        """Whether the prefill kernel takes it (else apply() runs first)."""
        return head_dim == 128 and jsplit == 1 and self.cos.shape[-1] == 64

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [T, H, d] raw -> through qkv_prologue (its kernel on the GPU, its twin elsewhere), bf16."""
        T, H, d = q.shape
        qkv = torch.cat([q.reshape(T, H * d), k.reshape(T, H * d), torch.zeros_like(k).reshape(T, H * d)], 1)
        q, k, _ = qkv_prologue(qkv, self.positions, H, H, d, silu=False, q_norm_weight=self.q_norm_weight,
                               k_norm_weight=self.k_norm_weight, eps=self.eps, rotary_dim=self.cos.shape[-1],
                               rope_theta=self.rope_theta, out_dtype=torch.bfloat16, rope_cos_sin=(self.cos, self.sin))
        return q, k

    def kernel_args(self, T: int) -> tuple:
        """(q_w, k_w, cos, sin, eps) for the extension, checked."""
        for name, t in (("cos", self.cos), ("sin", self.sin)):
            if not (torch.is_tensor(t) and t.dtype == torch.float32 and tuple(t.shape) == (T, 64)):
                raise ValueError(f"QKPrologue: {name} must be float32 [{T}, 64], got "
                                 f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        cos, sin = self.cos, self.sin
        if cos.stride(1) != 1 or cos.stride(0) % 4 or cos.stride(0) != sin.stride(0) \
                or cos.data_ptr() % 16 or sin.data_ptr() % 16:
            cos, sin = cos.contiguous(), sin.contiguous()
        for name, w in (("q_norm_weight", self.q_norm_weight), ("k_norm_weight", self.k_norm_weight)):
            if not (torch.is_tensor(w) and w.dim() == 1 and w.shape[0] == 128):
                raise ValueError(f"QKPrologue: {name} must be [128], got {tuple(getattr(w, 'shape', ()))}")
        return _weight_f32(self.q_norm_weight), _weight_f32(self.k_norm_weight), cos, sin, float(self.eps)


def _rows_in_place(x: torch.Tensor) -> torch.Tensor:
    """x in bf16, as is when the kernel can read it (head-major rows of one head stride d and a 16-byte aligned token
    stride: a view of a projection's columns, e.g. qkv_prologue's v_in_place), otherwise a contiguous copy."""
    x = x.to(torch.bfloat16)
    T, H, d = x.shape
    if x.stride(2) == 1 and (x.stride(1) == d or H == 1) and x.stride(0) % 8 == 0 and x.stride(0) >= H * d \
            and x.data_ptr() % 16 == 0:
        return x if x.stride(1) == d else x.as_strided(x.shape, (x.stride(0), d, 1))
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def run_prepared_prefill(prep: PreparedPrefill, q, k, v, state, gamma, scale: float | None = None,
                         qk_prologue: QKPrologue | None = None) -> torch.Tensor:
    """Launch the three prefill passes for a prepared plan (shapes as in lightning_prefill; no host sync). q, k, v
    may be views with a token stride of their own (v read in place from the qkv projection). qk_prologue: q and k
    are raw (QKPrologue)."""
    _check_qkv("run_prepared_prefill", q, k, v, 3)
    T, H, d = q.shape
    if (T, H, d) != (prep.tokens, prep.heads, prep.head_dim):
        raise ValueError(f"run_prepared_prefill: prepared for T={prep.tokens}, H={prep.heads}, d={prep.head_dim}, "
                         f"got T={T}, H={H}, d={d}")
    _check_state("run_prepared_prefill", state, H, d)
    if prep.max_slot >= state.shape[0]:
        raise ValueError(f"run_prepared_prefill: slot {prep.max_slot} is outside the state pool of {state.shape[0]}")
    gamma = _check_gamma("run_prepared_prefill", gamma, H)
    pro_args = (None,) * 4 + (0.0,)
    if qk_prologue is not None:
        if qk_prologue.fused(d, prep.jsplit):
            pro_args = qk_prologue.kernel_args(T)
        else:
            q, k = qk_prologue.apply(q, k)
    qb, kb, vb = (_rows_in_place(x) for x in (q, k, v))  # each has its own tensor map: strides may differ
    o = torch.empty(T, H, d, dtype=torch.bfloat16, device=q.device)
    _build.extension().lightning_prefill(qb, kb, vb, o, state, prep.ws, prep.items_state, prep.items_out, prep.scan,
                                         gamma, float(d**-0.5 if scale is None else scale),
                                         prep.jsplit, *pro_args)
    return o if q.dtype == torch.bfloat16 else o.to(q.dtype)


def _to_host_list(x, name: str) -> list[int]:
    if torch.is_tensor(x):
        return [int(v) for v in x.tolist()]
    try:
        return [int(v) for v in x]
    except TypeError as exc:
        raise ValueError(f"lightning_prefill: {name} must be a 1-d integer tensor or list") from exc


def lightning_prefill(
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
    block_len: int | None = None,
    jsplit: int | None = None,
    qk_prologue: QKPrologue | None = None,
) -> torch.Tensor:
    """Varlen lightning prefill. q, k, v: [T_total, H, d] (bf16 on the GPU path; other float dtypes are cast to bf16
    for the tensor cores); cu_seqlens: [N+1] token offsets (segments may be empty); slots: [N] distinct state slots;
    use_initial_state: [N] bools (default all True) - start from state[slot] or from zeros. The final state of each
    sequence is written to state[slot] in place. qk_prologue: q and k are the projection's raw columns; the prefill
    applies the QK-norm and RoPE first (QKPrologue). Returns o [T_total, H, d] in q's dtype.

    cu_seqlens/slots are read on the host (one synchronisation when they live on the GPU): prefill is not graphed.
    """
    _check_qkv("lightning_prefill", q, k, v, 3)
    T, H, d = q.shape
    _check_state("lightning_prefill", state, H, d)
    gamma = _check_gamma("lightning_prefill", gamma, H)
    cu = _to_host_list(cu_seqlens, "cu_seqlens")
    sl = _to_host_list(slots, "slots")
    n = len(cu) - 1
    if n < 0 or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"lightning_prefill: cu_seqlens must start at 0, never decrease and end at {T}, got {cu}")
    if len(sl) != n:
        raise ValueError(f"lightning_prefill: slots must have {n} entries (one per sequence), got {len(sl)}")
    if any(not 0 <= s < state.shape[0] for s in sl) or len(set(sl)) != n:
        raise ValueError(f"lightning_prefill: slots must be distinct and in [0, {state.shape[0]}), got {sl}")
    use = [True] * n if use_initial_state is None else [bool(x) for x in _to_host_list(use_initial_state, "use_initial_state")]
    if len(use) != n:
        raise ValueError(f"lightning_prefill: use_initial_state must have {n} entries, got {len(use)}")
    if scale is None:
        scale = d**-0.5

    if d in SUPPORTED_HEAD_DIMS and _use_cuda(q, k, v, state):
        prep = prepare_prefill([cu[i + 1] - cu[i] for i in range(n)], sl, use, H, d, q.device, block_len, jsplit)
        return run_prepared_prefill(prep, q, k, v, state, gamma, scale, qk_prologue)
    if qk_prologue is not None:
        q, k = qk_prologue.apply(q, k)
    o = lightning_prefill_reference(q, k, v, state, cu, sl, gamma, scale=scale, use_initial_state=use, chunk=CHUNK)
    return o.to(q.dtype)


__all__ = [
    "lightning_decode",
    "lightning_prefill",
    "plan_prefill",
    "prepare_prefill",
    "run_prepared_prefill",
    "PrefillPlan",
    "PreparedPrefill",
    "QKPrologue",
    "CHUNK",
    "SUPPORTED_HEAD_DIMS",
]
