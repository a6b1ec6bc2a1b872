"""Pod engine throughput with the reference torch ops: prefill tokens/s vs context, decode tokens/s vs batch size,
and the prefix-state cache's effect on a repeated long prompt.

    PYTHONPATH=gpu-backend python bench/pod_throughput.py --preset ring-mini-linear-2.0 --device cuda \\
        --contexts 1024,4096,16384,32768 --batches 1,8,32,64 --json out.json
    PYTHONPATH=gpu-backend python bench/pod_throughput.py --model test/fixtures/tiny --device cpu \\
        --contexts 256,1024 --batches 1,4 --decode-steps 4          # a CPU smoke run

Random weights (made on the device) are enough: throughput does not depend on the values, except through MoE
routing, which random routers spread roughly uniformly. Everything runs through `Engine.step()`, the same path the
server uses; timings synchronise the device at step ends (each step reads its sampled ids back).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu-backend"))

from ringlinear.checkpoint import load_model  # noqa: E402
from ringlinear.config import RingLinearConfig  # noqa: E402
from ringlinear.engine import Engine, EngineConfig, SamplingParams, random_model  # noqa: E402
from ringlinear.tools.params import PRESETS  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_until_done(eng: Engine) -> int:
    steps = 0
    while eng.has_work():
        eng.step()
        steps += 1
    return steps


def prompt_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(16, vocab) for _ in range(n)]


def bench_prefill(eng: Engine, contexts: list[int], rng, dev, vocab) -> list[dict]:
    rows = []
    for T in contexts:
        eng.prefix.clear()
        prompt = prompt_ids(rng, T, vocab)
        sync(dev)
        t0 = time.perf_counter()
        eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        steps = run_until_done(eng)
        sync(dev)
        dt = time.perf_counter() - t0
        rows.append({"context": T, "seconds": dt, "steps": steps, "prefill_tok_s": T / dt})
        print(f"prefill  T={T:6d}  {dt * 1e3:9.1f} ms  {T / dt:10.0f} tok/s  ({steps} steps)", flush=True)
    return rows


def bench_decode(eng: Engine, batches: list[int], prompt_len: int, steps: int, rng, dev, vocab) -> list[dict]:
    rows = []
    for B in batches:
        eng.prefix.clear()
        reqs = [eng.add_request(prompt_ids(rng, prompt_len, vocab),
                                SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)) for _ in range(B)]
        while not all(r.output for r in reqs):  # prefill everyone (and take their first token)
            eng.step()
        eng.step()  # one warm decode step at this batch size
        sync(dev)
        t0 = time.perf_counter()
        n0 = eng.generation_tokens_total
        for _ in range(steps):
            eng.step()
        sync(dev)
        dt = time.perf_counter() - t0
        toks = eng.generation_tokens_total - n0
        run_until_done(eng)
        rows.append({"batch": B, "context": prompt_len, "steps": steps, "seconds": dt, "decode_tok_s": toks / dt,
                     "step_ms": dt / steps * 1e3})
        print(f"decode   B={B:3d}  ctx={prompt_len}  {dt / steps * 1e3:8.1f} ms/step  {toks / dt:9.1f} tok/s", flush=True)
    return rows


def bench_prefix(eng: Engine, T: int, rng, dev, vocab) -> dict:
    """Same long prompt + a different 32-token tail, twice: the second skips the cached prefix."""
    eng.prefix.clear()
    base = prompt_ids(rng, T, vocab)
    times = []
    for i in range(2):
        prompt = base + prompt_ids(rng, 32, vocab)
        sync(dev)
        t0 = time.perf_counter()
        r = eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        run_until_done(eng)
        sync(dev)
        times.append((time.perf_counter() - t0, r.cached_tokens))
    (cold, _), (warm, cached) = times
    print(f"prefix   T={T}+32  cold {cold * 1e3:.1f} ms  hit {warm * 1e3:.1f} ms  ({cached} tokens from cache, "
          f"{cold / warm:.1f}x faster to first token)", flush=True)
    return {"context": T, "cold_s": cold, "hit_s": warm, "cached_tokens": cached, "speedup": cold / warm}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--model", help="checkpoint directory instead of random weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--contexts", default="1024,4096,16384,32768")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--decode-context", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--prefix-context", type=int, default=8192, help="0 = skip the prefix-cache measurement")
    p.add_argument("--max-step-tokens", type=int, default=8192)
    p.add_argument("--memory-budget-gib", type=float, default=16.0)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    contexts = [int(x) for x in a.contexts.split(",") if x]
    batches = [int(x) for x in a.batches.split(",") if x]

    t0 = time.perf_counter()
    if a.model:
        model = load_model(a.model, dtype=dtype, device=dev)
    else:
        model = random_model(RingLinearConfig.from_dict(PRESETS[a.preset]), dev, dtype)
    sync(dev)
    print(f"model ready in {time.perf_counter() - t0:.1f} s: {a.preset or a.model}, {dtype}, {dev}"
          + (f" ({torch.cuda.get_device_name(dev)}, {torch.cuda.memory_allocated(dev) / 2**30:.1f} GiB)" if dev.type == "cuda" else ""),
          flush=True)
    max_ctx = max(contexts + [a.decode_context, a.prefix_context]) + 64 + a.decode_steps
    ec = EngineConfig(max_batch=max(batches), max_context=max_ctx, memory_budget=int(a.memory_budget_gib * 2**30),
                      max_step_tokens=a.max_step_tokens, max_queue=max(batches) + 4)
    eng = Engine(model, ec, eos_ids=set())
    vocab = model.config.vocab_size
    rng = random.Random(0)
    # warm-up: first kernels, allocator
    eng.add_request(prompt_ids(rng, 128, vocab), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    run_until_done(eng)

    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "dtype": str(dtype), "model": a.preset or a.model, "max_step_tokens": a.max_step_tokens,
           "prefill": bench_prefill(eng, contexts, rng, dev, vocab),
           "decode": bench_decode(eng, batches, a.decode_context, a.decode_steps, rng, dev, vocab)}
    if a.prefix_context:
        res["prefix_cache"] = bench_prefix(eng, a.prefix_context, rng, dev, vocab)
    if dev.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        print(f"peak device memory {res['peak_gib']:.1f} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
