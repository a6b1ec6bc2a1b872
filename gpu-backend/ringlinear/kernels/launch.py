"""Programmatic dependent launch of the decode path's kernels (sm_90).

With it on, each of our decode-path kernels (prologues, norms, lightning decode, paged attention, router, experts,
combine) may start while the kernel before it in the stream finishes: its launch and the loads it issues before its
`griddepcontrol.wait` - weights, and the lightning state, which no kernel of the step writes before it - overlap the
previous kernel's tail. The contract each kernel keeps is written in csrc/common.cuh. The switch is read at every
launch, so a CUDA graph keeps the setting it was captured with (DecodeGraphs.reset() drops the captured graphs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import _build


def set_programmatic_launch(on: bool) -> None:
    """Launch the decode-path kernels as programmatic dependents from now on (True, the default) or plainly (False).
    A no-op where the extension is unavailable (CPU: every wrapper runs its twin)."""
    if _build.available():
        _build.extension().set_programmatic_launch(bool(on))


def programmatic_launch() -> bool:
    """Whether the kernels are launched as programmatic dependents (False where the extension is unavailable)."""
    return _build.available() and bool(_build.extension().programmatic_launch())


@contextlib.contextmanager
def plain_launches() -> Iterator[None]:
    """Launch plainly inside the block (benchmarks' side-by-side rows, graphs captured that way), then restore the
    setting it found. Also a decorator: ``plain_launches()(fn)`` runs each call of fn that way."""
    saved = programmatic_launch()
    set_programmatic_launch(False)
    try:
        yield
    finally:
        set_programmatic_launch(saved)


__all__ = ["set_programmatic_launch", "programmatic_launch", "plain_launches"]
