"""End-to-end pod throughput with the CUDA kernels (issue 6 d): Ring-mini-linear-2.0 vs its softmax twin, one harness.

    PYTHONPATH=gpu-backend python bench/pod_e2e.py --device cuda --json e2e.json            # H200
    PYTHONPATH=gpu-backend python bench/pod_e2e.py --device cpu --tiny                      # CPU smoke run

Both models are the same config with random bf16 weights made on the device; the twin sets layer_group_size=1, so all
20 layers are GQA softmax (prefill through torch SDPA: flash/cuDNN; decode through our paged-KV decode kernel, the
same as ours' 4 softmax layers). Decode steps replay CUDA graphs on both sides (`--no-graphs` for eager steps).
Everything runs through `Engine.step()` (the server's path) with the runner's kernel path on; timings synchronise
the device at step ends.

* prefill: one request of T tokens, the whole prompt in one step, max_tokens=1 (so time to first token). The roofline
  is the bf16 matrix rate (measured 788 TFLOP/s on this H200, KINDS.md) over the step's FLOPs: 2 x active parameters
  per token + attention (softmax layers: 2 T^2 H d causal; lightning layers: 4 H d^2 + 2 H 64 d per token).
* decode: B requests with `context` tokens each, one token per request per step. The contexts are *installed*, not
  computed: the requests are admitted (slots and KV blocks allocated for the whole context) and marked prefilled, with
  the KV cache and the linear states filled with random values - prefilling 128 x 64k tokens would take minutes and
  decode cost does not depend on the values (MoE routing: random routers spread tokens near uniformly either way).
  Each side runs at every batch of --batches that fits in the GPU's memory and at the largest batch that fits. The
  roofline is the bytes a step must move at the measured copy bandwidth (4.3 TB/s, KINDS.md): weights read
  (non-expert weights, lm_head, and the experts a batch touches, E(1-(1-k/E)^B) per MoE layer), KV read, linear
  states read and written.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))

from ringlinear import kernels  # noqa: E402
from ringlinear.config import RingLinearConfig  # noqa: E402
from ringlinear.engine import Engine, EngineConfig, SamplingParams, random_model  # noqa: E402
from ringlinear.engine.pools import LinearStatePool, PagedKVCache  # noqa: E402
from ringlinear.tools.params import PRESETS  # noqa: E402
from ringlinear.engine import runner as runner_module  # noqa: E402
from ringlinear.engine import sampling as sampling_module  # noqa: E402
from ringlinear.kernels.sampling import sample_rows as kernel_sample_rows  # noqa: E402
from pod_sampling import torch_sample_rows  # noqa: E402  (bench/: the torch sampler the kernel replaced)

BF16_PEAK = 788e12  # FLOP/s, 8192^3 bf16 GEMM on random data, this H200 (KINDS.md); datasheet dense: ~990e12
COPY_BW = 4.3e12  # B/s, device-to-device copy counting read + write (KINDS.md)
BLOCK = 16
RESERVE = 6 << 30  # activations and allocator slack kept out of the decode memory plan


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def twin_config(cfg: dict) -> dict:
    return dict(cfg, layer_group_size=1)  # every (l+1) % 1 == 0: all layers softmax


# ---------------------------------------------------------------------------------------------------------- rooflines
def prefill_flops(cfg: RingLinearConfig, T: int, last_layer_rows_only: bool = False) -> tuple[float, float]:
    """(active-parameter FLOPs, total FLOPs incl. attention) of a T-token prefill from position 0. last_layer_rows_only:
    the FLOPs the runner executes when the last (softmax) layer runs past its QKV projection for the prompt's last row
    only (ModelRunner.last_layer_logit_rows_only): its attention, output projection, norm and MLP for one row."""
    H, d, D = cfg.num_attention_heads, cfg.d_head, cfg.hidden_size
    param = 2.0 * cfg.parameter_counts()["active_non_embedding"] * T + 2.0 * D * cfg.vocab_size
    attn = len(cfg.softmax_layers) * 2.0 * T * T * H * d + len(cfg.linear_layers) * T * H * (4.0 * d * d + 2.0 * 64 * d)
    last = cfg.num_hidden_layers - 1
    if last_layer_rows_only and cfg.is_softmax_layer(last):
        c = cfg.layer_parameter_counts(last)
        param -= 2.0 * (H * d * D + D + c["ffn_active"]) * (T - 1)  # output projection, post-attention norm, MLP
        attn -= 2.0 * T * T * H * d - 4.0 * T * H * d  # one query over T keys
    return param, param + attn


def decode_bytes(cfg: RingLinearConfig, B: int, ctx: int, itemsize: int = 2) -> float:
    D, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    pc = cfg.parameter_counts()
    moe_layers = sum(1 for l in range(cfg.num_hidden_layers) if not cfg.is_dense_layer(l))
    routed_active = moe_layers * k * 3 * D * I
    dense_w = pc["active_non_embedding"] - routed_active  # attention, dense FFN, shared experts, routers, norms
    touched = moe_layers * E * (1 - (1 - k / E) ** B) * 3 * D * I
    weights = (dense_w + touched + cfg.vocab_size * D) * itemsize
    kv = B * ctx * PagedKVCache.bytes_per_block(cfg, 1, torch.bfloat16 if itemsize == 2 else torch.float32)
    states = 2 * B * LinearStatePool.bytes_per_slot(cfg)
    return weights + kv + states


# ---------------------------------------------------------------------------------------------------------- prefill
def time_to_first_token(eng: Engine, T: int, rng: random.Random, dev) -> float:
    """Seconds for one prompt of T random tokens, alone, through Engine.step() to its first token."""
    eng.add_request([rng.randrange(16, eng.cfg.vocab_size) for _ in range(T)],
                    SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    sync(dev)
    t0 = time.perf_counter()
    while eng.has_work():
        eng.step()
    sync(dev)
    return time.perf_counter() - t0


# The MoE's expert paths for prompt steps (--moe-wide): as served (the wide path above 640 tokens: to 4 096 since the
# sixteenth session, to 131 072 since the seventeenth) and as before it (stream path to 768 tokens, grouped above).
# Each sets kernels.moe's crossovers.
MOE_PROMPT_PATHS = {"wide": {"STREAM_MAX_TOKENS": kernels.moe.STREAM_MAX_TOKENS,
                             "WIDE_MAX_TOKENS": kernels.moe.WIDE_MAX_TOKENS},
                    "no-wide": {"STREAM_MAX_TOKENS": 768, "WIDE_MAX_TOKENS": 0}}


def set_moe_paths(name: str) -> None:
    for k, val in MOE_PROMPT_PATHS[name].items():
        setattr(kernels.moe, k, val)


def prompt_engine(model, T_max: int, step_tokens: int | None = None) -> Engine:
    """One request at a time, room for a T_max prompt, every prompt in one step (or in eager steps of step_tokens)."""
    cfg = model.config
    block_b = PagedKVCache.bytes_per_block(cfg, BLOCK, model.dtype)
    budget = LinearStatePool.bytes_per_slot(cfg) + (-(-(T_max + 8) // BLOCK) + 1) * block_b
    return Engine(model, EngineConfig(max_batch=1, max_context=T_max + 8, memory_budget=budget, prefix_cache_bytes=0,
                                      max_step_tokens=step_tokens or T_max, block_size=BLOCK), eos_ids=set())


def bench_prefill_graphed_moe_ab(model, contexts, dev, reps, rounds=2) -> list[dict]:
    """Prompt steps as the served pod runs those of <= max_step_tokens rows (the pieces between attention calls
    replayed from graphs, `capture_step_graphs`), with the MoE paths of MOE_PROMPT_PATHS in turn: each round captures
    the graphs again under each variant's crossovers (a graph keeps the path chosen at capture). Best of reps x rounds."""
    T_max = max(contexts)
    eng = prompt_engine(model, T_max)
    rng = random.Random(0)
    times = {(v, T): [] for v in MOE_PROMPT_PATHS for T in contexts}
    try:
        for _ in range(rounds):
            for v in MOE_PROMPT_PATHS:
                set_moe_paths(v)
                eng.runner.drop_step_graphs()
                captured = eng.runner.capture_step_graphs(T_max)
                time_to_first_token(eng, min(contexts), rng, dev)
                for T in contexts:
                    times[(v, T)] += [time_to_first_token(eng, T, rng, dev) for _ in range(reps)]
    finally:
        set_moe_paths("wide")
        eng.runner.drop_step_graphs()
    rows = []
    for T in contexts:
        w, n = min(times[("wide", T)]), min(times[("no-wide", T)])
        rows.append({"context": T, "graphed_pieces": captured, "wide_s": w, "no_wide_s": n, "ratio": w / n})
        print(f"prefill graphed T={T:6d}  MoE wide {w * 1e3:7.2f} ms  no-wide {n * 1e3:7.2f} ms  wide / no-wide "
              f"{w / n:.3f}  ({captured} piece graphs)", flush=True)
    del eng
    return rows


