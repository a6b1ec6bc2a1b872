"""The decode steps' dense projections (qkv, gate, output, lm_head) for a few tokens, beside their twin
(gemv_reference.py).

    linear_small(x, w)    y = x w^T for x [N <= GEMV_MAX_TOKENS, K] and an nn.Linear weight w [M, K], bf16

At a few tokens a projection streams its weight once and cuBLAS is already near that stream's latency; these kernels
are launched as programmatic dependents (kernels/launch.py), so their weight loads start while the norm or gate
kernel before them still runs. One row goes through a CUDA-core GEMV (`dense_gemv`, a warp per output row), two to
eight through `skinny_gemm`, where the weights are the 16-row operand of tensor-core mma.sync and the x rows its 8
columns (csrc/gemv.cu). On CUDA with the extension and bf16 rows of 16-byte vectors a kernel runs; anything else runs
the twin. No host synchronisation, no allocation with `out`: capturable in CUDA graphs.
"""

from __future__ import annotations

import torch

from . import _build
from .gemv_reference import linear_small_reference

GEMV_MAX_TOKENS = 8  # csrc kMmaTokens: the n of skinny_gemm's mma
DENSE_GEMV_MAX_X_BYTES = 96 * 1024  # dense_gemv stages its x row in shared memory


def _check(x, w, out) -> None:
    fn = "linear_small"
    for name, t in (("x", x), ("w", w)):
        if not torch.is_tensor(t) or t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be a 2-d tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if not x.is_floating_point() or w.dtype != x.dtype:
        raise ValueError(f"{fn}: x and w must share a floating dtype, got {x.dtype} and {w.dtype}")
    if w.device != x.device:
        raise ValueError(f"{fn}: w is on {w.device}, x on {x.device}")
    N, K = x.shape
    if N > GEMV_MAX_TOKENS:
        raise ValueError(f"{fn}: x has {N} rows, at most {GEMV_MAX_TOKENS} (use a GEMM)")
    if w.shape[1] != K:
        raise ValueError(f"{fn}: w is {tuple(w.shape)}, expected [M, {K}] for x {tuple(x.shape)}")
    if out is not None and (not torch.is_tensor(out) or out.shape != (N, w.shape[0]) or out.dtype != x.dtype
                            or out.device != x.device or out.stride(-1) != 1):
        raise ValueError(f"{fn}: out must be a [{N}, {w.shape[0]}] {x.dtype} tensor on {x.device} with unit column "
                         f"stride, got {getattr(out, 'shape', type(out).__name__)}")


def _kernel_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    rows16 = lambda t: t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0  # noqa: E731
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0 and rows16(x) and rows16(w)
            and _build.available())


def skinny_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the mma kernel takes x [N, K] @ w^T (the MoE router uses it for its fp32 logits): 1..GEMV_MAX_TOKENS
    bf16 rows of 16-byte vectors on CUDA, the extension built."""
    return 0 < x.shape[0] <= GEMV_MAX_TOKENS and w.dtype == x.dtype and _kernel_ok(x, w)


def linear_small(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, M] = x [N, K] @ w [M, K]^T with fp32 accumulation, in x's dtype (nn.Linear without bias, up to the order
    of the fp32 sums), for N <= GEMV_MAX_TOKENS rows; into `out` ([N, M], unit column stride) when given."""
    _check(x, w, out)
    if not _kernel_ok(x, w):
        return linear_small_reference(x, w, out)
    if out is None:
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    N, K = x.shape
    if N == 1 and K * 2 <= DENSE_GEMV_MAX_X_BYTES:
        _build.extension().dense_gemv(x, w, out)
    elif N and w.shape[0]:
        _build.extension().skinny_gemm(x, w, out, 0)
    return out


__all__ = ["linear_small", "skinny_ok", "GEMV_MAX_TOKENS"]
