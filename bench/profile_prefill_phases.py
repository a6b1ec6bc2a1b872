#!/usr/bin/env python3
"""Where a lightning prefill spends its time, CTA by CTA (H200). Builds the extension a second time with
-DRL_PREFILL_STAMPS (its own TORCH_EXTENSIONS_DIR): each CTA of the state pass, the scan and the output pass then reads
the GPU's ns timer at its phase boundaries and stores them in a device buffer, read back by the extension's
prefill_stamps() (csrc/lightning_prefill.cu, STAMP). One layer, B=1, H=16, D=128, the auto plan; after warm-up, one
launch eagerly and one as a CUDA-graph replay (where the scan and the output pass start early, as dependent launches).
--fused: the served variant (QK-norm + RoPE in the kernel).

    python3 bench/profile_prefill_phases.py --out $OUT [--T 4096,16384] [--fused]

Stamps, us from the state pass's first CTA start (min / median / max over a pass's CTAs). State and output passes:
0 start, 1 barriers set up (the decays read), 2 the first boxes issued (the item row read), 3 (output pass) pdl_wait
returned, 4 (output pass) entering state's loads issued, 5 first chunk landed, 6 walk done, 7 end. Scan: 0 start,
1 its wait returned (the state pass is complete), 7 end. Then the output pass's tail (walk done -> end of the CTAs that
write a slot and of the others, and the stamps of the CTA that ended last), the chunk loop's phases (CLK): median
cycles of each, per pass, the SM clock during each walk (its cycles over its ns, where the clocks cover a whole
walk: blocks of at most 8 chunks, e.g. T=4096), and how many cycles the output pass's second warpgroup runs behind its
first at each phase boundary. Figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("state pass", "scan", "output pass")


def worker(T: int, fused: bool) -> None:
    """In this process: the stamped build, warm-up launches, then each timed launch's stamps as one JSON line."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    from gpu_kernels import D, H, L, gammas  # (puts the tree's gpu-backend on sys.path)
    from gpu_timing import graph_of
    from profile_prefill import served_prologue
    from ringlinear.kernels import _build

    _build.NVCC_FLAGS = _build.NVCC_FLAGS + ["-DRL_PREFILL_STAMPS"]  # read when extension() first builds
    ext = _build.extension()
    gamma = gammas()
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(1, H, D, D, device="cuda") * 0.01
    prep = L.prepare_prefill([T], [0], [True], H, D, "cuda")
    pro = served_prologue(T) if fused else None
    run = lambda: L.run_prepared_prefill(prep, q, k, v, state, gamma, qk_prologue=pro)  # noqa: E731
    replay = graph_of(run)
    for fn in (run, replay):
        for _ in range(5):
            fn()
    torch.cuda.synchronize()
    ext.prefill_stamps()  # clears the warm-up's
    ext.prefill_chunk_clocks()
    out = {}
    for name, fn in (("eager", run), ("graph", replay)):
        fn()
        torch.cuda.synchronize()
        stamps = ext.prefill_stamps()
        out[name] = summarize(stamps)
        out[name]["output tail"] = output_tail(stamps, [slot >= 0 for (_, _, _, slot) in prep.plan.items_out])
        clocks = ext.prefill_chunk_clocks()
        out[name]["chunk phases"] = summarize_chunks(clocks)
        items = {"state pass": prep.plan.items_state, "output pass": prep.plan.items_out}
        out[name]["walk clock"] = walk_clock(stamps, clocks, items)
        out[name]["warpgroup 1 behind 0, cycles"] = warpgroup_lag(clocks)
    print(json.dumps(out))


def first_start(stamps) -> int:
    """ns of the first CTA's start: the state pass's (the scan's when a plan has no state pass)."""
    ran = (stamps[p][stamps[p][:, 0] > 0] for p in range(len(PASSES)))
    return int(next(r for r in ran if len(r))[:, 0].min())


def summarize(stamps) -> dict:
    """[pass][CTA][stamp] ns -> per pass: CTAs that ran, and (min, median, max) us of each stamp from the first start."""
    ran = [stamps[p][stamps[p][:, 0] > 0] for p in range(len(PASSES))]
    t0 = first_start(stamps)
    out = {}
    for p, rows in enumerate(ran):
        if not len(rows):
            continue
        st = {}
        for i in range(8):
            vals = sorted((int(x) - t0) / 1e3 for x in rows[:, i] if x > 0)
            if vals:
                st[i] = (vals[0], statistics.median(vals), vals[-1])
        out[PASSES[p]] = {"ctas": len(rows), "stamps_us": st}
    return out