# --v-in-place / --last-layer: the (v in place, q and k raw into the prefill, MoE add + norm in the combine, the last layer
# on the logit rows only) modes prompts take turns with
SERVED = (True, True, True, True)
PROLOGUE_AB = {"ab": (SERVED, (False, False, True, True)), "qk-ab": (SERVED, (True, False, True, True)),
               "moe-ab": (SERVED, (True, True, False, True)), "last-ab": (SERVED, (True, True, True, False))}


def _prologue_label(mode) -> str:
    v_in_place, qk_raw, moe_add_norm, last_rows = mode
    return (("qk in prefill, " if qk_raw and v_in_place else "") + ("v in place" if v_in_place else "v copied")
            + ("" if moe_add_norm else ", MoE add + norm apart") + ("" if last_rows else ", last layer on every row"))


def set_runner_modes(runner, mode) -> None:
    runner.v_in_place, runner.qk_prologue_in_prefill, runner.moe_add_norm, runner.last_layer_logit_rows_only = mode


def bench_prefill(model, contexts, dev, reps, deadline, moe_paths=("wide",), v_modes=(SERVED,),
                  step_tokens: int | None = None) -> list[dict]:
    """Best of reps per context. A/B variants take turns: MoE paths (moe_paths) and the runner's switches (v_modes:
    (v read in place from the projection or copied by the prologue, q and k handed raw to the prefill kernel or
    through the prologue, the residual add + norm in the MoE's combine or apart, the last layer past its projection
    on the prompt's last row or on every row): ModelRunner.v_in_place, qk_prologue_in_prefill, moe_add_norm,
    last_layer_logit_rows_only). FLOPs count what each variant executes (prefill_flops) in one step; step_tokens: the
    prompt in eager steps of that many tokens (as the pod's prompt-only steps, --max-prefill-step-tokens)."""
    cfg = model.config
    rows = []
    eng = prompt_engine(model, max(contexts), step_tokens)
    rng = random.Random(0)
    time_to_first_token(eng, min(contexts), rng, dev)  # warm-up: extension, cuBLAS/cuDNN plans, allocator
    variants = [(m, f) for m in moe_paths for f in v_modes]
    label = lambda v: " ".join(([f"MoE {v[0]}"] if len(moe_paths) > 1 else [])  # noqa: E731
                               + ([_prologue_label(v[1])] if len(v_modes) > 1 else []))
    for T in contexts:
        if time.monotonic() > deadline:
            print(f"prefill  T={T}: skipped (time budget)", flush=True)
            break
        times: dict[tuple, list[float]] = {v: [] for v in variants}
        try:
            # the first run at a new length also pays allocator growth; A/B variants take turns
            for _ in range(reps):
                for v in variants:
                    set_moe_paths(v[0])
                    set_runner_modes(eng.runner, v[1])
                    times[v].append(time_to_first_token(eng, T, rng, dev))
        except torch.OutOfMemoryError:
            print(f"prefill  T={T}: out of memory", flush=True)
            break
        finally:
            set_moe_paths("wide")
            set_runner_modes(eng.runner, SERVED)
        for v in variants:
            p_flops, flops = prefill_flops(cfg, T, v[1][3])
            roof = T / (flops / BF16_PEAK)
            dt = min(times[v])
            rows.append({"context": T, "seconds": dt, "tok_s": T / dt, "roofline_tok_s": roof,
                         "active_param_tflops": p_flops / dt / 1e12, "pct_peak_active": 100 * p_flops / dt / BF16_PEAK,
                         "pct_peak_total": 100 * flops / dt / BF16_PEAK, **({"moe_paths": v[0]} if len(moe_paths) > 1 else {}),
                         **({"v": _prologue_label(v[1])} if len(v_modes) > 1 else {})})
            print(f"prefill  T={T:6d}  {dt * 1e3:9.1f} ms  {T / dt:9.0f} tok/s  roofline {roof:9.0f} tok/s  "
                  f"active-param {100 * p_flops / dt / BF16_PEAK:5.1f}% of bf16 peak  (all FLOPs {100 * flops / dt / BF16_PEAK:5.1f}%)"
                  + (f"  [{label(v)}]" if len(variants) > 1 else ""), flush=True)
        if len(moe_paths) > 1:
            print(f"prefill  T={T:6d}  wide / no-wide time: {min(times[('wide', v_modes[0])]) / min(times[('no-wide', v_modes[0])]):.3f}", flush=True)
        if len(v_modes) > 1:
            a, b = ((moe_paths[0], m) for m in v_modes[:2])
            print(f"prefill  T={T:6d}  {_prologue_label(a[1])} / {_prologue_label(b[1])} time: "
                  f"{min(times[a]) / min(times[b]):.3f}", flush=True)
    del eng
    return rows


