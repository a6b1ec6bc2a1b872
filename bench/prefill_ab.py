#!/usr/bin/env python3
"""A/B of the lightning prefill kernel between builds on the GPU, in one call: the working tree's gpu-backend and
another revision's (and optionally more), each built into its own extension dir, timed in alternating processes (a
board near its power limit clocks down as a run goes on, so each side gets every position). H=16, D=128, one
sequence, the auto plan.

    git archive REV gpu-backend | tar -x -C build/ab/base          # here: the other side (carry build/ab)
    python3 bench/prefill_ab.py --base build/ab/base --out $OUT   # on the GPU machine (each side gets its PYTHONPATH)
    ... --also wip=build/ab/wip                                     # more sides, each against the base

Per side and length: eager (do_bench, L2 flushed), graph replay, the state pass + scan alone, SM clock / power during
the graph timing, fla's chunk_simple_gla as a graph replay in the same process when fla imports (the peer of issue
6 a); and each side's outputs and final states compared with the base's (relative L2 difference, bitwise). Figures in
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
    try:  # the peer, timed in every side's process (its figure moves with the board like ours)
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # noqa: BLE001 - fla absent: ours only
        chunk_simple_gla = None
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
        states_only = dataclasses.replace(prep, items_out=prep.items_out[:0])  # (a side's own table width)
        r["state_pass_plus_scan_ms"] = bench(lambda: L.run_prepared_prefill(states_only, q, k, v, scratch, gamma))
        if chunk_simple_gla is not None:
            s_fla, g_log = state.clone(), torch.log(gamma)
            r["fla_graph_ms"] = bench(graph_of(lambda: chunk_simple_gla(
                q[None], k[None], v[None], g_gamma=g_log, scale=D**-0.5, initial_state=s_fla,
                output_final_state=True)))
        s_once = state.clone()
        o = L.run_prepared_prefill(prep, q, k, v, s_once, gamma)
        torch.save({"o": o.cpu(), "state": s_once.cpu()}, SCRATCH / f"ab_{tag}_{T}.pt")
        res[T] = r
        del q, k, v, o
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="the other side: a directory holding a gpu-backend tree")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=DIR",
                    help="one more side (a directory holding a gpu-backend tree), compared with the base too")
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
    for spec in args.also:
        name, _, path = spec.partition("=")
        if not name or not path or name in sides:
            ap.error(f"--also wants a new NAME=DIR, got {spec!r}")
        sides[name] = (Path(path).resolve() / "gpu-backend", Path(f"/tmp/prefill_ab_ext_{name}"))

    def env(side):  # the side's tree first; what PYTHONPATH held (fla's wheels) after it
        path, ext = sides[side]
        rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != ROOT / "gpu-backend"]
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), *rest]), "TORCH_EXTENSIONS_DIR": str(ext)}

    build = "from ringlinear.kernels import _build; _build.extension()"
    jobs = max(1, (os.cpu_count() or 2) // len(sides))
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
    others = [s for s in sides if s != "base"]
    rel = lambda x, y: ((x.double() - y.double()).norm() / y.double().norm()).item()  # noqa: E731
    print(f"{'T':>7} | {'side':>8} | {'eager / graph ms':>20} | speed vs base (graph) | vs fla (graph) | o rel diff, bitwise")
    for T in Ts:
        best = {s: {k: min(r[str(T)][k] for r in rounds[s]) for k in ("eager_ms", "graph_ms")} for s in sides}
        flas = [r[str(T)]["fla_graph_ms"] for s in sides for r in rounds[s] if "fla_graph_ms" in r[str(T)]]
        base = torch.load(SCRATCH / f"ab_base_{T}.pt")
        for side in ["base", *others]:
            b = torch.load(SCRATCH / f"ab_{side}_{T}.pt")
            d = {"o_rel": rel(b["o"], base["o"]), "state_rel": rel(b["state"], base["state"]),
                 "bitwise": torch.equal(base["o"], b["o"]) and torch.equal(base["state"], b["state"])}
            result["diff"].setdefault(side, {})[T] = d
            vs_fla = f"{min(flas) / best[side]['graph_ms']:>13.2f}x" if flas else f"{'-':>14}"
            print(f"{T:>7} | {side:>8} | {best[side]['eager_ms']:>8.4f} / {best[side]['graph_ms']:<9.4f} | "
                  f"{best['base']['graph_ms'] / best[side]['graph_ms']:>20.3f}x | {vs_fla} | "
                  f"{d['o_rel']:.2e}, {d['bitwise']}")
        if flas:
            result.setdefault("fla_graph_ms_best", {})[T] = min(flas)
    (args.out / "prefill_ab.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
