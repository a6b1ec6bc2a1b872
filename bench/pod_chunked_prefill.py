"""Long prompts at the served step budget (issue 6, the pod): time to first token vs the tokens a step may carry, what
a long prompt's chunks cost the streams decoding beside it, and the chunk attention on its own.

    python3 bench/pod_chunked_prefill.py --json $OUT/chunked.json                       # H200
    PYTHONPATH=gpu-backend python bench/pod_chunked_prefill.py --device cpu --tiny \\
        --contexts 512 --budgets 64,256 --mixed-prompt 512 --mixed-batch 2 --mixed-context 256 --attention "" \
        --mixed reference:64,kernel:128 --mixed-prefill-budget 256 --first 300,200 --step-tokens 64

ttft       One request of T tokens, nothing else running, engine steps of `budget` prompt tokens (the engine's
           max_prefill_step_tokens; budget = T is the whole prompt in one step, the figure bench/pod_e2e.py reports).
           Ours and the twin (all 20 layers softmax), both on the kernel path. "cold" is the first prompt of that
           length (after the engine's warm-up built the cuDNN plans), "warm" the best of --reps after it. For ours
           also with the reference chunk attention (KV heads repeated, lower-right mask: torch takes FlashAttention-2) instead of
           the kernel path's (the KV heads in place; a chunk after the first as two calls merged by their
           log-sum-exps, on cuDNN or FlashAttention-2 by size, ringlinear/ops/attention.py).
mixed      B requests decoding at --mixed-context + one --mixed-prompt-token prompt arriving; the steps that carry
           decodes take max_step_tokens = d tokens: the streams' time between tokens while the prompt prefills
           (median and max step) and the prompt's time to first token, per (chunk attention, d) case, in one engine,
           each case on a new thread warmed up as the server does (Engine.warm_up on the serving thread).
first      The first requests after start-up, each prompt length twice in a row (first / repeat time to first token),
           with the served budgets, in one engine, each case on a new thread (torch keeps its cuDNN plans per thread,
           so a new thread starts with none): no warm-up; Engine.warm_up on another thread (the server until the
           seventh session); Engine.warm_up on the serving thread (the server now, through AsyncEngine.call).
attention  The chunk attention alone (Ring-mini softmax layer: H 16, Hkv 4, d 128, bf16) at (prefix, chunk) shapes:
           kernel path (one FlashAttention-2 call, or the split with each call on cuDNN or FA-2 by size: on_cudnn)
           vs the cuDNN split at every size, FlashAttention-2 with the KV heads in place, and the reference; first
           call at a new shape, the first call at a second shape of the same size buckets, and the median of later
           calls; max |difference|.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))
sys.path.insert(0, str(ROOT / "bench"))

from pod_e2e import (BLOCK, add_model_arguments, base_config, install_contexts, sync, time_to_first_token,  # noqa: E402
                     twin_config)
from gpu_timing import events_ms  # noqa: E402
from ringlinear.config import RingLinearConfig  # noqa: E402
from ringlinear.engine import Engine, EngineConfig, SamplingParams, random_model  # noqa: E402
from ringlinear.engine.pools import LinearStatePool, PagedKVCache  # noqa: E402
from ringlinear.ops.attention import chunk_attention, chunk_attention_reference, merge_attention  # noqa: E402


def engine_for(model, max_batch: int, contexts: list[int], budget: int) -> Engine:
    cfg = model.config
    block_b = PagedKVCache.bytes_per_block(cfg, BLOCK, model.dtype)
    mem = max_batch * LinearStatePool.bytes_per_slot(cfg) + (sum(-(-c // BLOCK) for c in contexts) + 1) * block_b
    return Engine(model, EngineConfig(max_batch=max_batch, max_context=max(contexts), memory_budget=mem,
                                      prefix_cache_bytes=0, max_step_tokens=budget, max_queue=max_batch,
                                      block_size=BLOCK), eos_ids=set())


def prompt(rng, n, vocab):
    return [rng.randrange(16, vocab) for _ in range(n)]


def on_new_thread(fn, *args):
    """fn(*args) on a thread of its own (torch's cuDNN plan cache is per thread: a new thread starts without plans)."""
    box = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


# ---------------------------------------------------------------------------------------------------------- first
def bench_first(model, prompts, step_budget, prefill_budget, max_context, dev, cases) -> list[dict]:
    rows, rng = [], random.Random(2)
    eng = engine_for(model, 1, [max_context], step_budget)
    eng.config.max_prefill_step_tokens = prefill_budget
    for case in cases:
        warm = {}
        if case == "other-thread":
            t0 = time.perf_counter()
            warm["result"] = on_new_thread(eng.warm_up)
            warm["s"] = time.perf_counter() - t0

        def serve():
            if case == "serving-thread":
                t0 = time.perf_counter()
                warm["result"] = eng.warm_up()
                warm["s"] = time.perf_counter() - t0
            return [(T, time_to_first_token(eng, T, rng, dev), time_to_first_token(eng, T, rng, dev)) for T in prompts]

        got = on_new_thread(serve)
        for T, first, repeat in got:
            rows.append({"case": case, "prompt": T, "first_s": first, "repeat_s": repeat, "extra_s": first - repeat,
                         "warm_up_s": warm.get("s"), "warm_up": list(warm["result"]) if "result" in warm else None})
            print(f"first {case:15s} T={T:6d}: first {first * 1e3:8.1f} ms, repeat {repeat * 1e3:8.1f} ms, first pays "
                  f"{(first - repeat) * 1e3:7.1f} ms", flush=True)
        if warm:
            print(f"first {case:15s} warm-up {warm['result']} in {warm['s']:.2f} s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------- ttft
def bench_ttft(model, name, contexts, budgets, reps, dev, attention_variants) -> list[dict]:
    rows, rng = [], random.Random(0)
    eng = engine_for(model, 1, [max(contexts) + 8], min(budgets))
    default_attention = eng.runner.chunk_attention

    def once(T):
        steps = eng.steps
        return time_to_first_token(eng, T, rng, dev), eng.steps - steps

    once(256)  # extension, allocator
    eng.config.max_step_tokens = eng.config.max_prefill_step_tokens = max(budgets)
    eng.warm_up()  # as the server does: the cuDNN plans of every chunk size bucket ("cold" is then what else a first pays)
    for variant in attention_variants:
        eng.runner.chunk_attention = default_attention if variant == "kernel" else chunk_attention_reference
        for T in contexts:
            for b in sorted({min(b, T) for b in budgets}):
                eng.config.max_step_tokens = eng.config.max_prefill_step_tokens = b
                cold, steps = once(T)
                warm = min(once(T)[0] for _ in range(reps))
                rows.append({"model": name, "attention": variant, "context": T, "budget": b, "steps": steps,
                             "cold_s": cold, "warm_s": warm, "tok_s": T / warm})
                print(f"ttft  {name:4s} {variant:9s} T={T:6d} budget={b:6d} steps={steps:4d}  cold {cold * 1e3:8.1f} ms  "
                      f"warm {warm * 1e3:8.1f} ms  {T / warm:9.0f} tok/s", flush=True)
    eng.runner.chunk_attention = default_attention
    return rows


# ---------------------------------------------------------------------------------------------------------- mixed
def bench_mixed(model, B, ctx, T, cases, prefill_budget, dev) -> list[dict]:
    """cases: (attention, max_step_tokens, overlapped steps) triples, run in order in one engine, each on a new thread after the engine's
    start-up warm-up on that thread, as the server does (no cuDNN plan left over from an earlier case)."""
    rows, rng = [], random.Random(1)
    max_steps = T // min(d for _, d, _ in cases) + 16
    eng = engine_for(model, B + 1, [ctx + max_steps + 8] * B + [T + 8], max(d for _, d, _ in cases))
    kernel_attention = eng.runner.chunk_attention

    def case(attention, d, overlap):
        eng.overlap = overlap
        eng.runner.chunk_attention = chunk_attention_reference if attention == "reference" else kernel_attention
        eng.config.max_step_tokens, eng.config.max_prefill_step_tokens = d, max(d, prefill_budget)
        eng.warm_up()
        streams = install_contexts(eng, B, ctx + max_steps + 8, max_steps, rng)
        eng.step()  # one decode-only step (graph replay) before the prompt arrives
        sync(dev)
        req = eng.add_request(prompt(rng, T, model.config.vocab_size), SamplingParams(max_tokens=1, temperature=0,
                                                                                     ignore_eos=True))
        t0, steps = time.perf_counter(), []
        while True:
            t1 = time.perf_counter()
            outs = eng.step()
            steps.append(time.perf_counter() - t1)
            if any(o.request_id == req.id for o in outs):
                break
        ttft = time.perf_counter() - t0
        for r in streams:
            eng.abort(r.id)
        while eng.has_work():  # an overlapped step still in flight
            eng.step()
        return ttft, steps, streams

    for attention, d, overlap in cases:
        ttft, steps, streams = on_new_thread(case, attention, d, overlap)
        med, mx = statistics.median(steps), max(steps)
        rows.append({"attention": attention, "overlap": overlap, "batch": B, "context": ctx, "prompt": T,
                     "max_step_tokens": d, "steps": len(steps),
                     "step_ms_median": med * 1e3, "step_ms_max": mx * 1e3, "ttft_s": ttft,
                     "stream_tok_s": B / med})
        print(f"mixed {attention}{'' if overlap else ' sync'} B={B} ctx={ctx} prompt={T} max_step_tokens={d:6d}: {len(steps):4d} steps, time between a "
              f"stream's tokens median {med * 1e3:7.1f} ms max {mx * 1e3:7.1f} ms; prompt TTFT {ttft * 1e3:8.1f} ms",
              flush=True)
    for attention, d in dict.fromkeys((a, d) for a, d, _ in cases):  # synchronous / overlapped, where both ran
        both = {ov: [r for r in rows if (r["attention"], r["max_step_tokens"], r["overlap"]) == (attention, d, ov)]
                for ov in (True, False)}
        if both[True] and both[False]:
            mean = lambda key, ov: statistics.mean(r[key] for r in both[ov])  # noqa: E731
            print(f"mixed {attention} B={B} max_step_tokens={d:6d}: synchronous / overlapped: time between tokens "
                  f"{mean('step_ms_median', False) / mean('step_ms_median', True):.3f}x, prompt TTFT "
                  f"{mean('ttft_s', False) / mean('ttft_s', True):.3f}x", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------- attention
def bench_attention(shapes, dev, reps=10) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ringlinear.ops.attention import cudnn_without_recompiles

    cudnn_without_recompiles()  # as the runner's kernel path does

    H, Hkv, d = 16, 4, 128
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for prefix, n in shapes:
        end = prefix + n
        # laid out as the runner's tensors (BSHD: [tokens, heads, d] viewed as [1, heads, tokens, d])
        q = torch.randn(n, H, d, device=dev, generator=g).to(torch.bfloat16).transpose(0, 1)[None]
        k = torch.randn(end, Hkv, d, device=dev, generator=g).to(torch.bfloat16).transpose(0, 1)[None]
        v = torch.randn(end, Hkv, d, device=dev, generator=g).to(torch.bfloat16).transpose(0, 1)[None]
        scale = d ** -0.5
        ref = chunk_attention_reference(q, k, v, scale)
        out = {}

        def timed(fn):
            sync(dev)
            t0 = time.perf_counter()
            o = fn()
            sync(dev)
            first = time.perf_counter() - t0
            return o, first, events_ms(fn, reps, warmup=0) / 1e3

        out["kernel"] = timed(lambda: chunk_attention(q, k, v, scale))
        out["cudnn_split"] = timed(lambda: _cudnn_split(q, k, v, scale))
        out["reference"] = timed(lambda: chunk_attention_reference(q, k, v, scale))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            try:
                out["flash_gqa"] = timed(lambda: _flash_gqa(q, k, v, scale))
            except RuntimeError as e:
                print(f"  flash with GQA unavailable: {str(e).splitlines()[0]}")
        # a second shape in the same power-of-two buckets: with TORCH_CUDNN_SDPA_AVOID_RECOMPILE its first call should
        # find the plan the first shape built
        n2, p2 = n - n // 8, prefix - prefix // 8
        sync(dev)
        t0 = time.perf_counter()
        _cudnn_split(q[:, :, :n2], k[:, :, : p2 + n2], v[:, :, : p2 + n2], scale)
        sync(dev)
        same_bucket_first = time.perf_counter() - t0
        flops = 4.0 * H * d * n * (prefix + (n + 1) / 2)
        for variant, (o, first, t) in out.items():
            diff = (o.float() - ref.float()).abs().max().item()
            rows.append({"prefix": prefix, "chunk": n, "variant": variant, "first_call_ms": first * 1e3, "ms": t * 1e3,
                         "tflops": flops / t / 1e12, "max_abs_diff_vs_reference": diff})
            if variant == "cudnn_split":
                rows[-1].update(same_bucket_shape=[p2, n2], same_bucket_first_call_ms=same_bucket_first * 1e3)
            print(f"attention prefix={prefix:6d} chunk={n:6d} {variant:10s} {t * 1e3:8.3f} ms ({flops / t / 1e12:5.0f} "
                  f"TFLOP/s), first call {first * 1e3:8.1f} ms, max |diff| {diff:.2e}", flush=True)
    return rows


def _cudnn_split(q, k, v, scale):
    """The cuDNN split at every size (what chunk_attention did for every chunk after the first before the switch)."""
    n, end = q.shape[2], k.shape[2]
    start = end - n

    def cudnn(q, k, v, causal):
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
        return o, lse.reshape(*q.shape[:3], 1).float()

    o_c, lse_c = cudnn(q, k[:, :, start:], v[:, :, start:], True)
    if start == 0:
        return o_c
    o_p, lse_p = cudnn(q, k[:, :, :start], v[:, :, :start], False)
    return merge_attention(o_p, lse_p, o_c, lse_c, q.dtype)


def _flash_gqa(q, k, v, scale):
    from torch.nn.attention.bias import causal_lower_right
    import torch.nn.functional as F

    n, end = q.shape[2], k.shape[2]
    mask = None if n == end else causal_lower_right(n, end)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--budgets", default="512,2048,8192,16384,32768,131072")
    p.add_argument("--reference-budgets", default="512,16384", help="budgets also run with the reference attention")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--models", default="ours,twin")
    p.add_argument("--mixed-batch", default="32", help="streams decoding beside the prompt, one run per value")
    p.add_argument("--mixed-context", type=int, default=4096)
    p.add_argument("--mixed-prompt", type=int, default=32768)
    p.add_argument("--mixed", default="reference:512,kernel:512,kernel:2048,kernel:8192",
                   help="attention:max_step_tokens[:sync] cases of the mixed section (attention: kernel or reference; "
                        ":sync = the engine's synchronous steps instead of overlapped ones)")
    p.add_argument("--mixed-prefill-budget", type=int, default=16384)
    p.add_argument("--first", default="100000,3000,20000,50000,130000",
                   help="prompt lengths of the first-requests section, in order ('' skips it)")
    p.add_argument("--first-cases", default="none,other-thread,serving-thread")
    p.add_argument("--step-tokens", type=int, default=2048, help="max_step_tokens of the first-requests section")
    p.add_argument("--attention", default="16384:512,16384:1024,16384:2048,16384:4096,65536:1024,65536:2048,"
                                          "65536:8192,114688:16384,98304:32768",
                   help="prefix:chunk shapes of the attention section ('' skips it; CUDA only)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = base_config(a)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "model": "tiny" if a.tiny else a.preset, "argv": sys.argv[1:]}

    def dump():
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))

    if a.attention and dev.type == "cuda":
        res["attention"] = bench_attention([tuple(int(x) for x in s.split(":")) for s in a.attention.split(",")], dev)
        dump()
    for name in a.models.split(","):
        cfg = RingLinearConfig.from_dict(base if name == "ours" else twin_config(base))
        model = random_model(cfg, dev, dtype)
        sync(dev)
        if name == "ours" and a.first:
            budget = a.mixed_prefill_budget
            res["first"] = bench_first(model, ints(a.first), min(a.step_tokens, budget), budget,
                                       max(ints(a.first)) + 16, dev, a.first_cases.split(","))
            dump()
        if a.contexts:
            res.setdefault("ttft", []).extend(bench_ttft(model, name, ints(a.contexts), ints(a.budgets), a.reps, dev,
                                                         ["kernel"]))
        if name == "ours" and a.contexts and a.reference_budgets:
            res["ttft"].extend(bench_ttft(model, name, ints(a.contexts), ints(a.reference_budgets), a.reps, dev,
                                          ["reference"]))
        dump()
        cases = [(c.split(":")[0], int(c.split(":")[1]), c.split(":")[2:] != ["sync"]) for c in a.mixed.split(",") if c]
        if name == "ours" and a.mixed_batch and cases:  # --mixed "" or --mixed-batch "": no mixed section
            res["mixed"] = [row for B in ints(a.mixed_batch) for row in bench_mixed(
                model, B, a.mixed_context, a.mixed_prompt, cases, a.mixed_prefill_budget, dev)]
            dump()
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    dump()


if __name__ == "__main__":
    main()