# ---------------------------------------------------------------------------------------------------------- decode
def max_batch_fitting(cfg, ctx: int, dtype, dev) -> int:
    if dev.type != "cuda":
        return 1 << 30
    free = torch.cuda.mem_get_info(dev)[0] - RESERVE
    per_req = LinearStatePool.bytes_per_slot(cfg) + -(-ctx // BLOCK) * PagedKVCache.bytes_per_block(cfg, BLOCK, dtype)
    return max(0, free // per_req)  # the paged decode attention reads KV in place: no per-step dense copy


def install_contexts(eng: Engine, B: int, ctx: int, steps: int, rng, temperature: float = 0.0, top_p: float = 1.0) -> list:
    """Admit B requests of ctx tokens (context = prompt + max_tokens) and mark their prompts computed; they sample with
    temperature / top_p (greedy by default), request i with seed i."""
    vocab = eng.cfg.vocab_size
    prompt = [17] * (ctx - steps - 4)  # never computed: only its length matters
    # one output token is installed, the two warm steps and `steps` timed steps add steps + 2: with max_tokens =
    # steps + 4 no request finishes inside the timed steps (finishing frees each request's KV blocks on the host:
    # ~0.25 ms for a 64k context, which would land on one timed step for the whole batch at once)
    reqs = [eng.add_request(prompt, SamplingParams(max_tokens=steps + 4, temperature=temperature, top_p=top_p, seed=i,
                                                   ignore_eos=True))
            for i in range(B)]
    eng._admit()
    if any(r.slot is None for r in reqs):
        raise RuntimeError(f"engine could not admit {B} requests of {ctx} tokens")
    for r in reqs:
        r.computed = len(r.prompt)
        r.output.append(rng.randrange(16, vocab))
    return reqs


def print_mode_ratios(rows: list[dict], key: str, labels: dict) -> None:
    """For an A/B run over rows[key] (labels: value -> name, the served mode first): each mode's mean step time per
    batch and its ratio to the served mode's (e.g. synchronous / overlapped, torch sampler / sampling kernel)."""
    for B in sorted({r["batch"] for r in rows}):
        ms = {v: [r["step_ms"] for r in rows if r["batch"] == B and r[key] == v] for v in labels}
        ms = {v: sum(t) / len(t) for v, t in ms.items() if t}
        if len(ms) == len(labels) > 1:
            ref = ms[next(iter(labels))]
            print(f"decode   ctx={rows[0]['context']:6d} B={B:3d}  step time " + " | ".join(
                f"{labels[v]} {m:.3f} ms ({m / ref:.3f}x)" for v, m in ms.items()), flush=True)


# --decode-launch: (kernels launched as programmatic dependents, steps of <= this many rows through linear_small,
# the stream MoE path as before the fifteenth session: cuBLAS router logits, its kernels launched plainly)
LAUNCHES = {"dependent": (True, runner_module.LINEAR_SMALL_ROWS, False),
            "dependent-moe-plain": (True, runner_module.LINEAR_SMALL_ROWS, True),
            "dependent-one-row": (True, 1, True), "dependent-cublas": (True, 0, True), "plain-cublas": (False, 0, True)}

# fused_moe looks these up at each call: as served, and the stream path as before (cuBLAS logits, plain launches)
_MOE = {name: getattr(kernels.moe, name) for name in ("route", "_experts_stream", "skinny_ok")}
_MOE_PLAIN = {"route": kernels.plain_launches()(_MOE["route"]),
              "_experts_stream": kernels.plain_launches()(_MOE["_experts_stream"]),
              "skinny_ok": lambda *a: False}


def set_launch(eng, name: str) -> None:
    """Switch the kernels' launches, the GEMV rows and the stream MoE path to LAUNCHES[name]; the decode graphs go
    when anything changed."""
    dep, rows, moe_plain = LAUNCHES[name]
    if (kernels.programmatic_launch(), runner_module.LINEAR_SMALL_ROWS, kernels.moe.route is not _MOE["route"]) == \
            (dep, rows, moe_plain):
        return
    kernels.set_programmatic_launch(dep)  # a no-op without the extension
    runner_module.LINEAR_SMALL_ROWS = rows
    for fn_name, fn in (_MOE_PLAIN if moe_plain else _MOE).items():
        setattr(kernels.moe, fn_name, fn)
    if eng.runner.graphs is not None:
        eng.runner.graphs.reset()  # captured again by the warm steps, with the new launches


def bench_decode(model, contexts, batches, steps, dev, deadline, graphs: bool | None = None,
                 overlap: tuple[bool, ...] = (True,), sampling: tuple[float, float] = (0.0, 1.0),
                 prefix_bytes: int = 0, samplers: tuple[str, ...] = ("kernel",),
                 launches: tuple[str, ...] = ("dependent",), moe_add_norm: tuple[bool, ...] = (True,)) -> list[dict]:
    """Decode rows per context and batch; with several `overlap` modes (or `samplers`, or `launches`, or
    `moe_add_norm` switches), each batch runs once per mode, in turn (A/B in one process: the engine's overlapped vs
    synchronous steps, its sampling kernel vs the torch sampler it replaced, the LAUNCHES variants, or the residual
    add + norm in the MoE's combine vs its own kernel - the decode graphs are captured again at each switch)."""
    cfg = model.config
    rows = []
    rng = random.Random(1)
    for ctx in contexts:
        fit = max_batch_fitting(cfg, ctx, model.dtype, dev)
        # every listed batch that fits, plus the largest that fits (the "largest batch" comparison)
        bs = sorted({b for b in batches if b <= fit} | ({min(fit, max(batches))} if fit >= 1 else set()))
        if not bs:
            print(f"decode   ctx={ctx}: no batch fits", flush=True)
            continue
        bmax = max(bs)
        block_b = PagedKVCache.bytes_per_block(cfg, BLOCK, model.dtype)
        budget = bmax * (LinearStatePool.bytes_per_slot(cfg) + -(-ctx // BLOCK) * block_b) + block_b  # + scratch block
        eng = Engine(model, EngineConfig(max_batch=bmax, max_context=ctx, memory_budget=budget + prefix_bytes,
                                         prefix_cache_bytes=prefix_bytes, reply_snapshots=prefix_bytes > 0,
                                         max_step_tokens=max(64, bmax), max_queue=bmax, block_size=BLOCK,
                                         cuda_graphs=graphs), eos_ids=set())
        with torch.no_grad():  # random contexts: values do not change the work
            for t in list(eng.kv.k.values()) + list(eng.kv.v.values()):
                t.normal_()
            for s in eng.states.states.values():
                s.normal_(0.0, 0.01)
        if len(moe_add_norm) > 1:
            modes = [(overlap[0], samplers[0], launches[0], m) for m in moe_add_norm]
        elif len(launches) > 1:
            modes = [(overlap[0], samplers[0], n, moe_add_norm[0]) for n in launches]
        elif len(samplers) > 1:
            modes = [(ov, smp, launches[0], moe_add_norm[0]) for ov, smp in zip(overlap, samplers)]
        else:
            modes = [(ov, samplers[0], launches[0], moe_add_norm[0]) for ov in overlap]
        for B, (ov, smp, launch, add_norm) in ((B, m) for B in sorted(bs, reverse=True) for m in modes):  # largest first
            eng.overlap = ov
            set_launch(eng, launch)
            if eng.runner.moe_add_norm != add_norm:
                eng.runner.moe_add_norm = add_norm
                if eng.runner.graphs is not None:
                    eng.runner.graphs.reset()  # captured again by the warm steps
            sampling_module.sample_rows = torch_sample_rows if smp == "torch" else kernel_sample_rows
            if time.monotonic() > deadline:
                print(f"decode   ctx={ctx} B={B}: skipped (time budget)", flush=True)
                continue
            reqs = install_contexts(eng, B, ctx, steps, rng, *sampling)
            try:
                for _ in range(2):  # warm at this shape: an overlapped engine samples and resolves in the second
                    eng.step()      # call (the first sampling at a batch size grows the pinned and device pools)
                sync(dev)
                gc0 = [g["collections"] for g in gc.get_stats()]
                t0 = time.perf_counter()
                n0 = eng.generation_tokens_total
                each = []
                for _ in range(steps):
                    t1 = time.perf_counter()
                    eng.step()  # returns once the previous step's tokens (overlapped) or its own reached the host
                    each.append(1e3 * (time.perf_counter() - t1))
                sync(dev)
                dt = time.perf_counter() - t0  # before the aborts below
                gcs = [g["collections"] - c for g, c in zip(gc.get_stats(), gc0)]
            except torch.OutOfMemoryError:
                print(f"decode   ctx={ctx} B={B}: out of memory", flush=True)
                continue
            finally:
                for r in reqs:
                    eng.abort(r.id)
                while eng.has_work():  # an overlapped step still in flight: resolved (its tokens dropped)
                    eng.step()
            toks = eng.generation_tokens_total - n0
            t_roof = decode_bytes(cfg, B, ctx) / COPY_BW
            rows.append({"context": ctx, "batch": B, "overlap": ov, "sampler": smp, "launch": launch, "moe_add_norm": add_norm, "temperature": sampling[0], "top_p": sampling[1], "max_batch_fitting": int(fit), "step_ms": dt / steps * 1e3,
                         "step_ms_each": [round(t, 2) for t in each], "gc_collections_by_generation": gcs,
                         "tok_s": toks / dt, "roofline_tok_s": B / t_roof, "pct_roofline": 100 * t_roof / (dt / steps)})
            print(f"decode   ctx={ctx:6d} B={B:3d}{' sync' if not ov else ''}{' torch sampler' if smp == 'torch' else ''}"
                  f"{'' if launch == 'dependent' else ' ' + launch}{'' if add_norm else ' MoE add+norm apart'}  {dt / steps * 1e3:8.2f} ms/step  {toks / dt:9.1f} tok/s  "
                  f"roofline {B / t_roof:9.1f} tok/s ({100 * t_roof / (dt / steps):4.1f}%)  [fits {fit}]  "
                  f"steps {min(each):.1f}..{max(each):.1f} ms, gc runs {gcs}", flush=True)
        here = [r for r in rows if r["context"] == ctx]
        if len(set(overlap)) > 1:
            print_mode_ratios(here, "overlap", {True: "overlapped", False: "synchronous"})
        if len(set(samplers)) > 1:
            print_mode_ratios(here, "sampler", {"kernel": "sampling kernel", "torch": "torch sampler"})
        if len(set(launches)) > 1:
            print_mode_ratios(here, "launch", {n: n for n in LAUNCHES})
        if len(set(moe_add_norm)) > 1:
            print_mode_ratios(here, "moe_add_norm", {True: "MoE add + norm in the combine", False: "apart"})
        sampling_module.sample_rows = kernel_sample_rows
        set_launch(eng, "dependent")
        eng.runner.moe_add_norm = True
        del eng
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------- main
def ratios(ours: list[dict], twin: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """ours / twin per keys (and per variant label "v" where both sides ran the same variants: --last-layer ab)."""
    if twin and all("v" in r for r in ours + twin):
        keys += ("v",)
    t = {tuple(r[k] for k in keys): r for r in twin}
    return [dict({k: r[k] for k in keys}, ours_tok_s=r["tok_s"], twin_tok_s=t[key]["tok_s"],
                 ratio=r["tok_s"] / t[key]["tok_s"], roofline_ratio=r["roofline_tok_s"] / t[key]["roofline_tok_s"],
                 **{k: r[k] for k in ("moe_paths", "v") if k in r})
            for r in ours if (key := tuple(r[k] for k in keys)) in t]


def best_at(rows: list[dict], ctx: int) -> dict | None:
    at = [r for r in rows if r["context"] == ctx]
    return max(at, key=lambda r: r["batch"]) if at else None


def plot(res: dict, path: Path) -> None:
    """PNG: prefill tokens/s vs context (ours, twin) and decode tokens/s vs batch per context (matplotlib, guarded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("ours", "o-"), ("twin", "s--")):
        rows = res.get(name, {}).get("prefill", [])
        if rows:
            a.plot([r["context"] for r in rows], [r["tok_s"] for r in rows], style,
                   label=f"{name} ({'16 lightning + 4 softmax' if name == 'ours' else '20 softmax'} layers)")
    contexts = sorted({r["context"] for n in ("ours", "twin") for r in res.get(n, {}).get("decode", [])})
    for name, style in (("ours", "o-"), ("twin", "s--")):
        for i, ctx in enumerate(contexts):  # one colour per context, one line style per model
            rows = sorted((r for r in res.get(name, {}).get("decode", []) if r["context"] == ctx), key=lambda r: r["batch"])
            b.plot([r["batch"] for r in rows], [r["tok_s"] for r in rows], style, color=f"C{i}",
                   label=f"{name}, {ctx // 1024}k context")
    a.set(xscale="log", xlabel="prompt tokens (one request)", ylabel="prefill tokens/s", title="Prefill, time to first token")
    b.set(xscale="log", yscale="log", xlabel="batch (requests)", ylabel="decode tokens/s", title="Decode (CUDA graphs)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Ring-mini-linear-2.0 vs softmax twin, random bf16 weights, {res.get('device', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--preset / --tiny / --device, shared by the pod benches."""
    p.add_argument("--preset", default="ring-mini-linear-2.0", choices=sorted(PRESETS))
    p.add_argument("--tiny", action="store_true", help="the tiny test config (test/fixtures/tiny) instead: smoke runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def base_config(a: argparse.Namespace) -> dict:
    return json.loads((ROOT / "test/fixtures/tiny/config.json").read_text()) if a.tiny else PRESETS[a.preset]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--prefill-contexts", default="4096,16384,32768,65536,131072")
    p.add_argument("--decode-contexts", default="65536,16384,4096")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--decode-steps", type=int, default=5)
    p.add_argument("--prefill-reps", type=int, default=2)
    p.add_argument("--prefill-step-tokens", type=int,
                   help="prompts in eager steps of this many tokens (the pod's prompt-only steps: 16384 on CUDA) "
                        "instead of one step; %% of peak then still counts one step's FLOPs")
    p.add_argument("--models", default="ours,twin")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds per model; later measurements are skipped")
    p.add_argument("--no-graphs", action="store_true", help="eager decode steps (default: CUDA graphs on CUDA)")
    p.add_argument("--moe-decode-latency", choices=("on", "off"), default="on",
                   help="off: the decode MoE kernels without their one-token layouts (A/B runs)")
    p.add_argument("--moe-decode-max-tokens", type=int, default=None,
                   help="steps of up to this many tokens take the MoE's decode path, more the stream path "
                        "(default: kernels.moe.DECODE_MAX_TOKENS; A/B runs)")
    p.add_argument("--moe-wide", choices=("on", "ab", "ab-eager"), default="on",
                   help="prompt steps: the MoE's wide path above 640 tokens (as served) or, ab, that and the paths "
                        "before it (stream to 768 tokens, grouped above) in turn at every length, eager and then with "
                        "the step's pieces graphed as the pod serves steps of <= max_step_tokens (use --models ours); "
                        "ab-eager: the eager rounds only (prompts too long for a ladder of step graphs)")
    p.add_argument("--overlap", choices=("on", "off", "ab"), default="on",
                   help="the engine's overlapped steps (default, as served), synchronous steps, or both in turn (A/B)")
    p.add_argument("--sampler", choices=("kernel", "torch", "ab"), default="kernel",
                   help="the engine's token sampler: the sampling kernel (as served), the torch sampler it replaced "
                        "(bench/pod_sampling.py), or both in turn (A/B, overlapped steps)")
    p.add_argument("--decode-launch", choices=tuple(LAUNCHES) + ("ab",), default="dependent",
                   help="dependent: the kernels launched as programmatic dependents and steps of <= LINEAR_SMALL_ROWS "
                        "rows through kernels.linear_small (as served); dependent-moe-plain: the stream MoE path (3-768 "
                        "tokens) as before the fifteenth session (cuBLAS router logits, plain launches); "
                        "dependent-one-row: that, and only one-row steps through linear_small (the fourteenth "
                        "session's tree); dependent-cublas: cuBLAS projections; plain-cublas: nothing dependent; ab: "
                        "all in turn, twice (the decode graphs are captured again at each switch)"),
    p.add_argument("--moe-add-norm", choices=("on", "ab"), default="on",
                   help="decode steps: the residual add + next norm in the MoE's combine kernel (as served) or, ab, "
                        "that and the add + norm as its own kernel in turn, twice (ModelRunner.moe_add_norm)")
    p.add_argument("--temperature", type=float, default=0.0, help="decode requests' temperature (default greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="decode requests' top_p")
    p.add_argument("--prefix-cache-gib", type=float, default=0.0,
                   help="decode engines' prefix cache, with reply snapshots (default off): what those cost the steps")
    p.add_argument("--v-in-place", choices=("on", "ab", "qk-ab", "moe-ab"), default="on",
                   help="ab: ours' prompts also with the lightning layers' v copied by the prologue instead of read in "
                        "place from the projection; qk-ab: also with q and k through the prologue instead of raw into "
                        "the prefill kernel (both v in place); moe-ab: also with the residual add + norm after the MoE "
                        "as its own kernel (ModelRunner.moe_add_norm); taking turns (rows labelled v)")
    p.add_argument("--last-layer", choices=("rows", "ab"), default="rows",
                   help="rows: the last layer past its projection on the logit rows only (as served); ab: that and "
                        "every row in turn, both models (ModelRunner.last_layer_logit_rows_only; rows labelled v)")
    p.add_argument("--json")
    p.add_argument("--plot", help="write a PNG of prefill and decode throughput here (needs matplotlib)")
    p.add_argument("--plot-from", nargs="+", metavar="JSON",
                   help="measure nothing: plot --plot from these --json outputs (e.g. a prefill run and a decode run)")
    a = p.parse_args(argv)
    if a.plot_from:
        merged: dict = {}
        for f in a.plot_from:
            r = json.loads(Path(f).read_text())
            merged.setdefault("device", r.get("device", ""))
            for name in ("ours", "twin"):
                for kind in ("prefill", "decode"):
                    merged.setdefault(name, {}).setdefault(kind, []).extend(r.get(name, {}).get(kind, []))
        plot(merged, Path(a.plot or "pod_e2e.png"))
        return
    dev = torch.device(a.device)
    if a.moe_decode_latency == "off":
        kernels.moe.DECODE_SMALL_PASSES = False
    if a.moe_decode_max_tokens is not None:
        kernels.moe.DECODE_MAX_TOKENS = a.moe_decode_max_tokens
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = base_config(a)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "dtype": str(dtype), "model": "tiny" if a.tiny else a.preset,
           "bf16_peak_flops": BF16_PEAK, "copy_bw": COPY_BW, "argv": sys.argv[1:]}

    def dump():
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))

    for name in a.models.split(","):
        cfg = RingLinearConfig.from_dict(base if name == "ours" else twin_config(base))
        t0 = time.perf_counter()
        model = random_model(cfg, dev, dtype)
        sync(dev)
        print(f"== {name}: {len(cfg.linear_layers)} lightning + {len(cfg.softmax_layers)} softmax layers, ready in "
              f"{time.perf_counter() - t0:.1f} s" + (f", {torch.cuda.memory_allocated(dev) / 2**30:.1f} GiB" if dev.type == "cuda" else ""),
              flush=True)
        deadline = time.monotonic() + a.time_budget
        pc = ints(a.prefill_contexts)
        res[name] = {"prefill": bench_prefill(model, pc, dev, a.prefill_reps, deadline,
                                              ("wide", "no-wide") if a.moe_wide.startswith("ab") else ("wide",),
                                              PROLOGUE_AB["last-ab"] if a.last_layer == "ab" else
                                              PROLOGUE_AB.get(a.v_in_place, (SERVED,))
                                              if cfg.linear_layers or a.v_in_place == "moe-ab" else (SERVED,),
                                              a.prefill_step_tokens)
                                if pc else []}
        if a.moe_wide == "ab" and pc and dev.type == "cuda":
            res[name]["prefill_graphed_moe_ab"] = bench_prefill_graphed_moe_ab(model, pc, dev, a.prefill_reps)
        dump()
        res[name]["decode"] = bench_decode(model, ints(a.decode_contexts), ints(a.batches), a.decode_steps, dev, deadline,
                                           False if a.no_graphs else None,
                                           {"on": (True,), "off": (False,), "ab": (True, False, True, False)}[a.overlap]
                                           if a.sampler != "ab" else (True,) * 4,
                                           (a.temperature, a.top_p), int(a.prefix_cache_gib * 2**30),
                                           ("kernel", "torch") * 2 if a.sampler == "ab" else (a.sampler,),
                                           tuple(LAUNCHES) * 2 if a.decode_launch == "ab" else (a.decode_launch,),
                                           (True, False) * 2 if a.moe_add_norm == "ab" else (True,))
        if dev.type == "cuda":
            res[name]["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            torch.cuda.reset_peak_memory_stats(dev)
        dump()
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    if "ours" in res and "twin" in res:
        res["prefill_ratio"] = ratios(res["ours"]["prefill"], res["twin"]["prefill"], ("context",))
        res["decode_ratio"] = ratios(res["ours"]["decode"], res["twin"]["decode"], ("context", "batch"))
        print("\nprefill  ours / twin (tok/s), roofline ratio")
        for r in res["prefill_ratio"]:
            print(f"  T={r['context']:6d}  {r['ours_tok_s']:9.0f} / {r['twin_tok_s']:9.0f} = {r['ratio']:5.2f}x   (roofline {r['roofline_ratio']:5.2f}x)"
                  + "".join(f"  [{k} {r[k]}]" for k in ("moe_paths", "v") if k in r))
        print("decode   ours / twin (tok/s) at the same batch, roofline ratio")
        for r in res["decode_ratio"]:
            print(f"  ctx={r['context']:6d} B={r['batch']:3d}  {r['ours_tok_s']:9.1f} / {r['twin_tok_s']:9.1f} = {r['ratio']:5.2f}x   (roofline {r['roofline_ratio']:5.2f}x)")
        largest = []
        for ctx in ints(a.decode_contexts):
            o, t = best_at(res["ours"]["decode"], ctx), best_at(res["twin"]["decode"], ctx)
            if o and t:
                largest.append({"context": ctx, "ours_batch": o["batch"], "ours_tok_s": o["tok_s"], "twin_batch": t["batch"],
                                "twin_tok_s": t["tok_s"], "ratio": o["tok_s"] / t["tok_s"],
                                "roofline_ratio": o["roofline_tok_s"] / t["roofline_tok_s"]})
                print(f"decode at each side's largest batch, ctx={ctx}: ours B={o['batch']} {o['tok_s']:.1f} tok/s vs twin "
                      f"B={t['batch']} {t['tok_s']:.1f} tok/s = {largest[-1]['ratio']:.2f}x (roofline {largest[-1]['roofline_ratio']:.2f}x)")
        res["decode_largest_batch"] = largest
        dump()
    if a.plot:
        plot(res, Path(a.plot))


if __name__ == "__main__":
    main()
