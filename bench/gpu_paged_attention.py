#!/usr/bin/env python3
"""Paged-KV GQA decode attention: our kernel vs the runner's current path, side by side in one run.

    PYTHONPATH=gpu-backend python3 bench/gpu_paged_attention.py --out DIR [--quick] [--mem-cap-gib 60]

Ring-mini softmax-layer shapes (H=16, Hkv=4, d=128, bf16, block 16), every request at the full context. Per
(context, batch) both sides run as CUDA-graph replays of one layer's decode attention:
  ours: paged_decode_attention reading the paged cache through the block tables;
  peer: engine/runner.py's path - gather each request's K/V rows by index into dense [B, Lmax, Hkv, d] copies, then
        torch SDPA (efficient / flash / math, as the runner allows) with the rep query heads of a KV head as rows of
        one SDPA head and a length mask. The [B, Lmax] index and mask are built once per step in the runner, so here
        they are built once outside the timed region.
Printed per row: µs, GB/s (bytes = K+V of every valid key, read once, + q + out), % of the device-to-device copy
bandwidth measured in the same run (read + write bytes of a 1 GiB copy), and the time ratio ours/peer (< 1: ours is
faster). --quick runs a small grid; on a machine without CUDA it smoke-tests the harness with tiny shapes (our
wrapper then runs its twin; timings are meaningless). Writes gpu_paged_attention.json into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_timing import copy_gbs as copy_bandwidth, graph_of, timer  # noqa: E402
from ringlinear.kernels.paged_attention import paged_decode_attention, plan_splits  # noqa: E402
from ringlinear.kernels.paged_attention_reference import paged_kv_bytes  # noqa: E402

H, HKV, D, BLOCK = 16, 4, 128, 16
REP = H // HKV
DTYPE = torch.bfloat16
CONTEXTS = (4096, 16384, 65536)
BATCHES = (1, 8, 32, 128)


def footprint(ctx: int, batch: int) -> int:
    """Bytes the combo holds at once: paged K+V, the peer's dense K+V copies, its index (int64) and mask."""
    kv = paged_kv_bytes([ctx] * batch, HKV, D, DTYPE.itemsize)
    return 2 * kv + batch * ctx * 9 + (1 << 26)


def make_inputs(ctx: int, batch: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nblk = -(-ctx // BLOCK)
    num_blocks = batch * nblk
    tables = torch.randperm(num_blocks, generator=g).view(batch, nblk).to(device)  # shuffled, non-contiguous blocks
    k = torch.randn(num_blocks * BLOCK, HKV, D, device=device, dtype=DTYPE)
    v = torch.randn(num_blocks * BLOCK, HKV, D, device=device, dtype=DTYPE)
    q = torch.randn(batch, H, D, device=device, dtype=DTYPE)
    lengths = torch.full((batch,), ctx, dtype=torch.int64, device=device)
    return q, k, v, tables, lengths


def peer_fn(q, k, v, tables, lengths, ctx):
    """engine/runner.py `_decode_gather` (once per step, untimed) + `_softmax`'s grouped-query SDPA (per layer)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = q.shape[0]
    p = torch.arange(ctx, device=q.device)
    kv_index = tables[:, p // BLOCK] * BLOCK + p % BLOCK  # [B, Lmax]
    mask = (p[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, Lmax]
    qg = q.view(B, HKV, REP, D)
    out = torch.empty_like(q)
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

    def run():
        with sdpa_kernel(backends):
            o = F.scaled_dot_product_attention(qg, k[kv_index].transpose(1, 2), v[kv_index].transpose(1, 2),
                                               attn_mask=mask, scale=D**-0.5)
        out.copy_(o.reshape(B, H, D))
        return out

    return run, out


def bench_combo(ctx, batch, device, bench, copy_gbs, cuda):
    q, k, v, tables, lengths = make_inputs(ctx, batch, device)
    out = torch.empty_like(q)
    ours = lambda: paged_decode_attention(q, k, v, tables, lengths, BLOCK, max_len=ctx, out=out)  # noqa: E731
    peer, peer_out = peer_fn(q, k, v, tables, lengths, ctx)
    row = {"context": ctx, "batch": batch}
    nbytes = paged_kv_bytes([ctx] * batch, HKV, D, DTYPE.itemsize) + 2 * q.numel() * q.element_size()
    row["bytes"] = nbytes
    if cuda:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        row["splits"] = plan_splits(ctx, batch, HKV, BLOCK, sms)[1]
    for name, fn in (("ours", ours), ("peer", peer)):
        try:
            replay = graph_of(fn, cuda)
            ms = bench(replay)
            row[f"{name}_us"] = ms * 1e3
            row[f"{name}_gbs"] = nbytes / ms / 1e6
            row[f"{name}_pct_copy"] = 100 * row[f"{name}_gbs"] / copy_gbs
        except Exception as exc:  # noqa: BLE001 - one failing side must not hide the other's figures
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    if "ours_us" in row and "peer_us" in row:
        row["ours_over_peer"] = row["ours_us"] / row["peer_us"]
        ours()
        peer()
        row["max_abs_diff"] = (out.float() - peer_out.float()).abs().max().item()  # sanity: both compute the same
    del q, k, v, tables, lengths, out, peer_out
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="small grid (CPU: a smoke test of the harness)")
    ap.add_argument("--mem-cap-gib", type=float, default=60.0, help="skip combos needing more device memory")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("no CUDA device: run with --quick for a CPU smoke test of the harness", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    contexts, batches = CONTEXTS, BATCHES
    if args.quick:
        contexts, batches = ((4096, 16384), (1, 32)) if cuda else ((64, 200), (1, 3))
    method, bench = timer(device)
    copy_gbs = copy_bandwidth(device, bench)
    result = {
        "machine": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "timer": method,
        "shape": {"H": H, "Hkv": HKV, "d": D, "dtype": str(DTYPE), "block_size": BLOCK},
        "copy_gbs": copy_gbs,
        "rows": [],
        "skipped": [],
    }
    print(f"device: {result['machine']}  timer: {method}  d2d copy: {copy_gbs:.0f} GB/s (read+write)")
    hdr = f"{'ctx':>6} {'B':>4} {'splits':>6} {'ours us':>9} {'GB/s':>7} {'%copy':>6} {'peer us':>9} {'GB/s':>7} " \
          f"{'%copy':>6} {'ours/peer':>9}"
    print(hdr)
    cap = args.mem_cap_gib * (1 << 30)
    for ctx in contexts:
        for batch in batches:
            need = footprint(ctx, batch)
            if need > cap:
                result["skipped"].append({"context": ctx, "batch": batch, "bytes_needed": need})
                print(f"{ctx:>6} {batch:>4}  skipped: needs {need / (1 << 30):.1f} GiB > cap {args.mem_cap_gib} GiB")
                continue
            row = bench_combo(ctx, batch, device, bench, copy_gbs, cuda)
            result["rows"].append(row)
            f = lambda key, fmt: format(row[key], fmt) if key in row else "err"  # noqa: E731
            print(f"{ctx:>6} {batch:>4} {row.get('splits', '-'):>6} {f('ours_us', '9.1f')} {f('ours_gbs', '7.0f')} "
                  f"{f('ours_pct_copy', '6.1f')} {f('peer_us', '9.1f')} {f('peer_gbs', '7.0f')} "
                  f"{f('peer_pct_copy', '6.1f')} {f('ours_over_peer', '9.3f')}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_paged_attention.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
