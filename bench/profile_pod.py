"""Where the pod's GPU time goes: torch.profiler tables of one engine prefill step, one decode step and the fused MoE.

    PYTHONPATH=gpu-backend python3 bench/profile_pod.py --prefill 32768 --decode 64x4096 --moe 128,256,4096,32768
    PYTHONPATH=gpu-backend python3 bench/profile_pod.py --prefill "" --decode "" --mixed 32x4096+32768@2048,32x4096+300@2048 \
        --variants graphs,eager
    PYTHONPATH=gpu-backend python3 bench/profile_pod.py --tiny --device cpu --prefill 256 --decode 4x256 --moe 8 \
        --mixed 2x256+512@64   # smoke

Prints, per workload, the top kernels by device time (self CUDA time on a GPU, self CPU time on CPU) and the step's
wall time. A diagnostic for deciding what to optimise next, not a benchmark: profiling adds host overhead.
--mixed also answers whether a mixed step (decode rows + a prompt chunk, eager) is bound by the host or the GPU:
it times unprofiled steps, then prints the profiled step's GPU busy time (union of kernel intervals) against its wall
time, the kernel launches, the host-device syncs, the top ops by host time, and a cProfile of three more steps.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))
sys.path.insert(0, str(ROOT / "bench"))

from pod_e2e import BLOCK, install_contexts, sync  # noqa: E402
from ringlinear import kernels  # noqa: E402
from ringlinear.kernels import lightning  # noqa: E402
from ringlinear.config import RingLinearConfig  # noqa: E402
from ringlinear.engine import Engine, EngineConfig, SamplingParams, random_model  # noqa: E402
from ringlinear.engine.pools import LinearStatePool, PagedKVCache  # noqa: E402
from ringlinear.tools.params import PRESETS  # noqa: E402


def table(prof, dev, rows: int) -> str:
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def run_profiled(fn, dev, rows, label):
    fn()  # warm: plans, allocator
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        sync(dev)
        dt = time.perf_counter() - t0
    print(f"\n=== {label}: {dt * 1e3:.1f} ms wall (profiled)\n{table(prof, dev, rows)}", flush=True)


def gpu_busy_ms(prof) -> tuple[float, int]:
    """Union of the device-kernel intervals in a profile (ms) and the number of kernels."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e3, len(spans)


