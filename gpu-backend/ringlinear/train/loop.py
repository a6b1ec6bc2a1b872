"""The training loop: bf16 autocast, AdamW, linear warmup + cosine decay, expert-bias balancing, JSONL log.

With a time budget the run first times `calibrate_steps` steps, then fixes the total step count so the
cosine schedule ends when the budget does (the count is logged, so a later run can repeat it with --steps).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import save_checkpoint
from ..config import RingLinearConfig
from .data import WindowSampler, heldout_windows
from .trainable import checkpoint_tensors, init_model, update_expert_bias, use_batched_moe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@dataclass
class TrainSettings:
    seq_len: int = 512
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    steps: int | None = None  # fixed step count, or
    time_budget_s: float | None = None  # a wall-clock budget (steps fixed after calibration)
    calibrate_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bias_update_rate: float = 1e-3
    seed: int = 0
    amp: bool = True  # bf16 autocast
    log_every: int = 10
    eval_every: int = 200
    eval_windows: int = 16
    save_dtype: str = "bfloat16"
    shards: int = 1  # >1 writes model-0000i-of-0000n.safetensors + index (e.g. to keep files under a size limit)


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    """Linear warmup to s.lr, then cosine down to s.lr * min_lr_ratio at `total`."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    frac = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(model, s: TrainSettings, device: torch.device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=device.type == "cuda")


def _loss(model, batch: torch.Tensor, amp: bool) -> torch.Tensor:
    with torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16, enabled=amp):
        logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def _eval_loss(model, windows: torch.Tensor, amp: bool, device: torch.device) -> float:
    model.eval()
    losses = [float(_loss(model, windows[i:i + 8].to(device), amp)) for i in range(0, len(windows), 8)]
    model.train()
    return sum(losses) / len(losses)


def train(cfg: RingLinearConfig, train_tokens: np.ndarray, heldout_tokens: np.ndarray | None, out: str | Path,
          s: TrainSettings, device: str | torch.device = "cpu", tokenizer_dir: str | Path | None = None,
          log_path: str | Path | None = None, progress: bool = True, clock=time.perf_counter):
    """Train from scratch; write the checkpoint (+ tokenizer files) to `out`. Returns (model, summary dict).

    `clock` (seconds) drives the time budget; tests pass a fake one so the schedule does not depend on machine speed.
    """
    if (s.steps is None) == (s.time_budget_s is None):
        raise ValueError("give exactly one of steps and time_budget_s")
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else out / "train_log.jsonl"
    model = use_batched_moe(init_model(cfg, s.seed)).to(device).train()
    opt = _optimizer(model, s, device)
    sampler = WindowSampler(train_tokens, s.seq_len, s.batch_size, device, s.seed)
    eval_w = heldout_windows(heldout_tokens, s.seq_len + 1, s.eval_windows) if heldout_tokens is not None else None
    total = s.steps if s.steps is not None else 10**9
    t0 = clock()
    calib_t0 = None
    log = log_path.open("w", encoding="utf-8")
    log.write(json.dumps({"event": "start", "settings": asdict(s), "device": str(device),
                          "params": sum(p.numel() for p in model.parameters()), "config": cfg.to_dict()}) + "\n")
    bar = tqdm(total=s.steps, disable=not progress, mininterval=5.0, unit="step")
    loss_sum = torch.zeros((), device=device)
    loss_n, step, imbalance, first_loss, last_loss = 0, 0, None, None, None
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, s)
        loss = _loss(model, sampler.next(), s.amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        ratios = update_expert_bias(model, s.bias_update_rate)
        imbalance = ratios if ratios is not None else imbalance
        loss_sum += loss.detach()
        loss_n += 1
        step += 1
        bar.update(1)
        if s.time_budget_s is not None and step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            calib_t0 = clock()
        if s.time_budget_s is not None and step == s.calibrate_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (clock() - calib_t0) / (s.calibrate_steps - 5)
            left = s.time_budget_s - (clock() - t0)
            total = max(step + 1, step + int(left / per_step))
            bar.total = total
            log.write(json.dumps({"event": "calibrated", "step": step, "sec_per_step": per_step, "total_steps": total}) + "\n")
        # past 1.1x the budget (calibration misjudged the speed): log, evaluate and stop here
        stopping = s.time_budget_s is not None and clock() - t0 > 1.1 * s.time_budget_s
        if step % s.log_every == 0 or step == total or stopping:
            mean = float(loss_sum) / loss_n  # one host sync per log interval
            first_loss = mean if first_loss is None else first_loss
            last_loss = mean
            elapsed = clock() - t0
            rec = {"step": step, "loss": mean, "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
                   "tokens": step * s.batch_size * s.seq_len, "elapsed_s": round(elapsed, 2),
                   "tok_per_s": round(step * s.batch_size * s.seq_len / elapsed),
                   "expert_load_max_over_mean": [] if imbalance is None else [round(x, 3) for x in imbalance.tolist()]}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{mean:.3f}", lr=f"{rec['lr']:.2e}")
            loss_sum.zero_()
            loss_n = 0
        if eval_w is not None and (step % s.eval_every == 0 or step == total or stopping):
            ev = _eval_loss(model, eval_w, s.amp, device)
            log.write(json.dumps({"step": step, "heldout_loss": ev, "heldout_ppl": math.exp(ev)}) + "\n")
            log.flush()
        if stopping:
            log.write(json.dumps({"event": "stopped_on_time", "step": step}) + "\n")
            break
    bar.close()
    elapsed = clock() - t0
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[s.save_dtype]
    save_checkpoint(out, cfg, checkpoint_tensors(model, dtype), shards=s.shards)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    summary = {"event": "done", "steps": step, "tokens": step * s.batch_size * s.seq_len, "elapsed_s": round(elapsed, 2),
               "first_logged_loss": first_loss, "last_logged_loss": last_loss}
    log.write(json.dumps(summary) + "\n")
    log.close()
    return model, summary
