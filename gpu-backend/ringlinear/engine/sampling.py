"""Sampling parameters, the per-request sampler and the batched sampling of a step.

Every request owns a `random.Random` seeded from its `seed` (or a random one), and draws exactly one number per
sampled token, so a request's tokens depend only on its seed and its logits, never on what else is in the batch.

A step's rows are sampled together where the logits are (`sample_batch`): temperature, top-k and top-p as batched
tensor operations, then each row's token by inverse transform of its one uniform number through the kept
probabilities' cumulative sum (float64). Only the chosen ids (and requested logprobs) come back to the host, and
`launch_sampling` only queues that: the ids stay on the device for the next step (overlapped steps), and
`SampledBatch.results()` waits for their copy. Sampling
row by row on the host cost ~0.25 ms a row at a 4k vocabulary and far more at Ring's 157k (a device-to-host copy of
each row, a full sort for top-p): at 256 streams that was several times the GPU's decode step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..ops.transfer import to_device

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # a temperature below it samples greedily
CDF_BLOCK = 512  # the inverse transform's block (two levels: blocks, then tokens inside one)
CDF_TWO_LEVEL_ROWS = 8  # rows from which the two levels pay (docs/benchmarks.md "Small-batch decode")
NUCLEUS_CANDIDATES = 1024  # top-p sorts only this many most likely tokens when they hold top_p of the mass
# Up to this many top-p rows a step sorts whole, so it never waits for the GPU to learn whether the candidates hold
# top_p of the mass (H200, Ring's 157k vocabulary: a stable sort of 1 / 8 / 32 / 64 / 256 rows takes 0.10 / 0.16 /
# 0.44 / 0.75 / 2.9 ms, the candidates' topk 0.13 / 0.15 / 0.13 / 0.20 / 0.64 ms plus a host sync that idles the GPU
# for the host's work between steps)
NUCLEUS_SORT_ROWS = 32


class SamplingError(ValueError):
    """A sampling parameter is out of range; `param` names the OpenAI field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; n >= 0 = chosen token's logprob plus the n most likely

    def validate(self) -> None:
        def need(ok: bool, msg: str, param: str) -> None:
            if not ok:
                raise SamplingError(msg, param)

        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1", "max_tokens")
        need(0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2", "temperature")
        need(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
        need(self.top_k >= 0 or self.top_k == -1, "top_k must be >= 0 (or -1 for off)", "top_k")
        need(len(self.stop) <= 4 and all(isinstance(s, str) and s for s in self.stop),
             "stop must be at most 4 non-empty strings", "stop")
        need(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
        need(self.seed is None or isinstance(self.seed, int), "seed must be an integer", "seed")

    @property
    def greedy(self) -> bool:
        # below GREEDY_TEMPERATURE the scaled logits overflow fp32 (softmax of inf - inf): the limit is the argmax
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclass
class TokenLogprobs:
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, best first


class Sampler:
    """A request's sampling parameters and its random stream (one uniform number per sampled token)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        # Python's Mersenne Twister: 53-bit uniforms at ~0.1 us a draw (a torch CPU generator's draw costs ~5 us of
        # host time, 1.3 ms a step at 256 sampled rows)
        self.rng = random.Random(self.seed)

    def uniform(self) -> float:
        return self.rng.random()

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprobs | None]:
        """logits: [V] fp32 (any device). Returns (token id, logprobs or None)."""
        return sample_batch(logits[None], [self])[0]


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[tuple[int, TokenLogprobs | None]]:
    """logits [n, V] (any device), row i sampled with samplers[i]: [(token id, logprobs or None)] for each row."""
    return launch_sampling(logits, samplers).results()


class SampledBatch:
    """A step's sampled rows, still on the device: `tokens` [n] int64 (what an overlapped engine feeds to the next
    step without waiting for it) and the requested logprobs. Their copies to the host are queued at creation;
    `results()` waits for them (an event on CUDA: only for this batch's work, not for what was queued after it)."""

    def __init__(self, tokens: torch.Tensor, params: list[SamplingParams], want_lp: list[int], lp: tuple | None):
        self.tokens, self.params, self.want_lp = tokens, params, want_lp
        dev = tokens.device
        parts = (tokens,) + (lp or ())
        if dev.type == "cuda":
            self._host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in parts)
            for h, t in zip(self._host, parts):
                h.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(dev))
        else:
            self._host, self._ready = parts, None

    def results(self) -> list[tuple[int, TokenLogprobs | None]]:
        if self._ready is not None:
            self._ready.synchronize()
        tokens, *lp = (t.tolist() for t in self._host)
        out: list[tuple[int, TokenLogprobs | None]] = [(t, None) for t in tokens]
        if lp:
            chosen, top_v, top_i = lp
            for r, i in enumerate(self.want_lp):
                m = self.params[i].logprobs
                out[i] = (out[i][0], TokenLogprobs(chosen[r], list(zip(top_i[r][:m], top_v[r][:m]))))
        return out


def launch_sampling(logits: torch.Tensor, samplers: list[Sampler]) -> SampledBatch:
    """Queue the sampling of logits [n, V] (row i with samplers[i]) on logits' device and return the rows there.

    The host does not wait for the GPU here, with one exception: a step with more than NUCLEUS_SORT_ROWS top_p < 1 rows
    checks on the host whether the NUCLEUS_CANDIDATES most likely tokens hold top_p of their mass (the exact fallback
    is a full sort)."""
    n = logits.shape[0]
    if n != len(samplers):
        raise ValueError(f"sample_batch: {n} rows of logits for {len(samplers)} samplers")
    params = [s.params for s in samplers]
    dev = logits.device
    if n == 0:
        return SampledBatch(torch.empty(0, dtype=torch.int64, device=dev), params, [], None)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    u = _on(dev, [samplers[i].uniform() for i in drawn], torch.float64)  # one number per sampled token
    tokens = _merge(n, dev, (greedy, lambda: _rows(logits, greedy).argmax(-1)),
                    (drawn, lambda: _draw(_rows(logits, drawn), [params[i] for i in drawn], u)))
    want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
    lp = None
    if want_lp:
        logp = torch.log_softmax(_rows(logits, want_lp).float(), -1)
        chosen = logp.gather(1, _rows(tokens, want_lp)[:, None])[:, 0]
        k = max(params[i].logprobs for i in want_lp)
        top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        lp = (chosen, top_v, top_i)
    return SampledBatch(tokens, params, want_lp, lp)


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
