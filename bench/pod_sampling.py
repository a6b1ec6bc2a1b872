#!/usr/bin/env python3
"""A step's token sampling at Ring's vocabulary: the sampling kernel (`engine.sampling.sample_batch` ->
`kernels.sample_rows`, one launch) vs the batched torch sampler it replaced (kept below as `torch_step`: ~10-15
launches, a sort or top-k for top-p rows and, past 32 top-p rows, a host check), side by side in one run.

    python3 bench/pod_sampling.py [--device cuda] [--rows 1,8,64,256] [--scales 4,1] [--json FILE]

Each case: n rows of fp32 logits [n, V] (randn x scale: 4 is peaked, thousands of tokens in a 0.9 nucleus; 1 is the
flat rows of the random-weight engine benches), every row sampled with its own seeded sampler. Two timings:
`wall` = one step's sampling until the ids are on the host, median (what a synchronous engine waits), and `GPU time`
= the kernels' and copies' own durations per step from the torch profiler (what an overlapped engine's step carries;
the torch sampler's host check for > 32 top-p rows makes the host wait anyway). Cases: temperature 1.0 (the OpenAI default), temperature 0.7
with top_p 0.9, top_k 50 with top_p 0.95, and greedy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))

from ringlinear.engine.sampling import Sampler, SamplingParams, sample_batch  # noqa: E402
from ringlinear.ops.transfer import to_device  # noqa: E402
from ringlinear.tools.params import PRESETS  # noqa: E402

# ---- the twelfth session's torch sampler (engine/sampling.py at ae73b62), tokens only, for the comparison
CDF_BLOCK, CDF_TWO_LEVEL_ROWS, NUCLEUS_CANDIDATES, NUCLEUS_SORT_ROWS = 512, 8, 1024, 32


def torch_sample_rows(logits: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """torch_step behind `kernels.sample_rows`' interface (spec [5, m] on the host), so an engine can run it:
    `pod_e2e.py --sampler torch` puts it in place of the kernel."""
    rows, temperature, top_k, top_p, u = spec.tolist()
    x = logits[_on(logits.device, [int(r) for r in rows], torch.int64)]
    params = [SamplingParams(temperature=t, top_k=int(k), top_p=p) for t, k, p in zip(temperature, top_k, top_p)]
    greedy = [i for i, t in enumerate(temperature) if t <= 0]
    drawn = [i for i, t in enumerate(temperature) if t > 0]
    ud = _on(logits.device, [u[i] for i in drawn], torch.float64)
    return _merge(len(params), logits.device, (greedy, lambda: _rows(x, greedy).argmax(-1)),
                  (drawn, lambda: _draw(_rows(x, drawn), [params[i] for i in drawn], ud)))


def torch_step(logits: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor:
    params = [s.params for s in samplers]
    n, dev = logits.shape[0], logits.device
    greedy = [i for i, p in enumerate(params) if p.greedy]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    u = _on(dev, [samplers[i].uniform() for i in drawn], torch.float64)
    return _merge(n, dev, (greedy, lambda: _rows(logits, greedy).argmax(-1)),
                  (drawn, lambda: _draw(_rows(logits, drawn), [params[i] for i in drawn], u)))


def _on(dev, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A small host list as a tensor on dev, queued without a host sync (`to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), dev)


def _draw(x: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """x [m, V] logits, u [m] float64 in [0, 1) -> [m] token ids: temperature, then top-k (the k largest kept,
    ties at the k-th included), then top-p (the smallest prefix of the probabilities sorted in descending order whose
    mass reaches top_p; equal probabilities in the order topk or a stable sort gives them), then the first kept token
    whose cumulative probability exceeds u x the kept mass."""
    m, V = x.shape
    dev = x.device
    x = x.float() / _on(dev, [p.temperature for p in params], torch.float32)[:, None]
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    if any(ks):
        k = _on(dev, ks, torch.int64)
        kth = x.topk(max(ks), dim=-1).values.gather(1, (k.clamp_min(1) - 1)[:, None])
        x = x.masked_fill((k[:, None] > 0) & (x < kth), float("-inf"))
    # softmax's numerators, exp(x - max): the inverse transform needs no normalised row (torch's softmax runs a row
    # in one CTA: 40 us for one row of Ring's 157k tokens, against a few us for these whole-GPU passes)
    weights = x.sub_(x.amax(-1, keepdim=True)).exp_()
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    plain = [i for i, p in enumerate(params) if p.top_p >= 1.0]

    def from_nucleus():
        wn = _rows(weights, nucleus)
        pn = wn / wn.sum(-1, keepdim=True)
        top_p = _on(dev, [params[i].top_p for i in nucleus], pn.dtype)
        # The nucleus usually lies among the most likely few hundred tokens: sort only the top NUCLEUS_CANDIDATES
        # when they hold top_p of every row's mass (a full sort of Ring's 157k-token rows is the slow part), else all.
        # A few rows are sorted whole: exact without asking the host, whose check would idle the GPU between
        # overlapped steps (NUCLEUS_SORT_ROWS).
        if V <= NUCLEUS_CANDIDATES or len(nucleus) <= NUCLEUS_SORT_ROWS:
            sorted_p, order = pn.sort(dim=-1, descending=True, stable=True)
        else:
            sorted_p, order = pn.topk(NUCLEUS_CANDIDATES, dim=-1)
            if not bool((sorted_p.sum(-1) >= top_p).all()):  # the sampler's one host sync
                sorted_p, order = pn.sort(dim=-1, descending=True, stable=True)
        kept = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < top_p[:, None])
        return order.gather(1, _inverse_cdf(kept, _rows(u, nucleus))[:, None])[:, 0]

    return _merge(m, dev, (nucleus, from_nucleus), (plain, lambda: _inverse_cdf(_rows(weights, plain), _rows(u, plain))))


def _merge(n: int, dev, *parts) -> torch.Tensor:
    """[n] int64 from (rows, compute) parts that split 0..n-1: each compute() gives the values of its rows; a part
    with no rows is not computed, and a part with all of them is returned as it is."""
    parts = [(rows, compute) for rows, compute in parts if rows]
    if len(parts) == 1:
        return parts[0][1]()
    out = torch.empty(n, dtype=torch.int64, device=dev)
    for rows, compute in parts:
        out[_on(dev, rows, torch.int64)] = compute()
    return out


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows `rows` (ascending): t itself when they are all of them, else a gathered copy."""
    if len(rows) == t.shape[0]:
        return t
    return t[_on(t.device, rows, torch.int64)]


