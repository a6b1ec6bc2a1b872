"""Twin of the decode projections' GEMV kernel (gemv.py): x W^T in fp32, rounded once to x's dtype."""

from __future__ import annotations

import torch


def linear_small_reference(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, M] = x [N, K] @ w [M, K]^T, accumulated in fp32 and rounded to x's dtype (what nn.Linear gives up to the
    order of the fp32 sums), written into `out` when given."""
    y = (x.float() @ w.float().t()).to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def linear_small_bytes(N: int, M: int, K: int, itemsize: int = 2) -> int:
    """Bytes the projection must move: the weight, the x rows and the y rows."""
    return (M * K + N * K + N * M) * itemsize
