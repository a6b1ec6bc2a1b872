#!/usr/bin/env python3
"""A step's token sampling at Ring's vocabulary: the batched sampler (`engine.sampling.sample_batch`, on the device
where the logits are) vs the row-by-row host sampler it replaced (kept below as `legacy_sample`), side by side.

    python3 bench/pod_sampling.py [--device cuda] [--rows 1,32,256] [--json FILE]

Each case: n rows of fp32 logits [n, V] on the device, every row sampled with its own seeded sampler; wall time of the
whole step's sampling (ids back on the host), median of --reps; beside it the batched sampler as it was before the
twelfth session (`previous_step`: torch-generator draws, top-p always through the candidates and a host check,
whole-row inverse transform). Cases: temperature 1.0 (the OpenAI default), and
temperature 0.7 with top_p 0.9 (a full sort per row on the legacy path), and greedy (one batched argmax, both sides).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))

from ringlinear.engine import sampling  # noqa: E402
from ringlinear.engine.sampling import Sampler, SamplingParams, sample_batch  # noqa: E402
from ringlinear.tools.params import PRESETS  # noqa: E402


def legacy_sample(sampler: Sampler, logits: torch.Tensor) -> int:
    """The pod's sampler until the eighth session: one row at a time on the host (logprobs part left out)."""
    p = sampler.params
    if p.greedy:
        return int(logits.argmax())
    row = logits.float().cpu() / p.temperature
    if p.top_k and p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, -1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True, stable=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    if not hasattr(sampler, "generator"):  # the old sampler's CPU generator (the pod's sampler now draws with Python's)
        sampler.generator = torch.Generator().manual_seed(sampler.seed & (2**63 - 1))
    return int(torch.multinomial(probs, 1, generator=sampler.generator))


class TorchDrawSampler(Sampler):
    """The eleventh session's sampler, for the same-run comparison: each number drawn from a torch CPU generator."""

    def __init__(self, params):
        super().__init__(params)
        self.generator = torch.Generator().manual_seed(self.seed & (2**63 - 1))

    def uniform(self) -> float:
        return float(torch.rand((), dtype=torch.float64, generator=self.generator))


def previous_step(logits, samplers):
    """sample_batch as before the twelfth session, but for its softmax (now exp(x - max) without the normalisation):
    torch-generator draws (the samplers), top-p rows always through the candidates and the host's check (never sorted
    whole), and the inverse transform over whole rows (no two-level blocks)."""
    keep = sampling.NUCLEUS_SORT_ROWS, sampling.CDF_TWO_LEVEL_ROWS
    sampling.NUCLEUS_SORT_ROWS, sampling.CDF_TWO_LEVEL_ROWS = 0, 1 << 30
    try:
        return sample_batch(logits, samplers)
    finally:
        sampling.NUCLEUS_SORT_ROWS, sampling.CDF_TWO_LEVEL_ROWS = keep


def legacy_step(logits, samplers):
    greedy = logits.argmax(-1).tolist()  # the old engine: one batched argmax, then row by row for sampled rows
    return [greedy[i] if s.params.greedy else legacy_sample(s, logits[i]) for i, s in enumerate(samplers)]


def timed(fn, dev, reps):
    fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="1,32,256")
    ap.add_argument("--vocab", type=int, default=PRESETS["ring-mini-linear-2.0"]["vocab_size"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    cases = {"temperature 1.0": dict(temperature=1.0), "temperature 0.7, top_p 0.9": dict(temperature=0.7, top_p=0.9),
             "greedy": dict(temperature=0.0)}
    out = []
    for n in [int(x) for x in a.rows.split(",") if x]:
        logits = torch.randn(n, a.vocab, device=dev) * 4
        for name, params in cases.items():
            samplers = [Sampler(SamplingParams(seed=i, **params)) for i in range(n)]
            ours = timed(lambda: sample_batch(logits, samplers), dev, a.reps)
            old = [TorchDrawSampler(SamplingParams(seed=i, **params)) for i in range(n)]
            previous = timed(lambda: previous_step(logits, old), dev, a.reps)
            legacy = timed(lambda: legacy_step(logits, samplers), dev, max(1, a.reps // 2))
            out.append({"rows": n, "case": name, "batched_ms": ours, "previous_batched_ms": previous, "legacy_ms": legacy})
            print(f"n={n:4d} {name:26s} batched {ours:8.2f} ms   before (torch draws, candidates) {previous:8.2f} ms "
                  f"({previous / ours:4.2f}x)   row by row (legacy) {legacy:9.2f} ms ({legacy / ours:6.1f}x)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
                                            "vocab": a.vocab, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
