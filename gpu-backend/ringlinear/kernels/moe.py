"""Fused MoE on the GPU: CUDA router (sigmoid + bias + group-limited top-k), CUDA assignment sort, and three expert
paths, all reading only the experts the batch selected:

    decode   (<= DECODE_MAX_TOKENS tokens): CUDA-core weight-streaming kernels, a warp per few weight rows
    stream   (<= STREAM_MAX_TOKENS): a CUDA stable sort of the assignments, then two tensor-core grouped GEMMs that
             stream each expert's weights once for its few rows (moe_stream.cu: weights on the MMA's M side, tokens on
             the narrow N side; x rows gathered in the kernel, SwiGLU fused into the gate+up GEMM)
    wide     (<= WIDE_MAX_TOKENS: prompt chunks, mixed steps, prefill): the same sort, then two Hopper wgmma grouped
             GEMMs (moe_wide.cu: 128 weight rows of one expert per CTA, the expert's rows in passes of up to 128 or 256
             as the N side, x gathered and SwiGLU fused like the stream path); from TMA_*_MIN_MEAN_ROWS rows per
             expert the GEMMs run on moe_tma.cu instead (persistent CTAs fed by a producer warpgroup: TMA boxes for
             the weights and the down GEMM's x, x rows gathered by cp.async for gate+up; 128-row x tiles as the M
             side, SwiGLU fused)
    grouped  (above, or path="grouped"): the same sort, token rows scattered into expert order, grouped GEMMs (torch._grouped_mm, CUTLASS on sm90) -
             one for gate+up when they are views of one packed [E, 2I, D] buffer (see pack_gate_up) - and a CUDA SwiGLU

and a CUDA combine that sums each token's k weighted rows plus the shared expert in fp32 straight from the sorted
GEMM output. No host synchronisation on any path (decode steps are CUDA-graph captured).

Decode steps are latency-bound (a 1-token step's MoE was 11 launches, ~45 us a layer on H200 for ~14 us of weight
reads), so the decode path's router is one launch (moe_router_decode: GEMV, then routing and the sort by the last
block; twin: router_logits + route_align_small, the single-block routing and sort), and when the shared
expert is stored as expert E of the routed experts' buffers (pack_moe, what the engine does) the decode and small
stream steps compute it in the same expert launches as one more assignment of weight 1 instead of three more GEMMs.
Twin: moe_reference.py. Without CUDA the wrappers run the twin.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from . import _build
from .elementwise import add_rms_norm
from .gemv import skinny_ok
from .moe_reference import (RING_MINI_ROUTER, RouterConfig, combine_reference, moe_reference, route_align_reference,
                            scatter_rows_reference, stream_gemm_reference, swiglu_rows_reference)

# Path crossovers, H200 (bench/gpu_kernels.py, graph replays, Ring-mini layer): decode 76 us vs stream 93 us at
# 1 token, 128 vs 121 at 4 (2026-11-28); stream / wide / grouped 504 / 517 / 628 us at 512 tokens, 584 / 539 / 646 at
# 768, 711 / 538 / 633 at 1024, 1181 / 597 / 681 at 2048, 2168 / 854 / 975 at 4096; wide / grouped 1360 / 1419 at
# 8192, 2438 / 2607 at 16k, 4593 / 4696 at 32k, 8951 / 8934 at 64k, 17033 / 17750 at 128k (2026-11-29, --only
# moe-mid, the seventeenth session's kernel).
DECODE_MAX_TOKENS = 2
SMALL_ROUTE_MAX_TOKENS = 4  # moe_route_align_small's limit (kSmallRouteMaxTokens): one block routes these serially
# Up to here a stream step computes the shared expert as expert E (pack_moe layout): its N rows are one 32-row pass of
# the stream kernel like any routed expert's; above, its rows would take several passes in the CTAs of one expert
# while the others finish, and the separate GEMMs are the faster way.
STREAM_FOLD_MAX_TOKENS = 32
STREAM_MAX_TOKENS = 640  # above: the wide path (an expert's rows take several 32-row passes here)
# Above: the CUTLASS grouped GEMM, which the wide path matches or beats at every size measured up to here.
WIDE_MAX_TOKENS = 131072
WIDE_STAGES = 5  # cp.async ring slots of moe_wide_gemm with 128-row passes (4 or 5: loads 2 or 3 k-steps ahead)
# From this many rows per expert on average (~6k tokens at Ring-mini's top-8 of 256), moe_wide_gemm takes them in
# passes of 256 instead of 128 (4 ring slots): twice the MMA work per k-step for the same per-step overhead. The layer
# at 4 096 tokens: 854 vs 858 us; at 8 192: 1 460 vs 1 360.
WIDE_LONG_PASS_MEAN_ROWS = 192
# From this many rows per expert on average the wide path's GEMMs run on moe_tma_gemm (tma_gemm); the engine's layout
# has E = 257 (the shared expert stored as expert 256), so 384 rows is ~12k tokens and 16 every wide step. H200, the
# GEMMs alone (bench/gpu_kernels.py --only moe-mid, 2026-11-29, bench/results/gpu_moe_mid_tma.json): down 161 vs 169
# us (the wide kernel's best) at 768 tokens, 4 113 vs 5 051 at 128k (CUTLASS 4 512); gate+up about even at 4k-8k
# (within the runs' 5% spread), 1 199 vs 1 257 at 16k, 8 032 vs 9 123 at 128k; the layer with both on TMA 1-5% faster
# at 16k than with the down GEMM alone in four runs.
TMA_GATE_UP_MIN_MEAN_ROWS = 384
TMA_DOWN_MIN_MEAN_ROWS = 16
STREAM_STAGES = 4  # cp.async pipeline depth of moe_stream_gemm: 4 is 1-5% faster than 3 at 16-512 tokens
DECODE_MAX_INTERMEDIATE = 2048  # moe_down_kernel keeps a lane's share of a weight row in registers (kMoeDownMaxI)
# One- and two-token steps: the decode expert kernels take an expert's assignments in passes of 2 (gate/up) and 1
# (down) instead of 8: fewer registers, more blocks per SM (H200, 19 Ring-mini layers: 42.0 -> 37.0 us a layer at one
# token, bench/gpu_kernels.py --only moe-latency). Read per call (the benchmarks compare it off and on).
DECODE_SMALL_PASSES = True
SORT_BLOCK = 2048  # assignments per block of the CUDA moe_sort (kSortPerBlock): sizes its counts workspace
MAX_EXPERTS = 1024  # the CUDA router and sorts' limit (kMaxExperts), the shared expert included when it is expert E
# From here the fp32 router GEMM costs ~20 us or more (0.69 ms at 32k tokens on H200), so the 3 bf16 GEMMs pay off.
ROUTER_SPLIT_MIN_TOKENS = 1024


def pack_experts(gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor]):
    """Stack per-expert checkpoint tensors ([I, D], [I, D], [D, I]) into the kernels' [E, I, D] / [E, D, I] layout."""
    if not (len(gate) == len(up) == len(down) and gate):
        raise ValueError("pack_experts: gate/up/down lists must be non-empty and of equal length")
    return torch.stack(gate).contiguous(), torch.stack(up).contiguous(), torch.stack(down).contiguous()


