"""Sampling parameters and the per-request sampler.

Every request owns a CPU `torch.Generator` seeded from its `seed` (or a random one), and draws exactly one number per
generated token, so a request's tokens depend only on its seed and its logits, never on what else is in the batch.
Greedy rows (temperature 0) never leave the device except as the chosen id.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


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
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class TokenLogprobs:
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, best first


class Sampler:
    """Draws one token per row; rows are requests of one step."""

    def __init__(self, params: SamplingParams):
        self.params = params
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed & (2**63 - 1))

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprobs | None]:
        """logits: [V] fp32 (any device). Returns (token id, logprobs or None)."""
        p = self.params
        if p.greedy:
            token = int(logits.argmax())
        else:
            row = logits.float().cpu() / p.temperature
            if p.top_k and p.top_k > 0 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, -1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True, stable=True)
                keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # smallest prefix whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if p.logprobs is None:
            return token, None
        lp = torch.log_softmax(logits.float(), -1)
        top = []
        if p.logprobs:
            vals, ids = lp.topk(p.logprobs)
            top = list(zip(ids.tolist(), vals.tolist()))
        return token, TokenLogprobs(float(lp[token]), top)
