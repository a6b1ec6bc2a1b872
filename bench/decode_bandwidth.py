#!/usr/bin/env python3
"""Lightning decode kernels vs the in-place-update ceiling, one H200 run (H=16, d=128, fp32 state read + written).

    PYTHONPATH=gpu-backend python3 bench/decode_bandwidth.py [--batches 64,256] [--json FILE]

Every figure is a CUDA-graph replay timed two ways, side by side:
  zero-flush   triton.testing.do_bench: a 256 MB buffer is zeroed before each repetition, so L2 starts full of
               dirty lines that the timed kernel pays to write back (the figures in docs/benchmarks.md);
  read-flush   CUDA events around each replay after a read of a 256 MB buffer: L2 starts cold and clean.
Rows: the decode kernel (64 and 32 state columns per block, the rows' slots shuffled; 64 with the rows in slot order,
as the engine schedules them; 64 with its L2 read-ahead off and at each --prefetch-mib distance; 64 launched
without the dependent-launch attribute) and two ceilings over the same bytes: the in-place scale of the state
(`state.mul_`, same addresses read then written, as decode does) and a copy into a second buffer. Ratios print
against the in-place ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_timing import graph_of  # noqa: E402
from ringlinear import kernels  # noqa: E402
from ringlinear.kernels import lightning as L  # noqa: E402

H, D = 16, 128


def zero_flush_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


_FLUSH = None


def read_flush_ms(fn, reps: int = 200) -> float:
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(256 << 20 >> 2, dtype=torch.float32, device="cuda")
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        _FLUSH.sum()  # reads 256 MB: evicts everything, dirties nothing
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--prefetch-mib", default="0,4,6,8,10,12",
                    help="L2 read-ahead distances to sweep, rows in slot order (MiB of state; 0 = off)")
    args = ap.parse_args()
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    gamma = torch.exp(-slopes * 0.5).float().cuda()
    plain_decode = kernels.plain_launches()(L.lightning_decode)
    rows = []
    for B in [int(x) for x in args.batches.split(",")]:
        q, k, v = (torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        state = torch.randn(B, H, D, D, device="cuda")
        other = torch.empty_like(state)
        slots = torch.randperm(B, device="cuda")
        in_order = torch.sort(slots).values
        out = torch.empty(B, H, D, device="cuda")
        nbytes = 2 * state.numel() * 4
        fns = {
            "cols64": lambda: L.lightning_decode(q, k, v, state, slots, gamma, out=out, cols_per_block=64),
            # the rows in slot order, as the engine schedules decodes: ascending state addresses
            "cols64_slot_order": lambda: L.lightning_decode(q, k, v, state, in_order, gamma, out=out),
            "cols64_no_prefetch": lambda: L.lightning_decode(q, k, v, state, slots, gamma, out=out, prefetch_bytes=0),
            # the same launched plainly (no programmatic-dependent-launch attribute), as with --no-dependent-launch
            "cols64_slot_order_plain_launch": lambda: plain_decode(q, k, v, state, in_order, gamma, out=out),
            "cols32": lambda: L.lightning_decode(q, k, v, state, slots, gamma, out=out, cols_per_block=32),
            "inplace_ceiling": lambda: state.mul_(0.9999),
            "copy_ceiling": lambda: other.copy_(state),
        }
        for mib in [int(x) for x in args.prefetch_mib.split(",") if x]:
            fns[f"slot_order_pf{mib}MiB"] = lambda mib=mib: L.lightning_decode(q, k, v, state, in_order, gamma, out=out,
                                                                               prefetch_bytes=mib << 20)
        row = {"B": B, "bytes": nbytes}
        for name, fn in fns.items():
            g = graph_of(fn)
            for timer, tf in (("zero_flush", zero_flush_ms), ("read_flush", read_flush_ms)):
                ms = tf(g)
                row[f"{name}_{timer}_us"] = ms * 1e3
                row[f"{name}_{timer}_GBps"] = nbytes / ms / 1e6
        rows.append(row)
        for timer in ("zero_flush", "read_flush"):
            ceil = row[f"inplace_ceiling_{timer}_GBps"]
            print(f"B={B:4d} {timer:10s} " + " | ".join(
                f"{n} {row[f'{n}_{timer}_us']:.1f} us {row[f'{n}_{timer}_GBps']:.0f} GB/s ({row[f'{n}_{timer}_GBps'] / ceil:.2f}x)"
                for n in fns), flush=True)
        del q, k, v, state, other
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": rows}, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
