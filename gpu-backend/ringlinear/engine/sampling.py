"""Sampling parameters, the per-request sampler and the batched sampling of a step.

Every request owns a CPU `torch.Generator` seeded from its `seed` (or a random one), and draws exactly one number per
sampled token, so a request's tokens depend only on its seed and its logits, never on what else is in the batch.

A step's rows are sampled together where the logits are (`sample_batch`): temperature, top-k and top-p as batched
tensor operations, then each row's token by inverse transform of its one uniform number through the kept
probabilities' cumulative sum (float64). Only the chosen ids (and requested logprobs) come back to the host. Sampling
row by row on the host cost ~0.25 ms a row at a 4k vocabulary and far more at Ring's 157k (a device-to-host copy of
each row, a full sort for top-p): at 256 streams that was several times the GPU's decode step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # a temperature below it samples greedily
NUCLEUS_CANDIDATES = 1024  # top-p sorts only this many most likely tokens when they hold top_p of the mass


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
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed & (2**63 - 1))

    def uniform(self) -> float:
        return float(torch.rand((), dtype=torch.float64, generator=self.generator))

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprobs | None]:
        """logits: [V] fp32 (any device). Returns (token id, logprobs or None)."""
        return sample_batch(logits[None], [self])[0]


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[tuple[int, TokenLogprobs | None]]:
    """logits [n, V] (any device), row i sampled with samplers[i]: [(token id, logprobs or None)] for each row."""
    n = logits.shape[0]
    if n != len(samplers):
        raise ValueError(f"sample_batch: {n} rows of logits for {len(samplers)} samplers")
    if n == 0:
        return []
    params = [s.params for s in samplers]
    dev = logits.device
    greedy = [i for i, p in enumerate(params) if p.greedy]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    u = torch.tensor([samplers[i].uniform() for i in drawn], dtype=torch.float64)  # one number per sampled token
    tokens = _merge(n, dev, (greedy, lambda: _rows(logits, greedy).argmax(-1)),
                    (drawn, lambda: _draw(_rows(logits, drawn), [params[i] for i in drawn], u.to(dev))))
    want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
    lp_host = None
    if want_lp:
        lp = torch.log_softmax(_rows(logits, want_lp).float(), -1)
        chosen = lp.gather(1, _rows(tokens, want_lp)[:, None])[:, 0]
        k = max(params[i].logprobs for i in want_lp)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        lp_host = (chosen.tolist(), top_v.tolist(), top_i.tolist())
    out: list[tuple[int, TokenLogprobs | None]] = [(t, None) for t in tokens.tolist()]
    if lp_host is not None:
        for r, i in enumerate(want_lp):
            m = params[i].logprobs
            out[i] = (out[i][0], TokenLogprobs(lp_host[0][r], list(zip(lp_host[2][r][:m], lp_host[1][r][:m]))))
    return out


def _draw(x: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """x [m, V] logits, u [m] float64 in [0, 1) -> [m] token ids: temperature, then top-k (the k largest kept,
    ties at the k-th included), then top-p (the smallest prefix of the probabilities sorted in descending order whose
    mass reaches top_p; equal probabilities in the order topk or a stable sort gives them), then the first kept token
    whose cumulative probability exceeds u x the kept mass."""
    m, V = x.shape
    dev = x.device
    x = x.float() / torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)[:, None]
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    if any(ks):
        k = torch.tensor(ks, device=dev)
        kth = x.topk(max(ks), dim=-1).values.gather(1, (k.clamp_min(1) - 1)[:, None])
        x = x.masked_fill((k[:, None] > 0) & (x < kth), float("-inf"))
    probs = torch.softmax(x, -1)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    plain = [i for i, p in enumerate(params) if p.top_p >= 1.0]

    def from_nucleus():
        pn = _rows(probs, nucleus)
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=probs.dtype, device=dev)
        # The nucleus usually lies among the most likely few hundred tokens: sort only the top NUCLEUS_CANDIDATES
        # when they hold top_p of every row's mass (a full sort of Ring's 157k-token rows is the slow part), else all.
        sorted_p, order = pn.topk(min(NUCLEUS_CANDIDATES, V), dim=-1)
        if V > NUCLEUS_CANDIDATES and not bool((sorted_p.sum(-1) >= top_p).all()):
            sorted_p, order = pn.sort(dim=-1, descending=True, stable=True)
        kept = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < top_p[:, None])
        return order.gather(1, _inverse_cdf(kept, _rows(u, nucleus))[:, None])[:, 0]

    return _merge(m, dev, (nucleus, from_nucleus), (plain, lambda: _inverse_cdf(_rows(probs, plain), _rows(u, plain))))


def _merge(n: int, dev, *parts) -> torch.Tensor:
    """[n] int64 from (rows, compute) parts that split 0..n-1: each compute() gives the values of its rows; a part
    with no rows is not computed, and a part with all of them is returned as it is."""
    parts = [(rows, compute) for rows, compute in parts if rows]
    if len(parts) == 1:
        return parts[0][1]()
    out = torch.empty(n, dtype=torch.int64, device=dev)
    for rows, compute in parts:
        out[torch.tensor(rows, device=dev)] = compute()
    return out


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows `rows` (ascending): t itself when they are all of them, else a gathered copy."""
    if len(rows) == t.shape[0]:
        return t
    return t[torch.tensor(rows, device=t.device)]


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [m, V] >= 0 (each row some > 0), u [m] in [0, 1) -> per row the index i with cdf[i-1] <= u x total <
    cdf[i], cdf the float64 cumulative sum: always an index of positive weight."""
    cdf = weights.double().cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # clamped: a row of non-finite logits (NaN weights) still yields a token id inside the vocabulary
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=weights.shape[1] - 1)
