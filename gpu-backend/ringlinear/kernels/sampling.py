"""A step's token draws in one launch (csrc/sampling.cu) beside its twin (sampling_reference.py, which defines the
draw: integer weights, top-k and top-p as thresholds on them, the inverse transform in token order).

`sample_rows` validates the rows' parameters on the host (ValueError naming the field), copies them to the device in
one pinned copy and queues the kernel: no host sync, no sort, whatever the number of top-p rows. Without CUDA or the
extension (or past the kernel's 4M-token vocabulary) the twin runs, with the same results.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _build
from ..ops.transfer import to_device
from .sampling_reference import SPEC_FIELDS, sample_rows_reference

KERNEL_MAX_VOCAB = (1 << 22) - 1  # csrc: weights of up to 2^40 each sum in 64 bits


def sample_rows(logits: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """logits [n, V] float32 (rows contiguous), spec [5, m] float64 on the host, one column per drawn row (SPEC_FIELDS:
    logits row, temperature (0 = greedy), top_k (0 = off), top_p (>= 1 = off), u in [0, 1)) -> [m] int64 token ids
    on logits' device."""
    if not torch.is_tensor(logits) or logits.dim() != 2 or logits.dtype != torch.float32 or logits.shape[1] < 1:
        raise ValueError(f"sample_rows: logits must be a float32 [n, V] tensor, got {getattr(logits, 'shape', logits)}")
    _check_spec(spec, logits.shape[0])
    m, V = spec.shape[1], logits.shape[1]
    if not (logits.is_cuda and V <= KERNEL_MAX_VOCAB and _build.available()):
        return sample_rows_reference(logits, spec)
    out = torch.empty(m, dtype=torch.int64, device=logits.device)
    if m:
        rows = logits if logits.stride(1) == 1 else logits.contiguous()
        _build.extension().sample_rows(rows, to_device(spec.contiguous(), logits.device), out)
    return out


def _check_spec(spec, n: int) -> None:
    if not torch.is_tensor(spec) or spec.dtype != torch.float64 or spec.dim() != 2 or spec.shape[0] != len(SPEC_FIELDS):
        raise ValueError(f"sample_rows: spec must be a float64 [{len(SPEC_FIELDS)}, m] tensor ({', '.join(SPEC_FIELDS)})")
    if spec.device.type != "cpu":
        raise ValueError("sample_rows: spec must be on the host (it is validated there and copied once)")
    row, temperature, top_k, top_p, u = spec.numpy()  # numpy: a few us for the whole table, where torch ops cost ~5 each
    with np.errstate(invalid="ignore"):
        checks = [("row", (row >= 0) & (row < n) & (row == np.floor(row))),
                  ("temperature", (temperature >= 0) & np.isfinite(temperature)),
                  ("top_k", (top_k >= 0) & (top_k == np.floor(top_k)) & np.isfinite(top_k)),
                  ("top_p", (top_p > 0) & (top_p <= 1)),
                  ("u", (u >= 0) & (u < 1))]
    for name, ok in checks:
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"sample_rows: {name} of column {bad} is out of range: {float(spec[SPEC_FIELDS.index(name), bad])!r}")