def output_tail(stamps, writes_slot: list[bool]) -> dict:
    """What makes the output pass end late: walk done -> end (us, median) for the CTAs that write a sequence's final
    state to its slot and for the others, and the stamps of the CTA that ended last (CTA i runs item i % items)."""
    rows = stamps[2]
    ran = [i for i in range(rows.shape[0]) if rows[i, 0] > 0]
    if not ran:
        return {}
    t0 = first_start(stamps)
    us = lambda i, k: (int(rows[i, k]) - t0) / 1e3 if rows[i, k] > 0 else None  # noqa: E731
    tail = {True: [], False: []}
    for i in ran:
        if rows[i, 6] > 0 and rows[i, 7] > 0:
            tail[writes_slot[i % len(writes_slot)]].append((int(rows[i, 7]) - int(rows[i, 6])) / 1e3)
    last = max(ran, key=lambda i: int(rows[i, 7]))
    return {"walk done -> end, slot writers": statistics.median(tail[True]) if tail[True] else None,
            "walk done -> end, others": statistics.median(tail[False]) if tail[False] else None,
            "last CTA": {"writes slot": writes_slot[last % len(writes_slot)],
                         "stamps_us": {k: us(last, k) for k in range(8) if rows[last, k] > 0}}}


# The chunk loop's phase boundaries (csrc/lightning_prefill.cu, CLK): each phase ends at its stamp and starts at the
# previous stamp the pass records (the state pass has no score / output phases).
CHUNK_PHASES = {0: "loop top", 1: "tiles landed (mbarrier)", 2: "CTA barrier 1", 3: "next loads, last chunk's store",
                4: "S packed, scores + inter issued", 5: "scores + inter done", 6: "mask, P stored, inter scaled",
                7: "CTA barrier 2 (P complete)", 8: "intra + state update issued", 9: "intra done",
                10: "O staged (stmatrix)", 11: "state update done"}


def clock_rows(clk, p: int):
    """Pass p's chunk clocks ([CTA][warpgroup][chunk][phase]) of the CTAs that ran, as unsigned cycle counts."""
    return clk[p][clk[p][:, 0, 0, 0] != 0].long() & 0xFFFFFFFF


def summarize_chunks(clk) -> dict:
    """[pass][CTA][warpgroup][chunk][phase] cycles -> per pass: the median cycles of each phase and of a whole chunk
    (loop top to the next loop top), over CTAs, both warpgroups and chunks 1..6 (chunk 0 apart: its ramp); and the
    same per warpgroup ("warpgroup 0/1", chunks 1..6), whose phases differ where one of its threads does work alone."""
    out = {}
    for p, name in ((0, "state pass"), (1, "output pass")):
        rows = clock_rows(clk, p)
        if not len(rows):
            continue
        present = [i for i in range(clk.shape[-1]) if bool((rows[:, :, 1, i] != 0).any())]
        res = {"ctas": len(rows)}
        groups = [("chunk 0", [0], slice(None)), ("chunks 1-6", list(range(1, 7)), slice(None))]
        groups += [(f"warpgroup {g}, chunks 1-6", list(range(1, 7)), slice(g, g + 1)) for g in range(rows.shape[1])]
        for label, chunks, wgs in groups:
            sel = rows[:, wgs]
            if not bool((sel[:, :, chunks[0], 0] != 0).any()):
                continue
            ph = {}
            for a, b in zip(present, present[1:]):
                d = ((sel[:, :, chunks, b] - sel[:, :, chunks, a]) & 0xFFFFFFFF).flatten()
                d = d[(sel[:, :, chunks, b].flatten() != 0) & (sel[:, :, chunks, a].flatten() != 0)]
                if len(d):
                    ph[CHUNK_PHASES[b]] = float(d.float().median())
            nxt = [c + 1 for c in chunks]
            d = ((sel[:, :, nxt, 0] - sel[:, :, chunks, 0]) & 0xFFFFFFFF).flatten()
            d = d[(sel[:, :, nxt, 0].flatten() != 0)]
            res[label] = {"phases": ph, "chunk": float(d.float().median()) if len(d) else None}
        out[name] = res
    return out


