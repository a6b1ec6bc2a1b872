#!/usr/bin/env python3
"""GPU kernel benchmarks (H200): ours vs the best peer, side by side in one run, with the measured rooflines.

    PYTHONPATH=gpu-backend python3 bench/gpu_kernels.py --out DIR [--quick]

Sections: ceilings (device-to-device copy bandwidth, bf16 matmul rate), lightning decode (ours vs fla
fused_recurrent_simple_gla, both CUDA-graph replays), lightning prefill B=1 H=16 D=128 (ours vs fla chunk_simple_gla,
with each size's floors: the DRAM bytes of three passes and of one at the copy rate, the FLOPs at the matmul rate),
fused MoE at the Ring-mini config with packed gate/up (decode batches vs the torch twin, prefill vs the old
unpacked layout, the pre-CUDA-glue grouped path and the torch twin), and (--only moe-latency) one- and two-token
MoE layers as a decode step runs them, per variant of the decode kernels, and (--only gemv) a decode step's dense
projections of 1-4 tokens: the GEMV kernel launched as a programmatic dependent, launched plainly, and cuBLAS, and
(--only moe-mid) the MoE at 256-128k tokens per expert path, with the wide kernel against the CUTLASS GEMMs, and
(--only route) the router's selection kernels at 4k-128k tokens against the torch twin, and (--only prefill-v) a
lightning layer's attention from its raw projection with v read in place by the prefill kernel against v copied
by qkv_prologue. Writes
gpu_kernels.json and gpu_prefill_throughput.png into --out; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))

from ringlinear.kernels import lightning as L  # noqa: E402
from ringlinear.kernels import moe as M  # noqa: E402
from ringlinear import kernels as K  # noqa: E402
from ringlinear.kernels.gemv_reference import linear_small_bytes  # noqa: E402
from gpu_timing import ClockLog, events_ms, graph_of  # noqa: E402
from ringlinear.kernels._build import extension  # noqa: E402
from ringlinear.kernels.lightning_reference import decode_state_bytes, lightning_flops, prefill_dram_bytes  # noqa: E402
from ringlinear.kernels.moe_reference import RING_MINI_ROUTER, experts_touched_bytes, moe_reference  # noqa: E402

H, D = 16, 128
FLA_ISSUE_MS = {4096: 0.169, 16384: 0.243, 65536: 0.911, 131072: 1.800}  # fla 0.5.2 on this H200 (issue 6)
RESULTS: dict = {"errors": {}}


def do_bench(fn, rep=200, warmup=25):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def record_error(key, exc):
    RESULTS["errors"][key] = f"{type(exc).__name__}: {exc}"
    print(f"[error] {key}: {exc}", flush=True)
    traceback.print_exc()


def gammas():
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    factor = 1 - 10 / 19 + 1e-5  # a middle layer of Ring-mini (l = 10 of 20)
    return torch.exp(-slopes * factor).float().cuda()


# ---------------------------------------------------------------------------------------------------------------
def ceilings():
    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a))
    copy_gbs = 2 * n / t / 1e6
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm = do_bench(lambda: x @ y)
    mm_tf = 2 * 8192**3 / tm / 1e9
    RESULTS["ceilings"] = {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": mm_tf}
    print(f"ceilings: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tf:.0f} TFLOP/s", flush=True)
    del a, b, x, y


# ---------------------------------------------------------------------------------------------------------------
def fla_op(name: str, error_key: str):
    """fla.ops.simple_gla.<name> (the peer), or None with the import error recorded under error_key."""
    try:
        import fla.ops.simple_gla as simple_gla
        return getattr(simple_gla, name)
    except Exception as exc:  # noqa: BLE001
        record_error(error_key, exc)
        return None


def bench_decode(batches):
    rows = []
    gamma = gammas()
    fused_recurrent_simple_gla = fla_op("fused_recurrent_simple_gla", "fla_import")
    for B in batches:
        row = {"B": B, "state_MiB": decode_state_bytes(B, H, D) / 2 / 2**20}
        q, k, v = (torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        state = torch.randn(B, H, D, D, device="cuda")
        slots = torch.randperm(B, device="cuda")
        out = torch.empty(B, H, D, device="cuda")
        nbytes = decode_state_bytes(B, H, D)
        ours = lambda: L.lightning_decode(q, k, v, state, slots, gamma, out=out)  # noqa: E731
        row["ours_eager_ms"] = do_bench(ours)
        row["ours_graph_ms"] = do_bench(graph_of(ours))
        qn = torch.rand(D, device="cuda") + 0.5
        pos = torch.randint(0, 4096, (B,), device="cuda")
        fused = lambda: L.lightning_decode(q, k, v, state, slots, gamma, out=out, q_norm_weight=qn, k_norm_weight=qn,  # noqa: E731
                                           positions=pos, rotary_dim=64)
        row["ours_fused_graph_ms"] = do_bench(graph_of(fused))
        cols32 = lambda: L.lightning_decode(q, k, v, state, slots, gamma, out=out, cols_per_block=32)  # noqa: E731
        row["ours_cols32_graph_ms"] = do_bench(graph_of(cols32))
        row["ours_GBps"] = nbytes / row["ours_graph_ms"] / 1e6
        # the rows in slot order, as the engine schedules decodes (here the whole pool: contiguous states)
        in_order = torch.sort(slots).values
        sorted_ = lambda: L.lightning_decode(q, k, v, state, in_order, gamma, out=out)  # noqa: E731
        row["ours_slot_order_graph_ms"] = do_bench(graph_of(sorted_))
        row["ours_slot_order_GBps"] = nbytes / row["ours_slot_order_graph_ms"] / 1e6
        # the same without the L2 read-ahead (lightning.DECODE_PREFETCH_BYTES), side by side
        no_pf = lambda: L.lightning_decode(q, k, v, state, in_order, gamma, out=out, prefetch_bytes=0)  # noqa: E731
        row["ours_slot_order_no_prefetch_graph_ms"] = do_bench(graph_of(no_pf))
        row["ours_slot_order_no_prefetch_GBps"] = nbytes / row["ours_slot_order_no_prefetch_graph_ms"] / 1e6
        if fused_recurrent_simple_gla is not None:
            try:
                g_gamma = torch.log(gamma)
                st = state.clone()
                peer = lambda: fused_recurrent_simple_gla(  # noqa: E731
                    q[:, None], k[:, None], v[:, None], g_gamma=g_gamma, scale=D**-0.5, initial_state=st,
                    output_final_state=True)
                row["fla_graph_ms"] = do_bench(graph_of(peer))
                row["fla_GBps"] = nbytes / row["fla_graph_ms"] / 1e6
                # same math: compare outputs from identical states
                st2 = state.clone()
                o_f, _ = fused_recurrent_simple_gla(q[:, None], k[:, None], v[:, None], g_gamma=g_gamma, scale=D**-0.5,
                                                    initial_state=st2, output_final_state=True)
                s3 = state.clone()
                o_o = L.lightning_decode(q, k, v, s3, torch.arange(B, device="cuda"), gamma)
                row["max_rel_diff_vs_fla"] = ((o_f[:, 0].float() - o_o).abs().max() / o_o.abs().max()).item()
            except Exception as exc:  # noqa: BLE001
                record_error(f"fla_decode_B{B}", exc)
        rows.append(row)
        print(f"decode B={B}: ours {row['ours_graph_ms']*1e3:.1f} us ({row['ours_GBps']:.0f} GB/s), in slot order "
              f"{row['ours_slot_order_graph_ms']*1e3:.1f} us ({row['ours_slot_order_GBps']:.0f} GB/s), without the "
              f"read-ahead {row['ours_slot_order_no_prefetch_GBps']:.0f} GB/s; "
              f"fla {row.get('fla_graph_ms', float('nan'))*1e3:.1f} us ({row.get('fla_GBps', float('nan')):.0f} GB/s)", flush=True)
        del q, k, v, state
    RESULTS["decode"] = rows


def clock_note(row) -> str:
    """'; SM MHz (min / median) and max W during ours' and fla's graph timings', where nvidia-smi gave samples."""
    parts = [f"{side} {c['sm_mhz_min']:.0f}/{c['sm_mhz_median']:.0f} MHz {c['power_w_max']:.0f} W"
             for side, c in (("ours", row.get("clocks_ours_graph")), ("fla", row.get("clocks_fla_graph"))) if c]
    return "; clocks: " + ", ".join(parts) if parts else ""


# ---------------------------------------------------------------------------------------------------------------
def bench_prefill(Ts):
    rows = []
    gamma = gammas()
    chunk_simple_gla = fla_op("chunk_simple_gla", "fla_import_chunk")
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    for T in Ts:
        row = {"T": T}
        q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        state = torch.randn(1, H, D, D, device="cuda") * 0.01
        flops = lightning_flops(T, H, D)
        plan = L.plan_prefill([T], [0], [True], H, nsm)
        auto = plan.block_len
        # The roofline beside the figure: the DRAM bytes of the auto plan's three passes (k and v read again for every
        # block but the last) and of one pass, and the FLOPs (table() turns them into ms at the measured ceilings).
        row["dram_bytes_three_passes"] = prefill_dram_bytes(T, H, D, sum(item[1] for item in plan.items_state))
        row["dram_bytes_one_pass"] = prefill_dram_bytes(T, H, D)
        row["flops"] = flops
        best = None
        for bl in sorted({auto, max(64, auto // 2 // 64 * 64), max(64, auto // 4 // 64 * 64), auto * 2}):
            prep = L.prepare_prefill([T], [0], [True], H, D, "cuda", bl)
            ms = do_bench(lambda: L.run_prepared_prefill(prep, q, k, v, state, gamma))
            row[f"ours_ms_L{bl}"] = ms
            if best is None or ms < best[1]:
                best = (bl, ms)
        row["block_len_auto"] = auto
        prep2 = L.prepare_prefill([T], [0], [True], H, D, "cuda", best[0], jsplit=2)
        row["ours_jsplit2_ms"] = do_bench(lambda: L.run_prepared_prefill(prep2, q, k, v, state, gamma))
        row["jsplit2_block_len"] = best[0]
        # Where the time goes (auto plan): launch only some passes; outputs are then wrong, timings are not.
        import dataclasses

        # Partial launches leave the workspace unwritten: use a zeroed one and a scratch state, never `state`.
        prep = L.prepare_prefill([T], [0], [True], H, D, "cuda", auto)
        prep.ws.zero_()
        scratch = state.clone()
        none = torch.empty(0, 4, dtype=torch.int32, device="cuda")
        for name, p in (("scan_only_ms", dataclasses.replace(prep, items_state=none, items_out=none)),
                        ("state_pass_plus_scan_ms", dataclasses.replace(prep, items_out=none)),
                        ("scan_plus_output_pass_ms", dataclasses.replace(prep, items_state=none))):
            row[name] = do_bench(lambda: L.run_prepared_prefill(p, q, k, v, scratch, gamma))
        row["ours_ms"] = row[f"ours_ms_L{auto}"]
        row["ours_best_ms"], row["block_len_best"] = best[1], best[0]
        row["ours_wrapper_ms"] = do_bench(lambda: L.lightning_prefill(q, k, v, state, [0, T], [0], gamma))
        row["ours_TFLOPs"] = flops / row["ours_ms"] / 1e9
        # As a CUDA-graph replay too: at 4k-16k an eager call can be bound by the host's launches (fla's more so: a
        # chain of Triton kernels), which then measures the CPU rather than the kernels. Both sides are timed both ways.
        # (prep: the auto plan the pass timings used; its workspace is rewritten by every full launch)
        with ClockLog() as clocks:  # SM clock and board power beside the figure (a board at its power limit clocks down)
            row["ours_graph_ms"] = do_bench(graph_of(lambda: L.run_prepared_prefill(prep, q, k, v, state, gamma)))
        row["clocks_ours_graph"] = clocks.summary()
        if chunk_simple_gla is not None:
            try:
                g_gamma = torch.log(gamma)
                st = state.clone()
                peer = lambda: chunk_simple_gla(q[None], k[None], v[None], g_gamma=g_gamma, scale=D**-0.5,  # noqa: E731
                                                initial_state=st, output_final_state=True)
                row["fla_ms"] = do_bench(peer)
                row["fla_TFLOPs"] = flops / row["fla_ms"] / 1e9
                row["speedup_vs_fla"] = row["fla_ms"] / row["ours_ms"]
                o_f, s_f = chunk_simple_gla(q[None], k[None], v[None], g_gamma=g_gamma, scale=D**-0.5,
                                            initial_state=state.clone(), output_final_state=True)
                s_o = state.clone()
                o_o = L.lightning_prefill(q, k, v, s_o, [0, T], [0], gamma)
                row["out_rel_diff_vs_fla"] = ((o_f[0].float() - o_o.float()).norm() / o_f.float().norm()).item()
                row["state_rel_diff_vs_fla"] = ((s_f.float() - s_o).norm() / s_f.float().norm()).item()
            except Exception as exc:  # noqa: BLE001
                record_error(f"fla_prefill_T{T}", exc)
            if "fla_ms" in row:
                try:
                    with ClockLog() as clocks:
                        row["fla_graph_ms"] = do_bench(graph_of(peer))
                    row["clocks_fla_graph"] = clocks.summary()
                    row["speedup_vs_fla_graphs"] = row["fla_graph_ms"] / row["ours_graph_ms"]
                except Exception as exc:  # noqa: BLE001
                    record_error(f"fla_prefill_graph_T{T}", exc)
        rows.append(row)
        print(f"prefill T={T}: ours {row['ours_ms']:.3f} ms (best {row['ours_best_ms']:.3f} @L={row['block_len_best']}, "
              f"{row['ours_TFLOPs']:.0f} TFLOP/s) fla {row.get('fla_ms', float('nan')):.3f} ms "
              f"-> {row.get('speedup_vs_fla', float('nan')):.2f}x; graph replays: ours {row['ours_graph_ms']:.3f} ms "
              f"fla {row.get('fla_graph_ms', float('nan')):.3f} ms -> {row.get('speedup_vs_fla_graphs', float('nan')):.2f}x"
              f"{clock_note(row)}", flush=True)
        del q, k, v
    RESULTS["prefill"] = rows


# ---------------------------------------------------------------------------------------------------------------
def moe_weights(seed=0, packed=True):
    """Ring-mini expert weights; packed=True stores gate/up (experts and shared) as views of one [.., 2I, D] buffer,
    the layout the engine uses (moe.pack_gate_up)."""
    cfg = RING_MINI_ROUTER
    E, I, Dm = cfg.num_experts, 512, 2048
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    W = dict(router_weight=torch.randn(E, Dm, device="cuda", generator=g) * 0.02,
             expert_bias=torch.randn(E, device="cuda", generator=g) * 0.01,
             w_gate=mk(E, I, Dm), w_up=mk(E, I, Dm), w_down=mk(E, Dm, I), shared=(mk(I, Dm), mk(I, Dm), mk(Dm, I)))
    if packed:
        _, W["w_gate"], W["w_up"] = M.pack_gate_up(W["w_gate"], W["w_up"])
        sg, su, sd = W["shared"]
        _, sg, su = M.pack_gate_up(sg, su)
        W["shared"] = (sg, su, sd)
    return W


def legacy_grouped_moe(x, W, cfg):
    """The grouped path as it was before the CUDA glue (fp32 router GEMM, argsort, gather, 3 GEMMs, fp32 torch SwiGLU,
    scatter, fp32 weighted sum, separate shared expert), kept here only as the side-by-side baseline of the prefill rows."""
    import torch.nn.functional as F

    N, k = x.shape[0], cfg.top_k
    logits = x.float() @ W["router_weight"].float().t()  # the fp32 router GEMM (M.route splits it for many tokens)
    ids = torch.empty(N, k, dtype=torch.int32, device=x.device)
    w = torch.empty(N, k, dtype=torch.float32, device=x.device)
    extension().moe_route(logits, W["expert_bias"].float().contiguous(), cfg.n_group, cfg.topk_group, k,
                          cfg.norm_topk_prob, float(cfg.routed_scaling_factor), -1, ids, w)
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    offs = torch.bincount(flat, minlength=cfg.num_experts).cumsum(0).to(torch.int32)
    xs = x[order // k]
    g = torch._grouped_mm(xs, W["w_gate"].transpose(1, 2), offs=offs)
    u = torch._grouped_mm(xs, W["w_up"].transpose(1, 2), offs=offs)
    ys = torch._grouped_mm((F.silu(g.float()) * u.float()).to(x.dtype), W["w_down"].transpose(1, 2), offs=offs)
    y = torch.empty(N * k, x.shape[1], dtype=ys.dtype, device=x.device)
    y[order] = ys
    sg, su, sd = W["shared"]
    s = F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd).float()
    return ((y.view(N, k, -1).float() * w[..., None]).sum(1) + s).to(x.dtype)


def bench_moe(batches, prefill_tokens, copy_gbs, mm_tf):
    W = moe_weights()  # packed (engine layout)
    Wu = moe_weights(packed=False)  # same values, separate gate/up tensors (the old layout), side by side
    cfg = RING_MINI_ROUTER
    Dm, I = 2048, 512
    shared_bytes = 3 * I * Dm * 2
    twin = lambda x: moe_reference(x, W["router_weight"], W["expert_bias"], W["w_gate"], W["w_up"],  # noqa: E731
                                   W["w_down"], W["shared"], cfg)
    rows = []
    for N in batches:
        x = torch.randn(N, Dm, device="cuda").to(torch.bfloat16)
        row = {"N": N}
        # every expert path, CUDA-graph replays (how the engine runs decode steps); "auto" = fused_moe's own choice
        for path in ("decode", "stream", "wide", "grouped"):
            try:
                row[f"{path}_graph_ms"] = do_bench(graph_of(lambda: M.fused_moe(x, **W, cfg=cfg, path=path)))  # noqa: B023
            except Exception as exc:  # noqa: BLE001
                record_error(f"moe_{path}_N{N}", exc)
        for stages in (3, 4):  # pipeline depth of the stream kernel, side by side (STREAM_STAGES is the default)
            saved, M.STREAM_STAGES = M.STREAM_STAGES, stages
            try:
                row[f"stream_stages{stages}_graph_ms"] = do_bench(graph_of(lambda: M.fused_moe(x, **W, cfg=cfg, path="stream")))  # noqa: B023
            finally:
                M.STREAM_STAGES = saved
        auto = M.auto_path(N)
        row["auto_path"] = auto
        row["torch_twin_ms"] = do_bench(lambda: twin(x), rep=100)
        ids, _ = M.route(x, W["router_weight"], W["expert_bias"], cfg)
        nbytes = experts_touched_bytes(ids, W["w_gate"], W["w_down"]) + shared_bytes + W["router_weight"].numel() * 4
        row["distinct_experts"] = int(ids.unique().numel())
        row["bytes_MB"] = nbytes / 1e6
        best = row[f"{auto}_graph_ms"]
        row["ours_GBps"] = nbytes / best / 1e6
        row["frac_of_copy_bw"] = row["ours_GBps"] / copy_gbs
        y_ref = twin(x)
        for path in ("decode", "stream"):
            y = M.fused_moe(x, **W, cfg=cfg, path=path).float()
            row[f"rel_err_vs_twin_{path}"] = ((y - y_ref).norm() / y_ref.norm()).item()
        rows.append(row)
        print(f"moe decode N={N}: auto={auto} {best*1e3:.1f} us ({row['ours_GBps']:.0f} GB/s, "
              f"{100*row['frac_of_copy_bw']:.0f}% of copy) | decode {row.get('decode_graph_ms', math.nan)*1e3:.1f} "
              f"stream {row.get('stream_graph_ms', math.nan)*1e3:.1f} (3 stages {row['stream_stages3_graph_ms']*1e3:.1f}, "
              f"4: {row['stream_stages4_graph_ms']*1e3:.1f}) grouped {row.get('grouped_graph_ms', math.nan)*1e3:.1f} us "
              f"twin {row['torch_twin_ms']*1e3:.1f} us", flush=True)
    RESULTS["moe_decode"] = rows
    rows = []
    for N in prefill_tokens:
        x = torch.randn(N, Dm, device="cuda").to(torch.bfloat16)
        row = {"N": N}
        flops = 2.0 * N * (cfg.top_k + 1) * 3 * Dm * I + 2.0 * N * Dm * cfg.num_experts
        row["ours_ms"] = do_bench(lambda: M.fused_moe(x, **W, cfg=cfg, path="grouped"), rep=200)
        row["unpacked_ms"] = do_bench(lambda: M.fused_moe(x, **Wu, cfg=cfg, path="grouped"), rep=200)
        row["legacy_ms"] = do_bench(lambda: legacy_grouped_moe(x, Wu, cfg), rep=200)
        row["torch_twin_ms"] = do_bench(lambda: twin(x), rep=100)
        row["ours_TFLOPs"] = flops / row["ours_ms"] / 1e9
        row["frac_of_bf16_peak"] = row["ours_TFLOPs"] / mm_tf
        row["speedup_vs_twin"] = row["torch_twin_ms"] / row["ours_ms"]
        y = M.fused_moe(x, **W, cfg=cfg, path="grouped").float()
        y_ref = twin(x)
        row["rel_err_vs_twin"] = ((y - y_ref).norm() / y_ref.norm()).item()
        rows.append(row)
        print(f"moe prefill N={N}: ours {row['ours_ms']:.2f} ms ({row['ours_TFLOPs']:.0f} TFLOP/s, "
              f"{100*row['frac_of_bf16_peak']:.0f}% of matmul) unpacked {row['unpacked_ms']:.2f} ms "
              f"legacy glue {row['legacy_ms']:.2f} ms "
              f"twin {row['torch_twin_ms']:.2f} ms", flush=True)
    RESULTS["moe_prefill"] = rows


# ---------------------------------------------------------------------------------------------------------------
def plot(out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = RESULTS.get("prefill", [])
    if not rows:
        return
    Ts = [r["T"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    def best(r, side):  # the faster of the eager call and the CUDA-graph replay
        return min(r[f"{side}_ms"], r.get(f"{side}_graph_ms", math.inf))

    ax.plot(Ts, [r["T"] / best(r, "ours") / 1e3 for r in rows], "o-", label="ours (CUDA wgmma, auto block length)")
    if all("fla_ms" in r for r in rows):
        ax.plot(Ts, [r["T"] / best(r, "fla") / 1e3 for r in rows], "s--", label="fla chunk_simple_gla (same run)")
    quoted = {t: ms for t, ms in FLA_ISSUE_MS.items() if t in Ts}
    if quoted:
        ax.plot(list(quoted), [t / ms / 1e3 for t, ms in quoted.items()], "x:", color="gray", label="fla, issue 6 figures")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens T (B=1, H=16, D=128, bf16)")
    ax.set_ylabel("M tokens/s per layer")
    ax.set_title("Lightning prefill on H200")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gpu_prefill_throughput.png", dpi=120)


def table():
    c = RESULTS.get("ceilings", {})
    print("\n=== GPU kernels,", torch.cuda.get_device_name(0), "===")
    if c:
        print(f"ceilings: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    else:
        print("ceilings: not measured in this call (--only without ceilings)")
    print("decode   B | ours us  GB/s  %copy | fused us | 32-col us GB/s | fla us  GB/s | ours/fla")
    for r in RESULTS.get("decode", []):
        f = r.get("fla_graph_ms", math.nan)
        c32 = r.get("ours_cols32_graph_ms", math.nan)
        nb = decode_state_bytes(r["B"], H, D)
        # %copy only when the ceilings section ran in this call (--only decode skips it)
        pct = f"{100*r['ours_GBps']/c['copy_GBps']:5.0f}%" if c.get("copy_GBps") else "   n/a"
        print(f"      {r['B']:4d} | {r['ours_graph_ms']*1e3:7.1f} {r['ours_GBps']:5.0f} {pct} |"
              f" {r['ours_fused_graph_ms']*1e3:7.1f} | {c32*1e3:6.1f} {nb/c32/1e6:5.0f} |"
              f" {f*1e3:6.1f} {r.get('fla_GBps', math.nan):5.0f} | {f/r['ours_graph_ms']:.2f}x")
    print("prefill  T | ours ms  TFLOP/s | best ms (L) | fla ms TFLOP/s | speedup | graphs: ours ms | fla ms | speedup")
    for r in RESULTS.get("prefill", []):
        print(f"  {r['T']:7d} | {r['ours_ms']:.3f} {r['ours_TFLOPs']:6.0f} | {r['ours_best_ms']:.3f} ({r['block_len_best']}) |"
              f" {r.get('fla_ms', math.nan):.3f} {r.get('fla_TFLOPs', math.nan):5.0f} | {r.get('speedup_vs_fla', math.nan):.2f}x |"
              f" {r.get('ours_graph_ms', math.nan):.3f} | {r.get('fla_graph_ms', math.nan):.3f} |"
              f" {r.get('speedup_vs_fla_graphs', math.nan):.2f}x")
    print("prefill  T | state pass + scan ms | scan ms | scan + output pass ms | jsplit=2 ms (L)")
    for r in RESULTS.get("prefill", []):
        print(f"  {r['T']:7d} | {r.get('state_pass_plus_scan_ms', math.nan):.3f} | {r.get('scan_only_ms', math.nan):.3f} |"
              f" {r.get('scan_plus_output_pass_ms', math.nan):.3f} | {r.get('ours_jsplit2_ms', math.nan):.3f} ({r.get('jsplit2_block_len')})")
    if c:  # each floor: the least time at the measured copy rate / matmul rate; fla's replay over it: the most any
        # design with those bytes could beat fla by
        print("prefill  T | floor ms: three passes' bytes / one pass's / FLOPs | ours over the three-pass floor |"
              " fla over it / over one pass's")
        for r in RESULTS.get("prefill", []):
            f3, f1 = (r[key] / c["copy_GBps"] / 1e6 for key in ("dram_bytes_three_passes", "dram_bytes_one_pass"))
            ff = r["flops"] / c["bf16_matmul_TFLOPs"] / 1e9
            fla = r.get("fla_graph_ms", math.nan)
            print(f"  {r['T']:7d} | {f3:.4f} / {f1:.4f} / {ff:.4f} | {r['ours_graph_ms'] / f3:.2f}x |"
                  f" {fla / f3:.2f}x / {fla / f1:.2f}x")
    print("moe dec  N | auto path  us  GB/s %copy | decode us | stream us (3 / 4 stages) | grouped us | twin us | experts")
    for r in RESULTS.get("moe_decode", []):
        b = r[f"{r['auto_path']}_graph_ms"]
        print(f"     {r['N']:5d} | {r['auto_path']:>7s} {b*1e3:7.1f} {r['ours_GBps']:5.0f} {100*r['frac_of_copy_bw']:4.0f}% |"
              f" {r.get('decode_graph_ms', math.nan)*1e3:9.1f} | {r.get('stream_graph_ms', math.nan)*1e3:9.1f}"
              f" ({r['stream_stages3_graph_ms']*1e3:.1f} / {r['stream_stages4_graph_ms']*1e3:.1f}) |"
              f" {r.get('grouped_graph_ms', math.nan)*1e3:10.1f} | {r['torch_twin_ms']*1e3:8.1f} | {r['distinct_experts']}")
    print("moe pre  N | ours ms TFLOP/s %peak | unpacked ms | legacy ms | twin ms | speedup | rel err")
    for r in RESULTS.get("moe_prefill", []):
        print(f"     {r['N']:5d} | {r['ours_ms']:6.2f} {r['ours_TFLOPs']:6.0f} {100*r['frac_of_bf16_peak']:4.0f}% |"
              f" {r.get('unpacked_ms', math.nan):11.2f} | {r.get('legacy_ms', math.nan):9.2f} | {r['torch_twin_ms']:7.2f} | {r['speedup_vs_twin']:6.1f}x |"
              f" {r.get('rel_err_vs_twin', math.nan):.1e}")
    if RESULTS["errors"]:
        print("errors:", json.dumps(RESULTS["errors"], indent=1))


MOE_DECODE_VARIANTS = {"8-passes": False, "small-passes": True}  # DECODE_SMALL_PASSES per variant


def bench_moe_latency(batches=(1, 2, 3, 4, 6, 8), layers=19, rounds=3):
    """A few-token decode step's MoE as the step runs it: `layers` Ring-mini MoE layers in the engine's layout
    (pack_moe: the shared expert is expert E; bf16 router), one CUDA graph of the layers' fused_moe calls replayed,
    so each layer's experts are cold in L2 as in a step. The decode path (at <= 2 tokens with and without the
    one-token layouts, DECODE_SMALL_PASSES) and the stream path, the graphs replayed in turn over `rounds` (best round
    reported; DECODE_MAX_TOKENS is where fused_moe switches); then the one-launch router alone, its routing alone (on
    given logits) and the router GEMV alone (cuBLAS)."""
    cfg = RING_MINI_ROUTER
    E, I, Dm = cfg.num_experts, 512, 2048
    g = torch.Generator(device="cuda").manual_seed(1)
    mk = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    Ws = []
    for _ in range(layers):
        gu, up, dn, sh = M.pack_moe(mk(E, I, Dm), mk(E, I, Dm), mk(E, Dm, I), (mk(I, Dm), mk(I, Dm), mk(Dm, I)))
        Ws.append(dict(router_weight=mk(E, Dm), expert_bias=torch.randn(E, device="cuda", generator=g) * 0.01,
                       w_gate=gu, w_up=up, w_down=dn, shared=sh))
    M.router_counter(torch.device("cuda"))
    saved = M.DECODE_SMALL_PASSES
    rows = []
    try:
        for N in batches:
            x = torch.randn(N, Dm, device="cuda", generator=g).to(torch.bfloat16)
            graphs, outs = {}, {}
            variants = {**(MOE_DECODE_VARIANTS if N <= 2 else {"decode path": saved}), "stream path": saved}
            for name, small in variants.items():
                M.DECODE_SMALL_PASSES = small
                path = "stream" if name == "stream path" else "decode"
                graphs[name] = graph_of(lambda path=path: [M.fused_moe(x, **W, cfg=cfg, path=path) for W in Ws])  # noqa: B023
                outs[name] = M.fused_moe(x, **Ws[0], cfg=cfg, path=path)
            times = {name: [] for name in graphs}
            for _ in range(rounds):
                for name, fn in graphs.items():
                    times[name].append(events_ms(fn, 200) * 1e3 / layers)
            row = {"N": N, "layers": layers, "us_per_layer": {k: min(v) for k, v in times.items()}, "all_us": times,
                   "bitwise_equal": N > 2 or torch.equal(outs["8-passes"], outs["small-passes"]),
                   "stream_rel_diff": ((outs["stream path"].float() - outs[next(iter(outs))].float()).norm()
                                       / outs["stream path"].float().norm()).item()}
            ids = M.route(x, Ws[0]["router_weight"], Ws[0]["expert_bias"], cfg)[0]
            row["bytes_MB"] = (experts_touched_bytes(ids, Ws[0]["w_gate"], Ws[0]["w_down"]) + 3 * I * Dm * 2
                               + E * Dm * 2) / 1e6
            if N <= M.SMALL_ROUTE_MAX_TOKENS:
                logits = [torch.mm(x, W["router_weight"].t(), out_dtype=torch.float32) for W in Ws]
                pieces = {
                    "router_one_launch": lambda: [M.route_decode(x, W["router_weight"], W["expert_bias"], cfg, E, E + 1)  # noqa: B023
                                                  for W in Ws],
                    "routing_only": lambda: [M.route_align_small(lg, W["expert_bias"], cfg, E, E + 1)  # noqa: B023
                                             for lg, W in zip(logits, Ws)],  # noqa: B023
                    "router_gemv_cublas": lambda: [torch.mm(x, W["router_weight"].t(), out_dtype=torch.float32)  # noqa: B023
                                                   for W in Ws],
                }
                row["router_us_per_layer"] = {k: events_ms(graph_of(fn), 200) * 1e3 / layers for k, fn in pieces.items()}
            rows.append(row)
            best = min(row["us_per_layer"].values())
            print(f"moe latency N={N}: " + " | ".join(f"{k} {v:.1f} us" for k, v in row["us_per_layer"].items())
                  + f" per layer ({row['bytes_MB']:.1f} MB: best {row['bytes_MB'] / best:.2f} TB/s); bitwise "
                  f"equal {row['bitwise_equal']}; router "
                  + str({k: round(v, 2) for k, v in row.get("router_us_per_layer", {}).items()}), flush=True)
    finally:
        M.DECODE_SMALL_PASSES = saved
    RESULTS["moe_latency"] = rows

def bench_moe_mid(tokens=(256, 512, 768, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)):
    """Prompt-chunk and mixed-step MoE sizes at the Ring-mini config (packed weights, the engine's layout): the whole
    layer per expert path (CUDA-graph replays; the wide path at both pass widths and both 128-row ring depths), and
    the expert GEMMs alone on the same sorted assignments - the wide kernel (x gathered, SwiGLU fused) against what
    the grouped path runs for the same work (row scatter + CUTLASS grouped GEMM + SwiGLU for gate/up; the CUTLASS GEMM
    for down), and both GEMMs on moe_tma_gemm (gate+up at both ring depths)."""
    W = moe_weights()
    cfg = RING_MINI_ROUTER
    Dm, I, k = 2048, 512, cfg.top_k
    gu = M.packed_gate_up(W["w_gate"], W["w_up"])
    rows = []
    for N in tokens:
        x = torch.randn(N, Dm, device="cuda").to(torch.bfloat16)
        ids, _ = M.route(x, W["router_weight"], W["expert_bias"], cfg)
        offsets, ends, inv, tok = M._sort(ids, cfg.num_experts)
        A = ids.numel()
        h = M.wide_gemm(x, tok, W["w_gate"], W["w_up"], offsets)

        def grouped_gate_up():
            t = M._grouped_mm(M.scatter_rows(x, inv, k), gu.transpose(1, 2), ends, offsets)  # noqa: B023
            return M.swiglu(t[:, :I], t[:, I:])

        def wide(gate_up, stages, pass_rows):
            return lambda: (M.wide_gemm(x, tok, W["w_gate"], W["w_up"], offsets, stages, pass_rows) if gate_up  # noqa: B023
                            else M.wide_gemm(h, None, W["w_down"], None, offsets, stages, pass_rows))  # noqa: B023

        gemms = {
            "wide_gate_up_s4": wide(True, 4, 128),
            "wide_gate_up_s5": wide(True, 5, 128), "wide_gate_up_p256": wide(True, 4, 256), "grouped_gate_up": grouped_gate_up,
            "wide_down_s4": wide(False, 4, 128), "wide_down_s5": wide(False, 5, 128),
            "wide_down_p256": wide(False, 4, 256),
            "grouped_down": lambda: M._grouped_mm(h, W["w_down"].transpose(1, 2), ends, offsets),  # noqa: B023
            "tma_gate_up": lambda: M.tma_gemm(x, tok, W["w_gate"], W["w_up"], offsets),  # noqa: B023
            "tma_gate_up_s3": lambda: M.tma_gemm(x, tok, W["w_gate"], W["w_up"], offsets, stages=3),  # noqa: B023
            "tma_down": lambda: M.tma_gemm(h, None, W["w_down"], None, offsets),  # noqa: B023
        }
        if N <= 2048:
            gemms["stream_gate_up"] = lambda: M.stream_gemm(x, tok, W["w_gate"], W["w_up"], offsets)  # noqa: B023
            gemms["stream_down"] = lambda: M.stream_gemm(h, None, W["w_down"], None, offsets)  # noqa: B023
        row = {"N": N, "assignments": A, "max_rows_per_expert": int((offsets[1:] - offsets[:-1]).max())}
        row["gemm_us"] = {name: do_bench(graph_of(fn)) * 1e3 for name, fn in gemms.items()}
        h_ref = grouped_gate_up()
        row["gate_up_rel_diff_vs_grouped"] = ((h.float() - h_ref.float()).norm() / h_ref.float().norm()).item()
        paths = ["wide", "grouped"] + (["stream"] if N <= 4096 else [])
        layer = {}
        for path in paths:
            layer[path] = do_bench(graph_of(lambda path=path: M.fused_moe(x, **W, cfg=cfg, path=path))) * 1e3  # noqa: B023
        saved = M.WIDE_LONG_PASS_MEAN_ROWS
        try:  # the wide path with 128-row passes (WIDE_STAGES slots) and with 256-row passes for both GEMMs
            for name, long_from in ((f"wide_s{M.WIDE_STAGES}_p128", 1 << 30), ("wide_s4_p256", 0)):
                M.WIDE_LONG_PASS_MEAN_ROWS = long_from
                layer[name] = do_bench(graph_of(lambda: M.fused_moe(x, **W, cfg=cfg, path="wide"))) * 1e3  # noqa: B023
        finally:
            M.WIDE_LONG_PASS_MEAN_ROWS = saved
        saved = M.TMA_GATE_UP_MIN_MEAN_ROWS, M.TMA_DOWN_MIN_MEAN_ROWS
        try:  # the wide path on the wide kernel's GEMMs only, with one or both GEMMs on moe_tma_gemm at every size
            for name, gu_from, down_from in (("wide_no_tma", 1 << 30, 1 << 30), ("wide_tma_down", 1 << 30, 0),
                                             ("wide_tma_both", 0, 0)):
                M.TMA_GATE_UP_MIN_MEAN_ROWS, M.TMA_DOWN_MIN_MEAN_ROWS = gu_from, down_from
                layer[name] = do_bench(graph_of(lambda: M.fused_moe(x, **W, cfg=cfg, path="wide"))) * 1e3  # noqa: B023
        finally:
            M.TMA_GATE_UP_MIN_MEAN_ROWS, M.TMA_DOWN_MIN_MEAN_ROWS = saved
        row["layer_us"] = layer
        row["tma_gate_up_equals_wide"] = torch.equal(M.tma_gemm(x, tok, W["w_gate"], W["w_up"], offsets), h)
        y_tma = M.tma_gemm(h, None, W["w_down"], None, offsets).float()
        y_cutlass = M._grouped_mm(h, W["w_down"].transpose(1, 2), ends, offsets).float()
        row["tma_down_rel_diff_vs_grouped"] = ((y_tma - y_cutlass).norm() / y_cutlass.norm()).item()
        y_ref = moe_reference(x, W["router_weight"], W["expert_bias"], W["w_gate"], W["w_up"], W["w_down"], W["shared"], cfg)
        y = M.fused_moe(x, **W, cfg=cfg, path="wide").float()
        row["wide_rel_err_vs_twin"] = ((y - y_ref.float()).norm() / y_ref.float().norm()).item()
        row["flops"] = 2.0 * N * (k + 1) * 3 * Dm * I + 2.0 * N * Dm * cfg.num_experts
        rows.append(row)
        print(f"moe mid N={N} (max {row['max_rows_per_expert']} rows/expert): layer "
              + " | ".join(f"{p} {v:.1f}" for p, v in layer.items()) + " us; gemms "
              + " | ".join(f"{n} {v:.1f}" for n, v in row["gemm_us"].items())
              + f" us; wide vs twin {row['wide_rel_err_vs_twin']:.1e}", flush=True)
    RESULTS["moe_mid"] = rows


# Ring-mini's decode projections: (name, M, K).
GEMV_SHAPES = [("lightning qkv + gate", 8192, 2048), ("softmax qkv", 3072, 2048), ("output", 2048, 2048),
               ("dense gate / up", 5120, 2048), ("dense down", 2048, 5120), ("lm_head", 157184, 2048)]


def bench_gemv(tokens=(1, 2, 4, 8), layers=16, rounds=3):
    """A decode step's projections as it runs them: `layers` of [RMSNorm (add_rms_norm kernel) -> projection] in one
    CUDA graph, distinct weights per layer (cold in L2, as in a step; 4 layers for the lm_head), replayed in turn
    for: `linear_small` launched as a programmatic dependent (the norm's tail overlaps its weight loads) and launched
    plainly, each of its two kernels forced (the CUDA-core GEMV up to 4 rows; the mma kernel at its default K split (4)
    and at every other), and cuBLAS (torch.mm). us per projection, best round; bytes = weight + rows."""
    g = torch.Generator(device="cuda").manual_seed(5)
    ext = extension()
    rows = []
    for name, Mo, Kd in GEMV_SHAPES:
        n_layers = 4 if Mo > 100_000 else layers
        Ws = [(torch.randn(Mo, Kd, device="cuda", generator=g) * Kd**-0.5).to(torch.bfloat16) for _ in range(n_layers)]
        nw = torch.ones(Kd, device="cuda", dtype=torch.bfloat16)
        for N in tokens:
            x = torch.randn(N, Kd, device="cuda", generator=g).to(torch.bfloat16)
            outs = [torch.empty(N, Mo, device="cuda", dtype=torch.bfloat16) for _ in Ws]

            def step(proj):
                for W, o in zip(Ws, outs):
                    _, h = K.add_rms_norm(x, None, nw, 1e-6)
                    proj(h, W, o)

            served = lambda h, W, o: K.linear_small(h, W, out=o)  # noqa: E731
            variants = [("linear_small, dependent", served, True), ("linear_small, plain", served, False)]
            if N <= 4:
                variants.append(("CUDA-core GEMV", lambda h, W, o: ext.dense_gemv(h, W, o), True))
            variants += [(f"mma, ksplit {ks or 'default (4)'}", lambda h, W, o, ks=ks: ext.skinny_gemm(h, W, o, ks), True)
                         for ks in (0, 1, 2, 8)]
            variants.append(("cuBLAS", lambda h, W, o: torch.mm(h, W.t(), out=o), True))
            graphs = {}
            for label, proj, dep in variants:
                K.set_programmatic_launch(dep)
                graphs[label] = graph_of(lambda proj=proj: step(proj))
            K.set_programmatic_launch(True)
            for o, W in zip(outs, Ws):  # every variant computes the same projection
                ref = (x.float() @ W.float().t())
                for label, proj, _ in variants:
                    o.zero_()
                    proj(x, W, o)
                    err = ((o.float() - ref).abs().max() / ref.abs().max()).item()
                    assert err < 2**-7, (name, N, label, err)
                break
            norm_only = graph_of(lambda: [K.add_rms_norm(x, None, nw, 1e-6) for _ in Ws])
            times = {k: [] for k in graphs}
            for _ in range(rounds):
                for k, fn in graphs.items():
                    times[k].append(events_ms(fn, 100) * 1e3 / n_layers)
            norm_us = events_ms(norm_only, 100) * 1e3 / n_layers
            best = {k: min(v) for k, v in times.items()}
            mb = linear_small_bytes(N, Mo, Kd) / 1e6
            row = {"name": name, "M": Mo, "K": Kd, "N": N, "layers": n_layers, "us_with_norm": best, "all_us": times,
                   "norm_alone_us": norm_us, "MB": mb,
                   "cublas_over_dependent": best["cuBLAS"] / best["linear_small, dependent"]}
            rows.append(row)
            print(f"gemv {name:22s} N={N}: " + " | ".join(f"{k} {v:.2f}" for k, v in best.items())
                  + f" us (norm + projection; norm alone {norm_us:.2f}); {mb:.1f} MB; cuBLAS / ours "
                  f"{row['cublas_over_dependent']:.3f}x", flush=True)
        Ws = outs = None  # this shape's weights go before the next one's are made
        torch.cuda.empty_cache()
    RESULTS["gemv"] = rows


def bench_route(tokens=(4096, 32768, 131072)):
    """The router's selection step (sigmoid, group top-2 sums, kept groups, top-8, weights) on fp32 logits at the
    Ring-mini config, as a prefill step runs it: moe_route's register path for 256 experts against its shared-memory
    kernel (which a logits view off 16-byte alignment takes) and the torch twin (route_reference), with the shared
    expert appended. Both kernels must pick the same experts with bitwise the same weights."""
    from ringlinear.kernels.moe_reference import route_reference

    cfg, ext, rows = RING_MINI_ROUTER, extension(), []
    g = torch.Generator(device="cuda").manual_seed(3)
    bias = torch.randn(256, device="cuda", generator=g) * 0.01
    for N in tokens:
        logits = torch.randn(N, 256, device="cuda", generator=g)
        buf = torch.empty(N * 256 + 1, device="cuda")
        buf[1:].copy_(logits.reshape(-1))
        shifted = buf[1:].view(N, 256)
        outs = {}

        def kernel(lg, key):
            ids = torch.empty(N, 9, dtype=torch.int32, device="cuda")
            w = torch.empty(N, 9, device="cuda")
            outs[key] = (ids, w)
            return lambda: ext.moe_route(lg, bias, cfg.n_group, cfg.topk_group, cfg.top_k, cfg.norm_topk_prob,
                                         float(cfg.routed_scaling_factor), 256, ids, w)

        fast, general = kernel(logits, "fast"), kernel(shifted, "general")
        fast(), general()
        same = bool(torch.equal(*[o[0] for o in outs.values()]) and torch.equal(*[o[1] for o in outs.values()]))
        t_fast, t_general = do_bench(fast) * 1e3, do_bench(general) * 1e3
        t_twin = do_bench(lambda: route_reference(logits, bias, cfg)) * 1e3
        rows.append({"tokens": N, "register_us": t_fast, "shared_memory_us": t_general, "twin_us": t_twin,
                     "bitwise_same": same})
        print(f"route N={N:6d}: register path {t_fast:8.1f} us | shared-memory kernel {t_general:8.1f} us "
              f"({t_general / t_fast:.2f}x) | torch twin {t_twin:8.1f} us ({t_twin / t_fast:.1f}x) | same: {same}",
              flush=True)
    RESULTS["route"] = rows


def bench_prefill_v(tokens=(4096, 16384, 32768, 131072)):
    """A lightning layer's attention from its raw projection at the Ring-mini shape (qkv: 3 x 2048 columns of the
    [T, 8192] qkv + gate GEMM output, fp32 QK-norm, RoPE on 64 of 128 channels, one sequence from position 0):
    qkv_prologue writing q, k and v then the prefill (the path before), against qkv_prologue writing q and k only and
    the prefill reading v in place from the projection (v_in_place), and against no prologue pass at all (q, k and v
    raw from the projection, the prefill kernel applying the QK-norm and RoPE: QKPrologue), on one prepared plan,
    with a bitwise check of the outputs and final states."""
    from ringlinear.ops.rope import rope_cos_sin

    rows, gamma, rot = [], gammas(), D // 2
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(T)
        t = torch.randn(T, 4 * H * D, device="cuda", generator=g).to(torch.bfloat16)
        qkv, pos = t[:, : 3 * H * D], torch.arange(T, device="cuda")
        cos, sin = rope_cos_sin(pos, rot, 1e6)
        kw = dict(silu=False, q_norm_weight=torch.rand(D, device="cuda", generator=g) + 0.5,
                  k_norm_weight=torch.rand(D, device="cuda", generator=g) + 0.5, eps=1e-6, rotary_dim=rot,
                  rope_theta=1e6, out_dtype=torch.bfloat16, rope_cos_sin=(cos, sin))
        prep = L.prepare_prefill([T], [0], [False], H, D, "cuda")
        states = [torch.zeros(1, H, D, D, device="cuda") for _ in range(3)]
        prologue = {m: (lambda m=m: K.qkv_prologue(qkv, pos, H, H, D, v_in_place=m, **kw)) for m in (False, True)}
        layer = {m: (lambda m=m, s=s: L.run_prepared_prefill(prep, *prologue[m](), s, gamma))
                 for m, s in ((False, states[0]), (True, states[1]))}
        raw = qkv.unflatten(1, (3 * H, D)).split(H, 1)
        pro = L.QKPrologue(kw["q_norm_weight"], kw["k_norm_weight"], 1e-6, cos, sin, pos, 1e6)
        layer["fused"] = lambda: L.run_prepared_prefill(prep, *raw, states[2], gamma, qk_prologue=pro)
        outs = [layer[m]() for m in (False, True, "fused")]
        same = bool(all(torch.equal(outs[0], o) for o in outs[1:]) and all(torch.equal(states[0], st) for st in states))
        row = {"tokens": T, "bitwise_same": same}
        for m, name in ((False, "copied"), (True, "in_place")):
            row[f"v_{name}_ms"] = do_bench(layer[m])
            row[f"prologue_v_{name}_ms"] = do_bench(prologue[m])
        row["qk_in_prefill_ms"] = do_bench(layer["fused"])
        rows.append(row)
        print(f"prefill from qkv T={T:6d}: qk in prefill {row['qk_in_prefill_ms']:7.3f} ms | v in place "
              f"{row['v_in_place_ms']:7.3f} ms ({row['v_in_place_ms'] / row['qk_in_prefill_ms']:.2f}x) | v copied "
              f"{row['v_copied_ms']:7.3f} ms ({row['v_copied_ms'] / row['qk_in_prefill_ms']:.2f}x) | prologue alone "
              f"{row['prologue_v_in_place_ms']:.3f} / {row['prologue_v_copied_ms']:.3f} ms | same: {same}", flush=True)
        del t, qkv, states
    RESULTS["prefill_v"] = rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--only", default="ceilings,decode,prefill,moe")
    ap.add_argument("--moe-mid-tokens", default="", help="comma-separated token counts for --only moe-mid (default: all)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    extension()
    RESULTS["gpu"] = torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    RESULTS["build_s"] = time.time() - t0
    only = set(args.only.split(","))
    mid_tokens = [tuple(int(t) for t in args.moe_mid_tokens.split(","))] if args.moe_mid_tokens else []
    sections = [
        ("ceilings", ceilings, ()),
        ("decode", bench_decode, ([1, 64, 256],)),
        ("prefill", bench_prefill, ([4096, 16384] if args.quick else [4096, 16384, 65536, 131072],)),
        ("gemv", bench_gemv, ()),
        ("moe-latency", bench_moe_latency, ()),
        ("prefill-v", bench_prefill_v, ()),
        ("route", bench_route, ()),
        ("moe-mid", bench_moe_mid, mid_tokens),
    ]
    for name, fn, fargs in sections:
        if name in only:
            try:
                fn(*fargs)
            except Exception as exc:  # noqa: BLE001
                record_error(name, exc)
            (args.out / "gpu_kernels.json").write_text(json.dumps(RESULTS, indent=1))
    if "moe" in only:
        c = RESULTS.get("ceilings", {})
        try:
            bench_moe([1, 4, 16, 32, 48, 64, 128, 256, 512, 1024, 2048], [4096] if args.quick else [4096, 16384, 32768],
                      c.get("copy_GBps", 4300.0), c.get("bf16_matmul_TFLOPs", 790.0))
        except Exception as exc:  # noqa: BLE001
            record_error("moe", exc)
    (args.out / "gpu_kernels.json").write_text(json.dumps(RESULTS, indent=1))
    try:
        plot(args.out)
    except Exception as exc:  # noqa: BLE001
        record_error("plot", exc)
    table()


if __name__ == "__main__":
    with torch.no_grad():
        main()
