#!/usr/bin/env python3
"""A/B of the lightning prefill kernel between two builds on the GPU, in one call: the working tree's gpu-backend and
another revision's, each built into its own extension dir, timed in alternating processes (a board near its power
limit clocks down as a run goes on, so each side gets every position). H=16, D=128, one sequence, the auto plan.

    git archive REV gpu-backend | tar -x -C build/ab/base          # here: the other side (carry build/ab)
    python3 bench/prefill_ab.py --base build/ab/base --out $OUT   # on the GPU machine (each side gets its PYTHONPATH)

Per side and length: eager (do_bench, L2 flushed), graph replay, the state pass + scan alone, SM clock / power during
the graph timing; and the two sides' outputs and final states compared (relative L2 difference). Figures in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H, D = 16, 128
SCRATCH = Path("/tmp/prefill_ab")  # each side's outputs, compared at the end (0.5 GB a side at 128k)


def measure(tag: str, Ts: list[int]) -> dict:
    """One side, in this process (its ringlinear comes from PYTHONPATH)."""
    import torch
    import triton.testing

    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_timing import ClockLog, graph_of
    from ringlinear.kernels import lightning as L

    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    # a middle layer of Ring-mini, as gpu_kernels.gammas() (not imported: that module puts the tree's gpu-backend first
    # on sys.path, and the base side must load its own)
    gamma = torch.exp(-slopes * (1 - 10 / 19 + 1e-5)).float().cuda()
    none = torch.empty(0, 4, dtype=torch.int32, device="cuda")
    res = {}
    for T in Ts:
        g = torch.Generator("cuda").manual_seed(T)
        q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        state = torch.randn(1, H, D, D, device="cuda", generator=g) * 0.01
        prep = L.prepare_prefill([T], [0], [True], H, D, "cuda", L.plan_prefill([T], [0], [True], H, nsm).block_len)
        s = state.clone()
        run = lambda: L.run_prepared_prefill(prep, q, k, v, s, gamma)  # noqa: E731
        r = {"eager_ms": bench(run)}
        with ClockLog() as clocks:
            r["graph_ms"] = bench(graph_of(run))
        r["clocks"] = clocks.summary()
        scratch = state.clone()
        states_only = dataclasses.replace(prep, items_out=none)
        r["state_pass_plus_scan_ms"] = bench(lambda: L.run_prepared_prefill(states_only, q, k, v, scratch, gamma))
        s_once = state.clone()
        o = L.run_prepared_prefill(prep, q, k, v, s_once, gamma)
        torch.save({"o": o.cpu(), "state": s_once.cpu()}, SCRATCH / f"ab_{tag}_{T}.pt")
        res[T] = r
        del q, k, v, o
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="the other side: a directory holding a gpu-backend tree")
    ap.add_argument("--T", default="4096,16384,65536,131072")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # worker mode: measure one side, print JSON
    args = ap.parse_args()
    Ts = [int(x) for x in args.T.split(",")]
    SCRATCH.mkdir(parents=True, exist_ok=True)
    if args.side:
        print(json.dumps(measure(args.side, Ts)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.base is None:
        ap.error("--base is required")
    sides = {"base": (args.base.resolve() / "gpu-backend", Path("/tmp/prefill_ab_ext_base")),
             "tree": (ROOT / "gpu-backend", Path(os.environ.get("TORCH_EXTENSIONS_DIR", ROOT / "build" / "torch_ext")))}

    def env(side):
        path, ext = sides[side]
        return {**os.environ, "PYTHONPATH": str(path), "TORCH_EXTENSIONS_DIR": str(ext)}

    build = "from ringlinear.kernels import _build; _build.extension()"
    jobs = max(1, (os.cpu_count() or 2) // 2)
    procs = [subprocess.Popen([sys.executable, "-c", build], env={**env(s), "MAX_JOBS": str(jobs)}) for s in sides]
    if any(p.wait() for p in procs):
        sys.exit("prefill_ab: a build failed")
    rounds = {s: [] for s in sides}
    for _ in range(args.rounds):
        for side in sides:
            line = subprocess.run([sys.executable, __file__, "--side", side, "--T", args.T],
                                  env=env(side), check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            rounds[side].append(json.loads(line))
    import torch

    result = {"rounds": rounds, "diff": {}}
    print(f"{'T':>7} | {'base eager / graph ms':>24} | {'tree eager / graph ms':>24} | tree speed (graph) | o rel diff")
    for T in Ts:
        best = {s: {k: min(r[str(T)][k] for r in rounds[s]) for k in ("eager_ms", "graph_ms")} for s in sides}
        a, b = (torch.load(SCRATCH / f"ab_{s}_{T}.pt") for s in sides)
        rel = lambda x, y: ((x.double() - y.double()).norm() / y.double().norm()).item()  # noqa: E731
        result["diff"][T] = {"o_rel": rel(b["o"], a["o"]), "state_rel": rel(b["state"], a["state"]),
                             "bitwise": torch.equal(a["o"], b["o"]) and torch.equal(a["state"], b["state"])}
        print(f"{T:>7} | {best['base']['eager_ms']:>11.4f} / {best['base']['graph_ms']:<10.4f} | "
              f"{best['tree']['eager_ms']:>11.4f} / {best['tree']['graph_ms']:<10.4f} | "
              f"{best['base']['graph_ms'] / best['tree']['graph_ms']:>17.3f}x | {result['diff'][T]['o_rel']:.2e}")
    (args.out / "prefill_ab.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