def _target(u: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """u x total per row [m, 1], kept below total (a u this close to 1 must still land inside the row)."""
    return torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [m, V] >= 0 (each row some > 0), u [m] in [0, 1) -> per row the index i with cdf[i-1] <= u x total <
    cdf[i], cdf the float64 cumulative sum: always an index of positive weight.

    From CDF_TWO_LEVEL_ROWS rows wider than two CDF_BLOCKs it goes in two levels: the blocks' float64 sums and their
    cumulative sum find the block, then the cumulative sum inside that block alone finds the token. (On the H200 a
    float64 copy and scan of 256 whole rows of 157k took 0.56 ms; for a few rows the two levels' ~15 more launches
    cost the host more than the scan costs the GPU.)"""
    m, V = weights.shape
    if V <= 2 * CDF_BLOCK or m < CDF_TWO_LEVEL_ROWS:
        cdf = weights.double().cumsum(-1)
        total = cdf[:, -1:]
        target = _target(u, total)
        # clamped: a row of non-finite logits (NaN weights) still yields a token id inside the vocabulary
        return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=V - 1)
    nb = -(-V // CDF_BLOCK)
    blocks = (weights if V % CDF_BLOCK == 0 else F.pad(weights, (0, nb * CDF_BLOCK - V))).view(m, nb, CDF_BLOCK)
    block_cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [m, nb]
    total = block_cdf[:, -1:]
    target = _target(u, total)
    b = torch.searchsorted(block_cdf, target, right=True).clamp_(max=nb - 1)  # [m, 1]: first block past the target
    base = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp_min(0)), 0.0)
    inner = blocks.gather(1, b[:, :, None].expand(m, 1, CDF_BLOCK))[:, 0]  # [m, CDF_BLOCK]
    i = torch.searchsorted(inner.double().cumsum(-1) + base, target, right=True)
    # The block's sum and its scan round differently: a target in that sliver takes the block's last positive weight.
    last = (inner > 0).cumsum(-1).argmax(-1, keepdim=True)  # the first index where the count of positives peaks
    return (b * CDF_BLOCK + torch.minimum(i, last))[:, 0].clamp_(max=V - 1)


# ---- the bench


def timed_wall(fn, dev, reps):
    fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def device_ms(fn, dev, reps):
    """GPU time of one call (ms): the kernels' and copies' own durations from the torch profiler, mean of reps calls
    (what the sampling adds to a step on the GPU, whatever the host does meanwhile)."""
    if dev.type != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / reps / 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default="1,8,64,256")
    ap.add_argument("--scales", default="4,1")
    ap.add_argument("--vocab", type=int, default=PRESETS["ring-mini-linear-2.0"]["vocab_size"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    cases = {"temperature 1.0": dict(temperature=1.0), "temperature 0.7, top_p 0.9": dict(temperature=0.7, top_p=0.9),
             "top_k 50, top_p 0.95": dict(temperature=1.0, top_k=50, top_p=0.95), "greedy": dict(temperature=0.0)}
    out = []
    for scale in [float(x) for x in a.scales.split(",") if x]:
        for n in [int(x) for x in a.rows.split(",") if x]:
            logits = torch.randn(n, a.vocab, device=dev) * scale
            for name, params in cases.items():
                samplers = [Sampler(SamplingParams(seed=i, **params)) for i in range(n)]
                ours = timed_wall(lambda: sample_batch(logits, samplers), dev, a.reps)
                before = timed_wall(lambda: torch_step(logits, samplers).tolist(), dev, a.reps)
                ours_q = device_ms(lambda: sample_batch(logits, samplers), dev, a.reps)
                before_q = device_ms(lambda: torch_step(logits, samplers), dev, a.reps)
                out.append({"scale": scale, "rows": n, "case": name, "kernel_wall_ms": ours, "torch_wall_ms": before,
                            "kernel_gpu_ms": ours_q, "torch_gpu_ms": before_q})
                print(f"scale {scale:3.1f} n={n:4d} {name:22s} wall: kernel {ours:6.3f} ms, torch {before:6.3f} ms "
                      f"({before / ours:5.2f}x)   GPU time: kernel {ours_q:6.3f} ms, torch {before_q:6.3f} ms "
                      f"({before_q / ours_q:5.2f}x)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
                                            "vocab": a.vocab, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
