"""CUDA-graph helpers: a decode step captured once per padded batch size, and the pieces of a step between its
attention calls captured at one fixed row count; both replay with copied-in inputs.

DecodeGraphs: the step function works on static input buffers whose first dimension is the padded batch; rows past
the real batch are filled with each input's pad value (e.g. slot -1, which the lightning decode kernel treats as
"touch nothing").
PieceGraphs: for the steps that carry prompt tokens (beside the streams or not), whose attention changes shape every
step: everything else of the step (norms, projections, prologues, MoE) is captured per padded row count, and the
attention runs eagerly between the replays. Such steps are bound by the host's launch rate, and a replay is one launch.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Padded decode batch sizes (a decode step of B requests replays the smallest captured size >= B).
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def capture_graph(fn: Callable[[], torch.Tensor], pool=None, warmup: int = 1):
    """(graph, output) of one captured call of fn, after `warmup` eager calls on a side stream (lazy initialisation,
    library plans and allocator growth stay out of the graph). RuntimeError when fn cannot be captured (e.g. it
    synchronises with the host); out-of-memory errors are raised as they are."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class PieceGraphs:
    """Zero-argument functions (the pieces of a step between its attention calls) that read and write buffers the
    caller owns, each captured once, in order, into one shared memory pool (`pool`: an earlier PieceGraphs' pool, to
    share it across sizes). pieces(i) replays piece i; the caller runs whatever is not captured (the attention, whose
    shapes change every step) between the replays, reading and writing the same buffers.

    eager=True runs the functions instead of capturing them (CPU runs and tests of the callers' buffer handling:
    everything but the capture itself).
    """

    def __init__(self, fns: list[Callable[[], object]], pool=None, warmup: int = 1, eager: bool = False):
        self.fns, self.eager, self.pool = list(fns), eager, pool
        self._graphs: list[torch.cuda.CUDAGraph] = []
        if eager:
            return
        for fn in self.fns:
            graph, _ = capture_graph(fn, self.pool, warmup)
            self.pool = graph.pool()
            self._graphs.append(graph)
        for graph in self._graphs:
            graph.replay()  # the first launch uploads the graph: start-up work, not a request's

    def __len__(self) -> int:
        return len(self.fns)

    def __call__(self, i: int) -> None:
        if self.eager:
            self.fns[i]()
        else:
            self._graphs[i].replay()


class DecodeGraphs:
    """step(inputs: dict[str, Tensor]) -> Tensor, captured per batch bucket.

    make_inputs(batch) must allocate the static inputs for a padded batch (first dim = batch); pad maps an input
    name to the value written into padding rows (default 0).
    """

    def __init__(
        self,
        step: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        make_inputs: Callable[[int], dict[str, torch.Tensor]],
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
        pad: dict[str, float] | None = None,
        warmup: int = 2,
    ):
        if not batch_sizes or sorted(set(batch_sizes)) != list(batch_sizes) or batch_sizes[0] < 1:
            raise ValueError(f"DecodeGraphs: batch_sizes must be strictly increasing positive ints, got {batch_sizes}")
        self.step, self.make_inputs, self.batch_sizes = step, make_inputs, tuple(batch_sizes)
        self.pad = dict(pad or {})
        self.warmup = warmup
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self._pool = None
        self.uncapturable: dict[int, str] = {}  # bucket -> why its capture failed (those batches run eagerly)

    def bucket(self, batch: int) -> int:
        for b in self.batch_sizes:
            if b >= batch:
                return b
        raise ValueError(f"DecodeGraphs: batch {batch} exceeds the largest captured size {self.batch_sizes[-1]}")

    def _capture(self, bp: int):
        inputs = self.make_inputs(bp)
        for name, t in inputs.items():
            t.fill_(self.pad.get(name, 0))
        try:
            graph, out = capture_graph(lambda: self.step(inputs), self._pool, self.warmup)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # e.g. an op that synchronises with the host: this bucket stays eager
            self.uncapturable[bp] = str(exc).splitlines()[0]
            log.warning("decode graph for batch %d not captured, running it eagerly: %s", bp, self.uncapturable[bp])
            torch.cuda.synchronize()
            return
        self._pool = graph.pool()
        self._graphs[bp] = (graph, inputs, out)
        # One replay on the padding inputs (they touch no request's state): the first launch of an instantiated graph
        # also uploads it to the device, work that belongs to start-up, not to the first request's step.
        graph.replay()

    def reset(self) -> None:
        """Forget the captured graphs (and their pool): each bucket is captured again at its next call, with the
        kernels' launch settings of then (kernels.set_programmatic_launch)."""
        self._graphs.clear()
        self.uncapturable.clear()
        self._pool = None

    def capture_all(self):
        for b in self.batch_sizes:
            if b not in self._graphs and b not in self.uncapturable:
                self._capture(b)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = next(iter(inputs.values())).shape[0]
        bp = self.bucket(batch)
        if bp not in self._graphs and bp not in self.uncapturable:
            self._capture(bp)
        if bp in self.uncapturable:
            return self.step(inputs)
        graph, static, out = self._graphs[bp]
        for name, buf in static.items():
            src = inputs[name]
            if src.shape[0] != batch:
                raise ValueError(f"DecodeGraphs: input {name!r} has batch {src.shape[0]}, expected {batch}")
            buf[:batch].copy_(src)
            if batch < bp:
                buf[batch:].fill_(self.pad.get(name, 0))
        graph.replay()
        return out[:batch]


__all__ = ["DecodeGraphs", "PieceGraphs", "capture_graph", "DEFAULT_BATCH_SIZES"]
