"""`python -m ringlinear serve`: load a checkpoint (or make random weights for a preset) and serve it.

    python -m ringlinear serve --model test/fixtures/tiny --port 8000
    python -m ringlinear serve --random-weights ring-mini-linear-2.0 --tokenizer test/fixtures/tiny --device cuda \\
        --memory-budget 40GiB --max-batch 64
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from pathlib import Path

import torch

from .. import kernels as cuda_kernels
from ..checkpoint import CheckpointError, load_model
from ..config import ConfigError, RingLinearConfig
from ..engine import AsyncEngine, Engine, EngineConfig, EngineConfigError, random_model
from ..tokenizer import ChatTokenizer
from .app import PodSettings, create_app

log = logging.getLogger("ringlinear.server")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


AUTO_BUDGET_FRACTION = 0.6  # the rest of the free memory is left to activations (prefill chunks, MoE, logits)
# Step sizes by device (docs/benchmarks.md, "Long prompts at the served step sizes"): on the GPU a step re-reads the
# weights it touches (every expert once a step holds a few hundred tokens), so small steps make long prompts slow; a
# step that carries decodes stays small enough to keep the streams' time between tokens low.
STEP_TOKENS = {"cuda": 2048, "cpu": 512}
PREFILL_STEP_TOKENS = {"cuda": 16384, "cpu": None}  # None: = the step budget


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringlinear serve", description="OpenAI-compatible Ring-linear pod server")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (config.json, safetensors, tokenizer)")
    src.add_argument("--random-weights", metavar="PRESET",
                     help="random weights for a preset of ringlinear/tools/params.py (or a config.json path), made on the device")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--served-model-name", help="model id in the API (default: the directory or preset name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-batch", type=int, default=8, help="requests running at once (linear-state slots)")
    p.add_argument("--max-context", type=int, help="prompt + generated tokens per request (default: the model's)")
    p.add_argument("--memory-budget", type=parse_size,
                   help="bytes for state slots + paged KV + prefix snapshots, weights excluded (e.g. 40GiB); "
                        f"default: {AUTO_BUDGET_FRACTION} x the device memory free after loading the weights on cuda, 1GiB on cpu")
    p.add_argument("--prefix-cache-budget", type=parse_size, help="part of the budget for prefix snapshots (default 1/4; 0 = off)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which new ones get 503")
    p.add_argument("--max-step-tokens", type=int,
                   help="tokens of an engine step that carries decodes (decodes + prompt chunks): bounds the time "
                        f"between a stream's tokens while prompts prefill (default {STEP_TOKENS['cuda']} on cuda, "
                        f"{STEP_TOKENS['cpu']} on cpu)")
    p.add_argument("--max-prefill-step-tokens", type=int,
                   help="tokens of a step with no decode in it (prompt chunks only): large chunks make long prompts "
                        f"faster (default {PREFILL_STEP_TOKENS['cuda']} on cuda, --max-step-tokens on cpu)")
    p.add_argument("--no-warm-up", action="store_true",
                   help="skip the start-up step of --max-prefill-step-tokens (default on cuda: run it, so plans are "
                        "built and a step that does not fit in memory fails at start-up)")
    p.add_argument("--block-size", type=int, default=16, help="paged KV block size (tokens)")
    p.add_argument("--prefix-block", type=int, default=64, help="prefix snapshot granularity (tokens)")
    p.add_argument("--default-max-tokens", type=int, help="chat max_tokens when the request gives none (default: rest of context)")
    p.add_argument("--api-key", action="append", default=[], help="accepted bearer key for direct use (repeatable)")
    p.add_argument("--shared-secret", default=os.environ.get("POD_SHARED_SECRET"),
                   help="the edge worker's bearer secret (default: env POD_SHARED_SECRET)")
    p.add_argument("--max-body-bytes", type=parse_size, default=parse_size("16MiB"))
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run decode steps eagerly (default on CUDA: replay CUDA graphs captured at start-up)")
    p.add_argument("--reply-snapshots", action=argparse.BooleanOptionalAction, default=True,
                   help="also snapshot replies at prefix-block boundaries, so a chat's next turn resumes after the reply "
                        "(default on; --no-reply-snapshots keeps prompt snapshots only: docs/pod.md)")
    p.add_argument("--no-overlap", action="store_true",
                   help="synchronous steps: launch a step only after the previous one's tokens reached the host "
                        "(default on CUDA: overlapped)")
    p.add_argument("--no-dependent-launch", action="store_true",
                   help="launch the decode kernels plainly (default on CUDA: as programmatic dependents, each one's "
                        "weight loads starting before the kernel ahead of it ends; docs/kernels.md)")
    p.add_argument("--log-level", default="info")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return dev


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what the kernel can hand out without swapping), or None off Linux."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_weights_fit(cfg: RingLinearConfig, dtype: torch.dtype, device: torch.device) -> None:
    """SystemExit naming both sizes when the model's weights alone exceed the GPU's free memory (Ring-flash-linear-2.0
    in bf16 is ~208 GB against an H200's ~139 GiB), or on the CPU the host's available memory, before any tensor is
    read: otherwise the load fails after reading for minutes, with an out-of-memory traceback or a killed process."""
    need = cfg.parameter_counts()["total"] * dtype.itemsize
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        where = f"{device} has {free / 2**30:.1f} GiB free (of {total / 2**30:.1f} GiB)"
    else:
        free = host_available_bytes()
        if free is None:
            return
        where = f"this host has {free / 2**30:.1f} GiB of memory available"
    if need > free:
        raise SystemExit(f"error: the model's weights need {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} "
                         f"but {where}: this pod runs a model on one device; use one with more memory, a smaller "
                         "model, or (CPU) --dtype bfloat16")


def build_pod(args: argparse.Namespace):
    """(app, AsyncEngine) from parsed options; raises SystemExit with a clear message on bad options."""
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok_dir = args.tokenizer or args.model
    try:
        if args.model:
            check_weights_fit(RingLinearConfig.from_file(args.model), dtype, device)
            model = load_model(args.model, dtype=dtype, device=device)
            name = args.served_model_name or Path(args.model).resolve().name
        else:
            from ..tools.params import PRESETS
            src = args.random_weights
            cfg = RingLinearConfig.from_dict(PRESETS[src]) if src in PRESETS else RingLinearConfig.from_file(src)
            check_weights_fit(cfg, dtype, device)
            model = random_model(cfg, device, dtype, args.seed)
            name = args.served_model_name or (src if src in PRESETS else Path(src).resolve().name)
        tokenizer = ChatTokenizer(tok_dir) if tok_dir else None
    except (CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    budget = args.memory_budget
    if budget is None:
        budget = int(torch.cuda.mem_get_info(device)[0] * AUTO_BUDGET_FRACTION) if device.type == "cuda" else 1 << 30
    kind = "cuda" if device.type == "cuda" else "cpu"
    step = args.max_step_tokens or STEP_TOKENS[kind]
    prefill_step = args.max_prefill_step_tokens or max(step, PREFILL_STEP_TOKENS[kind] or step)
    ec = EngineConfig(max_batch=args.max_batch, max_context=args.max_context, memory_budget=budget,
                      prefix_cache_bytes=args.prefix_cache_budget, max_queue=args.max_queue, block_size=args.block_size,
                      prefix_block=args.prefix_block, max_step_tokens=step, max_prefill_step_tokens=prefill_step,
                      cuda_graphs=False if args.no_cuda_graphs else None, overlap=False if args.no_overlap else None,
                      reply_snapshots=args.reply_snapshots)
    cuda_kernels.set_programmatic_launch(not args.no_dependent_launch)  # before the decode graphs are captured
    try:
        engine = Engine(model, ec, tokenizer)
    except EngineConfigError as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.perf_counter()
    captured = engine.runner.capture_decode_graphs()  # before serving: no capture pauses on the first requests
    if captured:
        log.info("captured %d decode CUDA graphs in %.1f s", captured, time.perf_counter() - t0)
    aengine = AsyncEngine(engine)
    if device.type == "cuda" and not args.no_warm_up:
        t0 = time.perf_counter()
        try:  # on the engine's own thread: torch keeps cuDNN plans per thread
            w = aengine.call(engine.warm_up)
        except torch.OutOfMemoryError:
            aengine.stop()
            raise SystemExit(f"error: a step of {prefill_step} prompt tokens does not fit in the device's memory next to "
                             f"the weights and the {budget} B memory budget; lower --max-prefill-step-tokens or "
                             "--memory-budget") from None
        log.info("warm-up: a step of %d prompt tokens, %d chunk attention shapes and %d step piece graphs in %.1f s "
                 "(peak %.1f GiB allocated)", w.tokens, w.attention_shapes, w.step_graphs, time.perf_counter() - t0,
                 torch.cuda.max_memory_allocated(device) / 2**30)
    keys = list(args.api_key) + ([args.shared_secret] if args.shared_secret else [])
    settings = PodSettings(model_name=name, api_keys=keys, max_body_bytes=args.max_body_bytes,
                           default_max_tokens=args.default_max_tokens)
    return create_app(aengine, tokenizer, settings), aengine


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, _ = build_pod(args)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