def warpgroup_lag(clk) -> dict:
    """How far warpgroup 1 runs behind warpgroup 0 in the output pass: per phase boundary (CLK point), the median over
    CTAs and chunks 1..6 of warpgroup 1's cycle count minus warpgroup 0's at the same point (signed; the two read one
    SM's counter). ~0 where the two run in lockstep; about half a chunk where they take turns at the tensor cores."""
    rows = clock_rows(clk, 1)
    out = {}
    for i in range(clk.shape[-1]):
        a, b = rows[:, 0, 1:7, i].flatten(), rows[:, 1, 1:7, i].flatten()
        ok = (a != 0) & (b != 0)
        if bool(ok.any()):
            d = (b[ok] - a[ok]) & 0xFFFFFFFF
            d = d - (d >= 2**31).long() * 2**32  # signed
            out[CHUNK_PHASES[i]] = float(d.float().median())
    return out


def walk_clock(stamps, clk, items: dict) -> dict:
    """The SM clock during each pass's chunk walk, from the two timers: per CTA whose whole walk the chunk clocks cover
    (at most kClockChunks chunks), SM cycles from its first chunk's landing (CLK 1) to its last chunk's end (CLK 11),
    over ns from stamp 5 to stamp 6 (read at those points). Median MHz over CTAs, and how many CTAs gave one; a pass
    whose blocks are longer gives none. Tells a walk slowed by a lower clock from one that takes more cycles."""
    out = {}
    for p_stamp, p_clk, name in ((0, 0, "state pass"), (2, 1, "output pass")):
        rows = items.get(name, [])
        mhz = []
        for cta in range(min(stamps.shape[1], clk.shape[1]) if rows else 0):
            n = -(-rows[cta % len(rows)][1] // 64)  # chunks of 64 tokens in its item
            ns = int(stamps[p_stamp, cta, 6]) - int(stamps[p_stamp, cta, 5])
            ran = stamps[p_stamp, cta, 5] > 0 and ns > 0
            if not (1 <= n <= clk.shape[3] and ran and clk[p_clk, cta, 0, n - 1, 11] != 0):
                continue
            cyc = (int(clk[p_clk, cta, 0, n - 1, 11]) - int(clk[p_clk, cta, 0, 0, 1])) & 0xFFFFFFFF
            mhz.append(cyc / ns * 1e3)
        out[name] = {"ctas": len(mhz), "MHz": statistics.median(mhz) if mhz else None}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="4096,16384")
    ap.add_argument("--fused", action="store_true", help="the served variant: QK-norm + RoPE inside the kernel")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], bool(args.worker[1]))
        return
    ext = Path(os.environ.get("TORCH_EXTENSIONS_DIR", ROOT / "build" / "torch_ext")).parent / "torch_ext_stamps"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    result = {}
    for T in [int(x) for x in args.T.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--worker", str(T), str(int(args.fused))], env=env, check=True,
                             capture_output=True, text=True).stdout
        for mode, s in json.loads(out.splitlines()[-1]).items():
            name = f"T={T} {'served (QK prologue in the kernel)' if args.fused else 'plain'} {mode}"
            result[name] = s
            print(name)
            for kind, v in s.items():
                if kind in ("output tail", "walk clock", "warpgroup 1 behind 0, cycles"):
                    print(f"  {kind}: {json.dumps(v)}", flush=True)
                    continue
                if kind == "chunk phases":
                    for pname, r in v.items():
                        for label in ("chunk 0", "chunks 1-6"):
                            c = r[label]
                            print(f"  {pname}, {label}: {c['chunk']} cycles a chunk (median); phases: "
                                  + "; ".join(f"{k} {x:.0f}" for k, x in c["phases"].items()), flush=True)
                    continue
                cells = "  ".join(f"{i}: {a:.1f}/{m:.1f}/{b:.1f}" for i, (a, m, b) in v["stamps_us"].items())
                print(f"  {kind:<12} ({v['ctas']} CTAs)  {cells}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"prefill_phases{'_fused' if args.fused else ''}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
