"""Where the pod's GPU time goes: torch.profiler tables of one engine prefill step, one decode step and the fused MoE.

    PYTHONPATH=gpu-backend python3 bench/profile_pod.py --prefill 32768 --decode 64x4096 --moe 128,256,4096,32768
    PYTHONPATH=gpu-backend python3 bench/profile_pod.py --tiny --device cpu --prefill 256 --decode 4x256 --moe 8   # smoke

Prints, per workload, the top kernels by device time (self CUDA time on a GPU, self CPU time on CPU) and the step's
wall time. A diagnostic for deciding what to optimise next, not a benchmark: profiling adds host overhead.
"""

from __future__ import annotations

import argparse
import json
import random
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ring-mini-linear-2.0", choices=sorted(PRESETS))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prefill", default="32768", help="comma list of prompt lengths")
    p.add_argument("--decode", default="64x4096", help="comma list of BATCHxCONTEXT")
    p.add_argument("--moe", default="", help="comma list of token counts for fused_moe alone")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-graphs", action="store_true", help="decode steps run eagerly (per-kernel rows in the table)")
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

        def prefill():
            eng.add_request([rng.randrange(16, cfg.vocab_size) for _ in range(T)],
                            SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            while eng.has_work():
                eng.step()

        run_profiled(prefill, dev, a.rows, f"prefill T={T}")
        del eng

    for spec in [s for s in a.decode.split(",") if s]:
        B, ctx = (int(x) for x in spec.split("x"))
        budget = B * (LinearStatePool.bytes_per_slot(cfg) + -(-ctx // BLOCK) * block_b) + block_b  # + scratch block
        eng = Engine(model, EngineConfig(max_batch=B, max_context=ctx, memory_budget=budget, prefix_cache_bytes=0,
                                         max_step_tokens=max(64, B), max_queue=B, block_size=BLOCK,
                                         cuda_graphs=False if a.no_graphs else None), eos_ids=set())
        install_contexts(eng, B, ctx, 8, rng)
        run_profiled(eng.step, dev, a.rows, f"decode B={B} ctx={ctx}")
        del eng

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
