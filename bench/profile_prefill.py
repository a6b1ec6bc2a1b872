"""The lightning prefill's three passes (state, scan, output) of one layer, launched once inside a profiler range, for
Nsight Compute:

    ncu --clock-control none --profile-from-start off --set full -o OUT/prefill python3 bench/profile_prefill.py

One sequence of each --T (default 16k and 128k), H=16, D=128, bf16, the auto plan, the bench's decay rates; --fused
runs the served variant (QK-norm + RoPE inside the prefill) instead. The range holds exactly the 3 kernels a length."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_kernels import D, H, L, gammas  # noqa: E402
from gpu_timing import profile_once  # noqa: E402


def served_prologue(T: int):
    """The served variant's QK-norm + RoPE for T positions (norm weights away from 1), as L.QKPrologue."""
    from ringlinear.ops.rope import rope_cos_sin

    pos = torch.arange(T, device="cuda")
    cos, sin = rope_cos_sin(pos, D // 2, 1e6)
    w = torch.rand(D, device="cuda") + 0.5
    return L.QKPrologue(w, w, 1e-6, cos, sin, pos, 1e6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="16384,131072")
    ap.add_argument("--fused", action="store_true", help="the fused QK prologue (the served path)")
    args = ap.parse_args()
    gamma = gammas()
    runs = []
    for T in (int(x) for x in args.T.split(",")):
        q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        state = torch.randn(1, H, D, D, device="cuda") * 0.01
        prep = L.prepare_prefill([T], [0], [True], H, D, "cuda")
        pro = served_prologue(T) if args.fused else None
        runs.append(lambda prep=prep, q=q, k=k, v=v, s=state, pro=pro:
                    L.run_prepared_prefill(prep, q, k, v, s, gamma, qk_prologue=pro))
        print(f"T={T}: block_len {prep.plan.block_len}, {len(prep.plan.items_state)} state + "
              f"{len(prep.plan.items_out)} output items a head")
    profile_once(runs)


if __name__ == "__main__":
    main()
