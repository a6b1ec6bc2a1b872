#!/usr/bin/env python3
"""Sweep the lightning prefill block length L (H=16, D=128) on the GPU; prints ms per L and the planner's pick.

    PYTHONPATH=gpu-backend python3 bench/sweep_prefill_block.py [--T 8192,16384,...] [--seqs N] [--L 1024,2048,...]
        [--graph]

--graph: time CUDA-graph replays (what the pod's steps run) instead of eager calls; both with the L2 flushed between
repetitions.

Used to fit `plan_prefill` (ringlinear/kernels/lightning.py); figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import graph_of  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu-backend"))
from ringlinear.kernels import lightning as L  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="4096,8192,16384,32768,65536,131072", help="tokens per sequence")
    ap.add_argument("--seqs", type=int, default=1, help="equal sequences in the varlen batch")
    ap.add_argument("--L", default="512,768,1024,1536,2048,3072,3968,4096,6144,8192", help="block lengths to try")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import triton.testing

    H, D = 16, 128
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    gamma = torch.exp(-torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]) * 0.5).float().cuda()
    rows = []
    n = args.seqs
    for T in [int(x) for x in args.T.split(",")]:
        q, k, v = (torch.randn(n * T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        state = torch.randn(n, H, D, D, device="cuda") * 0.01
        lens, slots, init = [T] * n, list(range(n)), [True] * n
        auto = L.plan_prefill(lens, slots, init, H, nsm).block_len
        cands = sorted({bl for bl in [int(x) for x in args.L.split(",")] + [auto] if bl <= T})
        res = {}
        for bl in cands:
            prep = L.prepare_prefill(lens, slots, init, H, D, "cuda", bl)
            run = lambda: L.run_prepared_prefill(prep, q, k, v, state, gamma)  # noqa: E731
            res[bl] = triton.testing.do_bench(graph_of(run) if args.graph else run, warmup=25, rep=200,
                                              return_mode="median")
        best = min(res, key=res.get)
        rows.append({"T": T, "seqs": n, "auto": auto, "ms": res, "best": best, "graph": args.graph})
        print(f"{n} x T={T:6d} auto L={auto} {res[auto]:.4f} ms | best L={best} {res[best]:.4f} ms "
              f"({res[auto] / res[best]:.2f}x the auto L) | "
              + " ".join(f"{bl}:{ms:.4f}" for bl, ms in res.items()), flush=True)
        del q, k, v
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