def profile_mixed(model, spec: str, dev, rows: int, rng, variant: str = "graphs") -> dict:
    """B streams decoding beside prompt tokens: unprofiled step times, then one profiled step and a cProfile of three.

    PROMPT > STEP: one long prompt in chunks (its steps 1-8 timed, the 9th profiled). PROMPT <= STEP: a new PROMPT-token
    prompt (max_tokens 1) arrives before every step, so each step is the B decodes + one whole short prompt.
    Returns the figures (step times, GPU busy time of the profiled step, warm-up) for --json.
    variant: how the steps run - "graphs" (as served: the pieces between attention calls replayed from the warm-up's
    graphs), "eager" (graphs dropped: every operator launched from Python) or "uncaptured" (the graphs' padded
    buffers and pieces, run eagerly: the same GPU work as "graphs", with each kernel visible to the profiler);
    "graphs-every-row": graphs with the last layer on every row (ModelRunner.last_layer_logit_rows_only off)."""
    head, step = spec.split("@")
    bc, T = head.split("+")
    B, ctx, T, step = *(int(x) for x in bc.split("x")), int(T), int(step)
    refill = T <= step
    cfg = model.config
    n_steps = (0 if refill else T // step) + 16
    block_b = PagedKVCache.bytes_per_block(cfg, BLOCK, model.dtype)
    budget = (B + 1) * LinearStatePool.bytes_per_slot(cfg) + (
        B * -(-(ctx + n_steps) // BLOCK) + -(-(T + 8) // BLOCK) + 1) * block_b
    eng = Engine(model, EngineConfig(max_batch=B + 1, max_context=max(ctx + n_steps, T + 8), memory_budget=budget,
                                     prefix_cache_bytes=0, max_step_tokens=step, max_queue=B + 1, block_size=BLOCK),
                 eos_ids=set())
    t0 = time.perf_counter()
    w = eng.warm_up()
    rec = {"case": spec, "variant": variant, "warm_up_s": round(time.perf_counter() - t0, 2),
           "step_graphs": w.step_graphs}
    print(f"warm-up: {w.step_graphs} step piece graphs, {rec['warm_up_s']:.1f} s", flush=True)
    if variant == "eager":
        held = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        eng.runner.drop_step_graphs()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            rec["graphs_mib"] = round((held - torch.cuda.memory_allocated(dev)) / 2**20)
            print(f"step graphs and their buffers held {rec['graphs_mib']} MiB", flush=True)
    elif variant == "uncaptured":
        eng.runner.capture_step_graphs(eng.config.max_step_tokens, eager=True)
    elif variant == "graphs-every-row":
        eng.runner.last_layer_logit_rows_only = False
    elif variant != "graphs":
        raise ValueError(f"unknown variant {variant!r}")
    install_contexts(eng, B, ctx + n_steps, n_steps, rng)
    eng.step()  # decode only

    def new_prompt():
        return eng.add_request([rng.randrange(16, cfg.vocab_size) for _ in range(T)],
                               SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))

    req = new_prompt()

    def one_step():
        nonlocal req
        if refill and req.finish_reason is not None:
            req = new_prompt()
        eng.step()

    times = []
    for _ in range(8 if refill else min(8, T // step - 2)):  # leave a long prompt's chunks for the profiled step
        sync(dev)
        t0 = time.perf_counter()
        one_step()
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    label = f"mixed {spec} ({variant})"
    rec.update(step_ms=[round(t, 2) for t in times], median_ms=round(statistics.median(times[1:]), 2))
    print(f"\n=== {label}: unprofiled step ms {' '.join(f'{t:.1f}' for t in times)}; median after the first "
          f"{statistics.median(times[1:]):.1f}", flush=True)
    if not refill and req.computed >= len(req.prompt):
        print("(prompt finished before the profiled step: use a longer PROMPT)")
    else:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            one_step()
            sync(dev)
            wall = (time.perf_counter() - t0) * 1e3
        busy, kernels_n = gpu_busy_ms(prof)
        rec.update(profiled_wall_ms=round(wall, 2), gpu_busy_ms=round(busy, 2), kernels=kernels_n)
        names = [e.name for e in prof.events()]
        syncs = sum("Synchronize" in n for n in names)
        copies = sum(n.startswith("cudaMemcpy") for n in names)
        print(f"profiled step: wall {wall:.1f} ms, GPU busy {busy:.1f} ms ({busy / wall:.0%}), {kernels_n} kernels, "
              f"{syncs} sync calls, {copies} cudaMemcpy calls", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))
        if dev.type == "cuda":  # kernels replayed from graphs are not attributed to operators: list them by name
            kern: dict[str, list[float]] = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    kern.setdefault(e.name[:90], []).append(e.time_range.elapsed_us())
            print("kernels by device time (us total, count):")
            for name, ts in sorted(kern.items(), key=lambda kv: -sum(kv[1]))[:rows]:
                print(f"  {sum(ts):9.1f} {len(ts):5d}  {name}")
        if refill or req.computed + 3 * step < len(req.prompt):  # the host's Python side: where its time goes
            import cProfile
            import pstats

            cp = cProfile.Profile()
            cp.enable()
            for _ in range(3):
                one_step()
            sync(dev)
            cp.disable()
            print("cProfile of 3 mixed steps (host; time blocked in a sync counts where it waits):")
            pstats.Stats(cp).sort_stats("tottime").print_stats(rows)
            pstats.Stats(cp).sort_stats("cumulative").print_stats(rows)
    for r in list(eng.running) + list(eng.waiting):
        eng.abort(r.id)
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ring-mini-linear-2.0", choices=sorted(PRESETS))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefill", default="32768", help="comma list of prompt lengths")
    p.add_argument("--decode", default="64x4096", help="comma list of BATCHxCONTEXT")
    p.add_argument("--moe", default="", help="comma list of token counts for fused_moe alone")
    p.add_argument("--mixed", default="", help="comma list of BxCTX+PROMPT@STEP: B streams decoding at CTX tokens "
                   "while a PROMPT-token prompt prefills in STEP-token steps (PROMPT <= STEP: a new short prompt "
                   "before every step)")
    p.add_argument("--variants", default="graphs",
                   help="comma list of how each --mixed case runs: graphs (as served), eager, uncaptured, "
                        "graphs-every-row")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--json", default="", help="write the --mixed figures here")
    p.add_argument("--no-graphs", action="store_true", help="decode steps run eagerly (per-kernel rows in the table)")
    p.add_argument("--decode-prefetch-mib", default="",
                   help="comma list: profile each --decode case once per lightning decode L2 read-ahead distance "
                        "(MiB; 0 = off; default: as served)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = json.loads((ROOT / "test/fixtures/tiny/config.json").read_text()) if a.tiny else PRESETS[a.preset]
    cfg = RingLinearConfig.from_dict(base)
    model = random_model(cfg, dev, dtype)
    rng = random.Random(0)
    block_b = PagedKVCache.bytes_per_block(cfg, BLOCK, dtype)

    for T in [int(x) for x in a.prefill.split(",") if x]:
        budget = LinearStatePool.bytes_per_slot(cfg) + (-(-(T + 8) // BLOCK) + 1) * block_b
        eng = Engine(model, EngineConfig(max_batch=1, max_context=T + 8, memory_budget=budget, prefix_cache_bytes=0,
                                         max_step_tokens=T, block_size=BLOCK), eos_ids=set())

        def prefill(eng=eng):
            eng.add_request([rng.randrange(16, cfg.vocab_size) for _ in range(T)],
                            SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            while eng.has_work():
                eng.step()

        run_profiled(prefill, dev, a.rows, f"prefill T={T}")
        del eng

    served_prefetch = lightning.DECODE_PREFETCH_BYTES
    prefetch = [int(x) << 20 for x in a.decode_prefetch_mib.split(",") if x] or [served_prefetch]
    for spec, pf in [(s, pf) for s in a.decode.split(",") if s for pf in prefetch]:
        B, ctx = (int(x) for x in spec.split("x"))
        lightning.DECODE_PREFETCH_BYTES = pf  # read when the decode graphs are captured, by this engine's first steps
        budget = B * (LinearStatePool.bytes_per_slot(cfg) + -(-ctx // BLOCK) * block_b) + block_b  # + scratch block
        eng = Engine(model, EngineConfig(max_batch=B, max_context=ctx, memory_budget=budget, prefix_cache_bytes=0,
                                         max_step_tokens=max(64, B), max_queue=B, block_size=BLOCK,
                                         cuda_graphs=False if a.no_graphs else None), eos_ids=set())
        install_contexts(eng, B, ctx, 8, rng)
        run_profiled(eng.step, dev, a.rows, f"decode B={B} ctx={ctx}, L2 read-ahead {pf >> 20} MiB")
        del eng
    lightning.DECODE_PREFETCH_BYTES = served_prefetch  # the --mixed cases below run as served

    mixed = []
    for spec in [s for s in a.mixed.split(",") if s]:
        for variant in a.variants.split(","):
            mixed.append(profile_mixed(model, spec, dev, a.rows, rng, variant))
        if a.json:
            Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                                                "torch": torch.__version__, "mixed": mixed}, indent=1))

    moe = next((layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts_gate_proj")), None)
    for N in [int(x) for x in a.moe.split(",") if x]:
        if moe is None:
            break
        x = torch.randn(N, cfg.hidden_size, device=dev, dtype=dtype)
        sh = moe.shared_experts
        rc = kernels.RouterConfig(cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                                  cfg.routed_scaling_factor, cfg.norm_topk_prob)
        bias = moe.gate.expert_bias if cfg.moe_router_enable_expert_bias else None
        shared = None if sh is None else (sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
        run_profiled(lambda: kernels.fused_moe(x, moe.gate.weight, bias, moe.experts_gate_proj, moe.experts_up_proj,
                                               moe.experts_down_proj, shared, rc), dev, a.rows, f"fused_moe N={N}")


if __name__ == "__main__":
    main()
