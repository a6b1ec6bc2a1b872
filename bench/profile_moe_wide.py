"""The MoE expert GEMMs of one prompt chunk, each launched once inside a profiler range, for Nsight Compute:

    ncu --profile-from-start off --set full -o OUT/moe python3 bench/profile_moe_wide.py --tokens 16384

Runs (Ring-mini shapes, the engine's packed weights, one routing of random tokens; --kernels picks the groups): the
wide kernel's gate+up and down at 256-row passes (4 ring slots) and at 128-row passes (5 slots) ("wide"), the
CUTLASS grouped GEMMs the grouped path runs for the same work, on pre-scattered rows so the range holds only the GEMMs
("cutlass"), and moe_tma_gemm's gate+up and down ("tma")."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_kernels import M, RING_MINI_ROUTER, moe_weights  # noqa: E402
from gpu_timing import profile_once  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--kernels", default="wide,cutlass,tma", help="comma-separated groups: wide, cutlass, tma")
    args = ap.parse_args()
    groups = set(args.kernels.split(","))
    W, cfg = moe_weights(), RING_MINI_ROUTER
    x = torch.randn(args.tokens, 2048, device="cuda").to(torch.bfloat16)
    ids, _ = M.route(x, W["router_weight"], W["expert_bias"], cfg)
    offsets, ends, inv, tok = M._sort(ids, cfg.num_experts)
    gu = M.packed_gate_up(W["w_gate"], W["w_up"])
    xs = M.scatter_rows(x, inv, cfg.top_k)
    h = M.wide_gemm(x, tok, W["w_gate"], W["w_up"], offsets)
    runs = []
    if "wide" in groups:
        runs += [lambda: M.wide_gemm(x, tok, W["w_gate"], W["w_up"], offsets, 4, 256),
                 lambda: M.wide_gemm(h, None, W["w_down"], None, offsets, 4, 256),
                 lambda: M.wide_gemm(x, tok, W["w_gate"], W["w_up"], offsets, 5, 128),
                 lambda: M.wide_gemm(h, None, W["w_down"], None, offsets, 5, 128)]
    if "cutlass" in groups:
        runs += [lambda: M._grouped_mm(xs, gu.transpose(1, 2), ends, offsets),
                 lambda: M._grouped_mm(h, W["w_down"].transpose(1, 2), ends, offsets)]
    if "tma" in groups:
        runs += [lambda: M.tma_gemm(x, tok, W["w_gate"], W["w_up"], offsets),
                 lambda: M.tma_gemm(h, None, W["w_down"], None, offsets)]
    profile_once(runs)
    print(f"{args.tokens} tokens, max {int((offsets[1:] - offsets[:-1]).max())} rows per expert: profiled {len(runs)} GEMMs")


if __name__ == "__main__":
    main()
