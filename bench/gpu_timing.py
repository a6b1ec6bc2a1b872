"""Timing helpers shared by the GPU benchmarks: one timer, CUDA-graph capture, the copy-bandwidth ceiling.

    method, ms = timer(device, quick)   # ms(fn) -> median milliseconds of fn()
    events_ms(fn, reps)                 # median milliseconds by CUDA events, no L2 flush
    replay = graph_of(fn)               # fn captured once, replayed (fn itself off CUDA)
    copy_gbs(device, ms)                # device-to-device copy, read + write bytes, GB/s
    with ClockLog() as log: ...         # log.summary(): SM clock and board power over the block (nvidia-smi)
    profile_once(runs)                  # each run warmed, then once more each inside a CUDA profiler range (ncu)

On CUDA the timer is triton.testing.do_bench (L2 flushed between repetitions) when triton imports, else CUDA events;
on a CPU it is perf_counter, so the benches' --quick modes smoke-test their harness without a GPU.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from typing import Callable

import torch


def timer(device: torch.device, quick: bool = False) -> tuple[str, Callable[[Callable[[], object]], float]]:
    if device.type == "cuda":
        try:
            import triton.testing

            return "triton.do_bench", lambda fn: triton.testing.do_bench(fn, warmup=25, rep=20 if quick else 200,
                                                                         return_mode="median")
        except ImportError:
            pass

        return "cuda events", lambda fn: events_ms(fn, 10 if quick else 100)

    def wall(fn):
        fn()
        times = []
        for _ in range(3 if quick else 20):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    return "perf_counter (CPU smoke test)", wall


def events_ms(fn: Callable[[], object], reps: int = 100, warmup: int = 10) -> float:
    """Median ms of fn() by CUDA events, without flushing L2 between repetitions (for work that walks more memory than
    L2 holds by itself, or that should see L2 as a step leaves it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_of(fn: Callable[[], object], cuda: bool = True) -> Callable[[], object]:
    """Capture fn after a warm-up on a side stream; return the replay closure (or fn itself without CUDA)."""
    if not cuda:
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def profile_once(runs: list[Callable[[], object]]) -> None:
    """Each run once to warm it (built, allocated), then once more each inside one CUDA profiler range: what
    `ncu --profile-from-start off` (or nsys with the cudaProfilerApi capture range) records."""
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def copy_gbs(device: torch.device, ms: Callable[[Callable[[], object]], float], quick: bool = False) -> float:
    """Device-to-device copy of 1 GiB (64 MiB with quick or on a CPU): bytes read + written per second, in GB/s."""
    n = (1 << 30) if device.type == "cuda" and not quick else (64 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    t = ms(lambda: b.copy_(a))
    del a, b
    return 2 * n / t / 1e6


class ClockLog:
    """nvidia-smi samples of the GPU's SM clock (MHz) and board power (W) every period_ms while the block runs, to tell
    a figure taken at full clocks from one taken while the board held its power limit (the same prefill kernel measured
    0.805-1.01 ms at 128k on different H200s). summary() is {} without nvidia-smi or samples."""

    def __init__(self, period_ms: int = 50):
        self.period_ms = period_ms
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def __enter__(self) -> "ClockLog":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        index = visible if visible.isdigit() else str(torch.cuda.current_device() if torch.cuda.is_available() else 0)
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 f"--loop-ms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                out, _ = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
            self.lines = out.splitlines()

    def summary(self) -> dict:
        clocks, watts = [], []
        for line in self.lines:
            parts = [p.strip() for p in line.split(",")]
            try:
                mhz, w = float(parts[0]), float(parts[1])
            except (IndexError, ValueError):  # "[N/A]", a partial last line
                continue
            clocks.append(mhz)
            watts.append(w)
        if not clocks:
            return {}
        return {"samples": len(clocks), "sm_mhz_min": min(clocks), "sm_mhz_median": statistics.median(clocks),
                "power_w_max": max(watts)}