def pack_gate_up(w_gate: torch.Tensor, w_up: torch.Tensor):
    """Gate and up weights ([E, I, D] experts or [I, D] shared expert) -> (packed [.., 2I, D], gate view, up view).

    The views share the packed buffer (no extra memory once the originals are dropped); passing them to fused_moe
    lets it run gate and up as one GEMM."""
    if w_gate.dim() not in (2, 3) or w_gate.shape != w_up.shape:
        raise ValueError(f"pack_gate_up: gate/up must be equal [E, I, D] or [I, D], got {tuple(w_gate.shape)} / {tuple(w_up.shape)}")
    if w_gate.dtype != w_up.dtype or w_gate.device != w_up.device:
        raise ValueError("pack_gate_up: gate/up must share dtype and device")
    I = w_gate.shape[-2]
    packed = torch.cat([w_gate, w_up], dim=-2).contiguous()
    return packed, packed[..., :I, :], packed[..., I:, :]


def packed_gate_up(w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor | None:
    """The [.., 2I, D] buffer of which w_gate and w_up are the two adjacent halves (pack_gate_up's views), else None."""
    if w_gate.dim() not in (2, 3) or w_gate.shape != w_up.shape or w_gate.dtype != w_up.dtype or w_gate.device != w_up.device:
        return None
    I, D = w_gate.shape[-2], w_gate.shape[-1]
    strides = (2 * I * D, D, 1) if w_gate.dim() == 3 else (D, 1)
    shape = (w_gate.shape[0], 2 * I, D) if w_gate.dim() == 3 else (2 * I, D)
    if w_gate.numel() == 0 or w_gate.stride() != strides or w_up.stride() != strides:
        return None
    size = w_gate.element_size()
    if w_up.data_ptr() != w_gate.data_ptr() + I * D * size:
        return None
    storage = w_gate.untyped_storage()
    if w_up.untyped_storage().data_ptr() != storage.data_ptr():
        return None
    if (w_gate.storage_offset() + math.prod(shape)) * size > storage.nbytes():  # the packed buffer lies in this storage
        return None
    return w_gate.as_strided(shape, strides)


def pack_moe(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
             shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """The engine's expert layout: gate and up as the two halves of one [E', 2I, D] buffer and down one [E', D, I]
    buffer, where E' = E + 1 when the shared expert has the routed experts' size: it is then stored as expert E, so
    the decode kernels can compute it as one more assignment (shared_as_expert). Returns (gate [E, I, D], up, down
    [E, D, I], shared (gate, up, down) or None), all views of the two buffers (a shared expert of another size keeps
    its own packed gate/up buffer)."""
    if w_gate.dim() != 3 or w_up.shape != w_gate.shape or w_down.dim() != 3 or w_down.shape != (w_gate.shape[0], w_gate.shape[2], w_gate.shape[1]):
        raise ValueError(f"pack_moe: need gate/up [E, I, D] and down [E, D, I], got {tuple(w_gate.shape)} / "
                         f"{tuple(w_up.shape)} / {tuple(w_down.shape)}")
    E, I, D = w_gate.shape
    fold = shared is not None and tuple(shared[0].shape) == (I, D) and tuple(shared[1].shape) == (I, D) \
        and tuple(shared[2].shape) == (D, I)
    kw = dict(dtype=w_gate.dtype, device=w_gate.device)
    gu, dn = torch.empty(E + fold, 2 * I, D, **kw), torch.empty(E + fold, D, I, **kw)
    gu[:E, :I], gu[:E, I:], dn[:E] = w_gate, w_up, w_down
    if fold:
        gu[E, :I], gu[E, I:], dn[E] = shared[0], shared[1], shared[2]
        sh = (gu[E, :I], gu[E, I:], dn[E])
    elif shared is not None:
        sh = (*pack_gate_up(shared[0], shared[1])[1:], shared[2])
    else:
        sh = None
    return gu[:E, :I], gu[:E, I:], dn[:E], sh


def _with_next(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor | None:
    """The [E+1, ...] view of w's buffer whose last expert is s, when s is stored right after w's E experts."""
    E = w.shape[0]
    if (s.dim() != w.dim() - 1 or s.shape != w.shape[1:] or s.stride() != w.stride()[1:] or s.dtype != w.dtype
            or s.device != w.device or E == 0):
        return None
    if s.data_ptr() != w.data_ptr() + E * w.stride(0) * w.element_size():
        return None
    if s.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
        return None
    return w.as_strided((E + 1, *w.shape[1:]), w.stride())


def shared_as_expert(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None):
    """(gate, up, down) views of E+1 experts whose last is the shared expert, when pack_moe stored it so; else None."""
    if shared is None:
        return None
    views = tuple(_with_next(w, s) for w, s in zip((w_gate, w_up, w_down), shared))
    return None if any(v is None for v in views) else views


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


def split_bf16x3(w: torch.Tensor):
    """fp32 w -> bf16 (hi, mid, lo) with hi + mid + lo == w exactly (8 + 8 + 8 significand bits cover fp32's 24)."""
    w = w.float()
    hi = w.to(torch.bfloat16)
    r = w - hi.float()  # exact: hi is w rounded to 8 bits, same binade
    mid = r.to(torch.bfloat16)
    return hi, mid, (r - mid.float()).to(torch.bfloat16)


_SPLITS: dict[int, tuple] = {}  # id(router weight) -> (weakref, version, (hi, mid, lo))


def _router_split(w: torch.Tensor):
    """split_bf16x3(w), kept for as long as w lives and is not modified in place: the router weights are fixed while
    serving, and splitting them again in every layer of every step costs ~8 launches per layer (host-bound steps)."""
    try:
        version = w._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        version = None
    hit = _SPLITS.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == version:
        return hit[2]
    parts = split_bf16x3(w)
    if hit is None or hit[0]() is not w:
        weakref.finalize(w, _SPLITS.pop, id(w), None)
    _SPLITS[id(w)] = (weakref.ref(w), version, parts)
    return parts


def router_logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits x W^T. bf16 x and W on the GPU: one bf16 GEMM with fp32 accumulation and output. fp32 W and many
    bf16 tokens: three bf16 tensor-core GEMMs against the exact bf16 split of W (each product bf16 x bf16 is exact in
    fp32, sums accumulate in fp32), about 3x faster than the fp32 GEMM with errors of fp32-summation size; otherwise
    the plain fp32 GEMM."""
    if x.is_cuda and x.dtype == router_weight.dtype == torch.bfloat16:
        # bf16 weights (a bf16 model): bf16 products are exact in fp32, so one GEMM with fp32 accumulation and output
        # is the fp32 GEMM of the upcast operands, without their two fp32 copies (a third of a decode step's router).
        # A few tokens (the stream path's decode steps): the mma GEMV of gemv.py, launched as a dependent like the
        # route, sort and expert kernels after it, where cuBLAS would break that chain.
        if skinny_ok(x, router_weight):
            logits = torch.empty(x.shape[0], router_weight.shape[0], dtype=torch.float32, device=x.device)
            _build.extension().skinny_gemm(x, router_weight, logits, 0)
            return logits
        try:
            return torch.mm(x, router_weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    if x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] >= ROUTER_SPLIT_MIN_TOKENS:
        try:
            hi, mid, lo = _router_split(router_weight)
            out = torch.mm(x, hi.t(), out_dtype=torch.float32)
            out += torch.mm(x, mid.t(), out_dtype=torch.float32)
            out += torch.mm(x, lo.t(), out_dtype=torch.float32)
            return out
        except (TypeError, RuntimeError):  # a torch without mm(out_dtype=): the fp32 GEMM below
            pass
    return x.float() @ router_weight.float().t()


def route(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor | None,
          cfg: RouterConfig = RING_MINI_ROUTER, append: int = -1):
    """Router in fp32: logits = x W^T, then selection. Returns (ids int32 [N, k], weights fp32 [N, k]); append >= 0
    adds a last column of expert `append` with weight 1 (the shared expert stored as expert E, pack_moe)."""
    logits = router_logits(x, router_weight)
    N, k = x.shape[0], cfg.top_k + (append >= 0)
    if logits.is_cuda and _build.available():
        ids = torch.empty(N, k, dtype=torch.int32, device=x.device)
        w = torch.empty(N, k, dtype=torch.float32, device=x.device)
        _build.extension().moe_route(
            logits.contiguous(), _bias32(expert_bias), cfg.n_group, cfg.topk_group, cfg.top_k, cfg.norm_topk_prob,
            float(cfg.routed_scaling_factor), append, ids, w,
        )
        return ids, w
    ids, w, *_ = route_align_reference(logits, expert_bias, cfg, append, cfg.num_experts + (append >= 0))
    return ids, w


def route_align_small(logits: torch.Tensor, expert_bias: torch.Tensor | None, cfg: RouterConfig, append: int = -1,
                      num_experts_out: int | None = None):
    """Routing and the sort by expert of at most SMALL_ROUTE_MAX_TOKENS tokens in one launch (decode steps): see
    route_align_reference (the twin, and the CPU path) for the outputs."""
    N = logits.shape[0]
    E_out = logits.shape[1] if num_experts_out is None else num_experts_out
    if not (logits.is_cuda and _build.available()):
        return route_align_reference(logits, expert_bias, cfg, append, E_out)
    if N > SMALL_ROUTE_MAX_TOKENS:
        raise ValueError(f"route_align_small: at most {SMALL_ROUTE_MAX_TOKENS} tokens, got {N}")
    out = _routed_outputs(N, cfg.top_k + (append >= 0), E_out, logits.device)
    _build.extension().moe_route_align_small(
        logits.contiguous(), _bias32(expert_bias), cfg.n_group, cfg.topk_group, cfg.top_k, cfg.norm_topk_prob,
        float(cfg.routed_scaling_factor), append, *out)
    return out


def _routed_outputs(N: int, k: int, E_out: int, device: torch.device):
    """Empty (ids int32 [N, k], weights fp32 [N, k], offsets [E_out+1], sorted [N*k], active [E_out+1])."""
    i32 = dict(dtype=torch.int32, device=device)
    return (torch.empty(N, k, **i32), torch.empty(N, k, dtype=torch.float32, device=device),
            torch.empty(E_out + 1, **i32), torch.empty(N * k, **i32), torch.empty(E_out + 1, **i32))


_ROUTER_COUNTERS: dict[torch.device, torch.Tensor] = {}


def router_counter(device: torch.device) -> torch.Tensor | None:
    """The arrival counter of moe_router_decode on `device` (zero between launches: the last block resets it), made on
    first use. Made eagerly (the engine does at start-up): during a CUDA-graph capture a new tensor would hold
    garbage until that graph first replays, so a capture without it falls back to the two-launch router. The kernel
    assumes one router launch at a time per device (the engine's one stream)."""
    device = torch.device(device)
    c = _ROUTER_COUNTERS.get(device)
    if c is None and not torch.cuda.is_current_stream_capturing():
        c = _ROUTER_COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return c


def route_decode(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor | None, cfg: RouterConfig,
                 append: int = -1, num_experts_out: int | None = None):
    """A decode step's router: route_align_small's outputs for x [N <= SMALL_ROUTE_MAX_TOKENS, D]. With bf16 weights on
    the GPU, one launch (moe_router_decode: the router GEMV over E/8 blocks, the last block routes and sorts);
    otherwise router_logits, then route_align_small."""
    N, D = x.shape
    E = router_weight.shape[0]
    E_out = E if num_experts_out is None else num_experts_out
    fused = (x.is_cuda and _build.available() and x.dtype == router_weight.dtype == torch.bfloat16 and 0 < N
             and N <= SMALL_ROUTE_MAX_TOKENS and D % 8 == 0 and N * D * 2 <= 48 * 1024 and x.is_contiguous()
             and router_weight.is_contiguous() and x.data_ptr() % 16 == 0 and router_weight.data_ptr() % 16 == 0)
    counter = router_counter(x.device) if fused else None
    if counter is None:
        return route_align_small(router_logits(x, router_weight), expert_bias, cfg, append, E_out)
    logits = torch.empty(N, E, dtype=torch.float32, device=x.device)
    out = _routed_outputs(N, cfg.top_k + (append >= 0), E_out, x.device)
    _build.extension().moe_router_decode(
        x, router_weight, _bias32(expert_bias), cfg.n_group, cfg.topk_group, cfg.top_k, cfg.norm_topk_prob,
        float(cfg.routed_scaling_factor), append, logits, counter, *out)
    return out


def _bias32(expert_bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if expert_bias is None else expert_bias.float().contiguous()


def _kernel_shapes_ok(*sizes: int) -> bool:
    return all(n % 8 == 0 for n in sizes)  # 16-byte vectors of bf16 in the CUDA kernels


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """bf16 [M, I] halves (may be strided column slices of one [M, 2I] buffer) -> h = bf16(silu(g) * u), fp32 math."""
    if g.is_cuda and g.dtype == torch.bfloat16 and _build.available() and g.shape[1] % 8 == 0 and g.stride(1) == 1 \
            and u.stride() == g.stride() and g.stride(0) % 8 == 0 and g.data_ptr() % 16 == 0 and u.data_ptr() % 16 == 0:
        h = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        _build.extension().moe_swiglu(g, u, h)
        return h
    return swiglu_rows_reference(g, u)


def scatter_rows(x: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    """xs [N*k, D] with xs[inv[n*k + j]] = x[n] (inv: the sort's inverse permutation): the grouped GEMM's input.
    Equal to x.index_select(0, tok) with tok the sorted token list, but each x row is read once instead of k times."""
    if (x.is_cuda and _build.available() and x.stride(1) == 1 and (x.shape[1] * x.element_size()) % 16 == 0
            and (x.stride(0) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0 and 1 <= top_k <= 32):
        xs = torch.empty(inv.numel(), x.shape[1], dtype=x.dtype, device=x.device)
        _build.extension().moe_scatter_rows(x, inv.reshape(-1).to(torch.int32).contiguous(), top_k, xs)
        return xs
    return scatter_rows_reference(x, inv, top_k)


def combine(ys: torch.Tensor, rows: torch.Tensor | None, w: torch.Tensor | None, shared: torch.Tensor | None,
            top_k: int, add_norm: tuple | None = None):
    """out [N, D] bf16 = sum_j w[n, j] * ys[rows[n*k + j]] + shared[n], fp32 in a fixed j order (see moe_combine).
    add_norm = (x [N, D] bf16, weight [D], eps): returns add_rms_norm(x, out, weight, eps) instead, (s, normed) - in
    the same kernel when it can (bitwise the two kernels apart), else through elementwise.add_rms_norm."""
    N = (ys.shape[0] if rows is None else rows.numel()) // top_k
    D = ys.shape[1]
    if ys.is_cuda and _build.available() and D % 8 == 0:
        args = (None, None, 0.0, None)
        fused = add_norm is not None and _norm_fusable(add_norm[0], D)
        if fused:
            x, weight, eps = add_norm
            nw = weight.to(torch.bfloat16).contiguous()
            args = (x, nw if nw.data_ptr() % 16 == 0 else nw.clone(), float(eps),
                    torch.empty(N, D, dtype=torch.bfloat16, device=ys.device))
        out = torch.empty(N, D, dtype=torch.bfloat16, device=ys.device)
        _build.extension().moe_combine(ys.contiguous(), None if rows is None else rows.reshape(-1).contiguous(),
                                       None if w is None else w.reshape(-1).float().contiguous(),
                                       None if shared is None else shared.contiguous(), top_k, out, *args)
        if fused:
            return out, args[3]
    else:
        out = combine_reference(ys, rows, w, shared, top_k)
    if add_norm is None:
        return out
    x, weight, eps = add_norm
    return add_rms_norm(x, out.to(x.dtype), weight, eps)


def _norm_fusable(x: torch.Tensor, D: int) -> bool:
    """Whether moe_combine can add x and normalise (the layout add_rms_norm's kernel takes, bf16, <= 8 192 channels)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[1] == D and x.stride(1) == 1
            and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 and D <= 8192)


def stream_gemm(x: torch.Tensor, gather: torch.Tensor | None, w: torch.Tensor, w_up: torch.Tensor | None,
                offsets: torch.Tensor, stages: int | None = None, early: bool = False) -> torch.Tensor:
    """Per expert e, rows offsets[e]..offsets[e+1] of x (or of x[gather]) times w[e]^T -> bf16 [A, F]; with w_up the
    SwiGLU bf16(silu(x Wg^T) * (x Wu^T)). w, w_up: [E, F, K] with contiguous rows (packed views are). Few rows per
    expert: the tensor-core weight-streaming kernel of moe_stream.cu; stages None = STREAM_STAGES (read per call).
    early: offsets were written two launches back or earlier (the down GEMM right after its gate/up), so the kernel
    may read them and start its weights before the dependent-launch wait (csrc/common.cuh)."""
    A = x.shape[0] if gather is None else gather.numel()
    if (x.is_cuda and x.dtype == w.dtype == torch.bfloat16 and (w_up is None or w_up.dtype == torch.bfloat16)
            and x.shape[1] % 8 == 0 and _build.available()):
        y = torch.empty(A, w.shape[1], dtype=torch.bfloat16, device=x.device)
        _build.extension().moe_stream_gemm(x.contiguous(), gather, _rows_contiguous(w),
                                           None if w_up is None else _rows_contiguous(w_up), offsets, y,
                                           STREAM_STAGES if stages is None else stages, early)
        return y
    return stream_gemm_reference(x, gather, w, w_up, offsets)


def wide_config(A: int, E: int, stages: int | None = None, pass_rows: int | None = None) -> tuple[int, int]:
    """(stages, pass_rows) of moe_wide_gemm for A rows over E experts (module constants read per call). Neither given:
    256-row passes (4 ring slots) from WIDE_LONG_PASS_MEAN_ROWS rows per expert on average - the host knows the mean
    without a sync - else 128-row passes (WIDE_STAGES slots); stages alone: 128-row passes; pass_rows alone: 4 slots
    for 256-row passes, else WIDE_STAGES."""
    if stages is None and pass_rows is None:
        return (4, 256) if A >= WIDE_LONG_PASS_MEAN_ROWS * E else (WIDE_STAGES, 128)
    if pass_rows is None:
        return stages, 128
    return (4 if pass_rows == 256 else WIDE_STAGES) if stages is None else stages, pass_rows


def wide_gemm(x: torch.Tensor, gather: torch.Tensor | None, w: torch.Tensor, w_up: torch.Tensor | None,
              offsets: torch.Tensor, stages: int | None = None, pass_rows: int | None = None) -> torch.Tensor:
    """stream_gemm's contract (same twin) from ~30 rows per expert up: the wgmma kernel of moe_wide.cu (sm_90a), with
    the ring depth and pass width of wide_config. Without the extension (or F not a multiple of 8): the twin."""
    A = x.shape[0] if gather is None else gather.numel()
    if (x.is_cuda and x.dtype == w.dtype == torch.bfloat16 and (w_up is None or w_up.dtype == torch.bfloat16)
            and x.shape[1] % 8 == 0 and w.shape[1] % 8 == 0 and _build.available()):
        stages, pass_rows = wide_config(A, w.shape[0], stages, pass_rows)
        y = torch.empty(A, w.shape[1], dtype=torch.bfloat16, device=x.device)
        _build.extension().moe_wide_gemm(x.contiguous(), gather, _rows_contiguous(w),
                                         None if w_up is None else _rows_contiguous(w_up), offsets, y, stages,
                                         pass_rows)
        return y
    return stream_gemm_reference(x, gather, w, w_up, offsets)


def tma_gemm(x: torch.Tensor, gather: torch.Tensor | None, w: torch.Tensor, w_up: torch.Tensor | None,
             offsets: torch.Tensor, stages: int | None = None) -> torch.Tensor:
    """stream_gemm's contract (same twin) at many rows per expert, with gather and w_up together (the gate+up GEMM,
    SwiGLU fused) or neither (the down GEMM, x rows already in expert order): the persistent TMA + warp-specialised
    wgmma kernel of moe_tma.cu (sm_90a); stages: its ring slots (3, or 4 for gate+up; None: the most that fit).
    Without the extension (or F not a multiple of 8, or more than MAX_EXPERTS experts): the twin."""
    if (gather is None) != (w_up is None):
        raise ValueError("tma_gemm: gather and w_up go together (the gate+up GEMM) or not at all (the down GEMM)")
    if (x.is_cuda and x.dtype == w.dtype == torch.bfloat16 and (w_up is None or w_up.dtype == torch.bfloat16)
            and x.shape[1] % 8 == 0 and w.shape[1] % 8 == 0 and w.shape[0] <= MAX_EXPERTS and _build.available()):
        A = x.shape[0] if gather is None else gather.numel()
        y = torch.empty(A, w.shape[1], dtype=torch.bfloat16, device=x.device)
        _build.extension().moe_tma_gemm(x.contiguous(), gather, _rows_contiguous(w),
                                        None if w_up is None else _rows_contiguous(w_up), offsets, y, stages or 0)
        return y
    return stream_gemm_reference(x, gather, w, w_up, offsets)


def tma_path(A: int, E: int) -> tuple[bool, bool]:
    """Whether the wide path's (gate+up, down) GEMMs of A assignments over E experts run on tma_gemm (module constants
    read per call; the host knows A and E without a sync)."""
    return A >= TMA_GATE_UP_MIN_MEAN_ROWS * E, A >= TMA_DOWN_MIN_MEAN_ROWS * E


def _shared_hidden(x, shared):
    """Shared expert down(silu(gate x) * up x) in x's dtype; gate+up as one GEMM when they are packed views."""
    if shared is None:
        return None
    g, u, d = shared
    gu = packed_gate_up(g, u)
    if gu is not None:
        t = F.linear(x, gu)
        gs, us = t[:, : g.shape[0]], t[:, g.shape[0]:]
    else:
        gs, us = F.linear(x, g), F.linear(x, u)
    return F.linear(swiglu(gs, us), d)


def _rows_contiguous(w: torch.Tensor) -> torch.Tensor:
    """Per-expert [rows, cols] blocks must be row-major for the decode kernels (packed views already are)."""
    return w if w.stride(2) == 1 and w.stride(1) == w.shape[2] else w.contiguous()


def _experts_decode(x, routed, w_gate, w_up, w_down, shared_h, add_norm=None):
    """routed: (ids, w) from route, or (ids, w, offsets, order, active) from route_align_small."""
    ext = _build.extension()
    N, D = x.shape
    ids, w = routed[:2]
    k = ids.shape[1]
    E, I = w_gate.shape[0], w_gate.shape[1]
    A = N * k
    if len(routed) == 5:
        offsets, order, active = routed[2:]
    else:
        offsets = torch.empty(E + 1, dtype=torch.int32, device=x.device)
        order = torch.empty(A, dtype=torch.int32, device=x.device)
        active = torch.empty(E + 1, dtype=torch.int32, device=x.device)
        ext.moe_align(ids.reshape(-1).contiguous(), E, offsets, order, active)
    h = torch.empty(A, I, dtype=torch.bfloat16, device=x.device)
    y = torch.empty(A, D, dtype=torch.float32, device=x.device)
    ext.moe_experts_decode(x.contiguous(), _rows_contiguous(w_gate), _rows_contiguous(w_up), _rows_contiguous(w_down),
                           offsets, order, active, w.reshape(-1).contiguous(), k, h, y, DECODE_SMALL_PASSES)
    return combine(y, None, None, shared_h, k, add_norm)  # y rows are already weighted, in assignment order


def _grouped_mm(a: torch.Tensor, b_t: torch.Tensor, ends: torch.Tensor, offsets: torch.Tensor):
    """a [M, K] rows grouped by expert, b_t [E, K, N] (a transposed view), ends [E] int32 -> [M, N].

    torch._grouped_mm (one CUTLASS grouped GEMM on sm90) when this torch has it, else one GEMM per expert (this
    fallback reads the group sizes on the host)."""
    if hasattr(torch, "_grouped_mm"):
        try:
            return torch._grouped_mm(a, b_t, offs=ends)
        except RuntimeError:  # e.g. a torch/GPU combination without the sm90 kernel
            pass
    bounds = offsets.tolist()
    out = a.new_empty(a.shape[0], b_t.shape[2])
    for e in range(b_t.shape[0]):
        s0, s1 = bounds[e], bounds[e + 1]
        if s1 > s0:
            out[s0:s1] = a[s0:s1] @ b_t[e]
    return out


def _sort(ids: torch.Tensor, E: int):
    """Stable CUDA sort of the N*k assignments by expert: (offsets [E+1], ends [E], inv [A], tok [A]) int32."""
    A, k = ids.numel(), ids.shape[1]
    i32 = dict(dtype=torch.int32, device=ids.device)
    counts = torch.empty(max(1, -(-A // SORT_BLOCK)) * E, **i32)
    offsets, ends = torch.empty(E + 1, **i32), torch.empty(E, **i32)
    sorted_a, inv, tok = torch.empty(A, **i32), torch.empty(A, **i32), torch.empty(A, **i32)
    _build.extension().moe_sort(ids.reshape(-1).contiguous(), E, k, counts, offsets, ends, sorted_a, inv, tok)
    return offsets, ends, inv, tok


def _experts_stream(x, routed, w_gate, w_up, w_down, shared_h, add_norm=None):
    ids, w = routed
    offsets, _, inv, tok = _sort(ids, w_gate.shape[0])
    h = stream_gemm(x, tok, w_gate, w_up, offsets)  # [A, I] = SwiGLU, rows in sorted order
    ys = stream_gemm(h, None, w_down, None, offsets, early=True)  # [A, D]; the sort is two launches back
    return combine(ys, inv, w, shared_h, ids.shape[1], add_norm)


def _experts_wide(x, routed, w_gate, w_up, w_down, shared_h, add_norm=None):
    ids, w = routed
    offsets, _, inv, tok = _sort(ids, w_gate.shape[0])
    tma_gate_up, tma_down = tma_path(tok.numel(), w_gate.shape[0])
    h = (tma_gemm if tma_gate_up else wide_gemm)(x, tok, w_gate, w_up, offsets)  # [A, I] = SwiGLU, sorted rows
    ys = (tma_gemm if tma_down else wide_gemm)(h, None, w_down, None, offsets)  # [A, D]
    return combine(ys, inv, w, shared_h, ids.shape[1], add_norm)


def _experts_grouped(x, routed, w_gate, w_up, w_down, shared_h, add_norm=None):
    ids, w = routed
    k = ids.shape[1]
    I = w_gate.shape[1]
    offsets, ends, inv, _ = _sort(ids, w_gate.shape[0])
    xs = scatter_rows(x, inv, k)
    gu = packed_gate_up(w_gate, w_up)
    if gu is not None:
        t = _grouped_mm(xs, gu.transpose(1, 2), ends, offsets)  # [A, 2I]: gate | up
        g, u = t[:, :I], t[:, I:]
    else:
        g = _grouped_mm(xs, w_gate.transpose(1, 2), ends, offsets)
        u = _grouped_mm(xs, w_up.transpose(1, 2), ends, offsets)
    ys = _grouped_mm(swiglu(g, u), w_down.transpose(1, 2), ends, offsets)
    return combine(ys, inv, w, shared_h, k, add_norm)


PATHS = ("auto", "decode", "stream", "wide", "grouped")


def auto_path(N: int) -> str:
    """The expert path fused_moe takes for N tokens (module constants read per call)."""
    if N <= DECODE_MAX_TOKENS:
        return "decode"
    if N <= STREAM_MAX_TOKENS:
        return "stream"
    return "wide" if N <= WIDE_MAX_TOKENS else "grouped"


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
    add_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
):
    """MoE block forward: x [N, D] bf16 -> [N, D] in x's dtype. path: "auto" | "decode" | "stream" | "wide" | "grouped"
    ("auto": decode up to DECODE_MAX_TOKENS tokens, stream up to STREAM_MAX_TOKENS, wide up to WIDE_MAX_TOKENS,
    grouped above).

    add_norm = (residual [N, D], weight [D], eps): return (s, normed) = elementwise.add_rms_norm(residual, out, weight,
    eps) instead of out - the residual add and the next layer's input norm, done by the combine kernel on the way
    (bitwise the same; the MoE output is never written).

    w_gate / w_up may be the views returned by pack_gate_up (and the shared expert's gate / up likewise): the grouped
    path then runs one gate+up GEMM. "decode" with I > DECODE_MAX_INTERMEDIATE runs the stream path."""
    _check(x, router_weight, w_gate, w_up, w_down, cfg)
    if path not in PATHS:
        raise ValueError(f"fused_moe: path must be one of {', '.join(PATHS)}, got {path!r}")
    N, D = x.shape
    I = w_gate.shape[1]
    bf16 = all(t.dtype == torch.bfloat16 for t in (x, w_gate, w_up, w_down))
    if add_norm is not None:
        res = add_norm[0]
        if not (torch.is_tensor(res) and res.shape == x.shape and res.dtype == x.dtype and res.device == x.device):
            raise ValueError(f"fused_moe: add_norm's residual must be {x.dtype} {tuple(x.shape)} on {x.device} like x")
    if not (x.is_cuda and bf16 and _kernel_shapes_ok(D, I) and _build.available()) or N == 0:
        out = (moe_reference(x, router_weight, expert_bias, w_gate, w_up, w_down, shared, cfg).to(x.dtype) if N
               else x.new_empty(0, D))
        return out if add_norm is None else add_rms_norm(add_norm[0], out, add_norm[1], add_norm[2])
    if path == "auto":
        path = auto_path(N)
    if path == "decode" and I > DECODE_MAX_INTERMEDIATE:
        path = "stream"
    E = w_gate.shape[0]
    both = None
    if (path == "decode" or (path == "stream" and N <= STREAM_FOLD_MAX_TOKENS)) and E < MAX_EXPERTS:
        both = shared_as_expert(w_gate, w_up, w_down, shared)  # the shared expert as one more assignment
    if both is not None:
        w_gate, w_up, w_down = both
    append = E if both is not None else -1
    if path == "decode" and N <= SMALL_ROUTE_MAX_TOKENS:
        routed = route_decode(x, router_weight, expert_bias, cfg, append, w_gate.shape[0])
    else:
        routed = route(x, router_weight, expert_bias, cfg, append)
    experts = {"decode": _experts_decode, "stream": _experts_stream, "wide": _experts_wide,
               "grouped": _experts_grouped}[path]
    return experts(x, routed, w_gate, w_up, w_down, None if both is not None else _shared_hidden(x, shared), add_norm)


__all__ = ["fused_moe", "route", "route_align_small", "route_decode", "router_counter", "router_logits", "pack_moe", "shared_as_expert", "split_bf16x3", "pack_experts", "pack_gate_up", "packed_gate_up", "swiglu",
           "scatter_rows", "combine", "stream_gemm", "wide_gemm", "wide_config", "tma_gemm", "tma_path", "TMA_GATE_UP_MIN_MEAN_ROWS",
           "TMA_DOWN_MIN_MEAN_ROWS", "auto_path", "DECODE_MAX_TOKENS", "SMALL_ROUTE_MAX_TOKENS", "STREAM_FOLD_MAX_TOKENS", "STREAM_MAX_TOKENS", "DECODE_MAX_INTERMEDIATE",
           "DECODE_SMALL_PASSES", "RouterConfig",
           "RING_MINI_ROUTER"]
