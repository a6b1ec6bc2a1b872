"""Sampling parameters, the per-request sampler and the batched sampling of a step.

Every request owns a `random.Random` seeded from its `seed` (or a random one), and draws exactly one number per
sampled token, so a request's tokens depend only on its seed and its logits, never on what else is in the batch.

A step's rows are sampled together where the logits are (`sample_batch`), in one kernel launch
(`kernels.sample_rows`; its twin `kernels.sampling_reference` defines the draw): the weights are the probabilities
in 2^-40 fixed point, top-k and top-p are thresholds on them (ties kept together), and the token is the inverse
transform of the request's one uniform number in token order. Nothing is sorted and the host never waits: the ids
stay on the device for the next step (overlapped steps), and `SampledBatch.results()` waits for their copy. Sampling
row by row on the host cost ~0.25 ms a row at a 4k vocabulary and far more at Ring's 157k (a device-to-host copy of
each row, a full sort for top-p): at 256 streams that was several times the GPU's decode step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels.sampling import sample_rows
from ..ops.transfer import to_device

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # a temperature below it samples greedily


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
        self.greedy = params.greedy
        # its fixed columns of a step's parameter table (`kernels.sample_rows`): temperature (0 = greedy), top_k, top_p
        self.columns = (0.0 if self.greedy else params.temperature, max(params.top_k, 0), params.top_p)

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

    Every row, greedy or drawn, is one column of a host-side parameter table (`kernels.sample_rows`: one copy to the
    device, one launch, no sort and no host sync however many rows use top-p); the requested logprobs are a
    log_softmax of their rows."""
    n = logits.shape[0]
    if n != len(samplers):
        raise ValueError(f"sample_batch: {n} rows of logits for {len(samplers)} samplers")
    params = [s.params for s in samplers]
    if n == 0:
        return SampledBatch(torch.empty(0, dtype=torch.int64, device=logits.device), params, [], None)
    spec = np.empty((5, n))  # numpy: ~3x faster to fill than torch.tensor of nested lists (256 rows: ~0.1 ms)
    spec[0] = np.arange(n)
    spec[1:4] = np.array([s.columns for s in samplers]).T
    spec[4] = [0.0 if s.greedy else s.uniform() for s in samplers]  # one number a sampled token
    spec = torch.from_numpy(spec)
    tokens = sample_rows(logits.float(), spec)
    want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
    lp = None
    if want_lp:
        logp = torch.log_softmax(_rows(logits, want_lp).float(), -1)
        chosen = logp.gather(1, _rows(tokens, want_lp)[:, None])[:, 0]
        k = max(params[i].logprobs for i in want_lp)
        top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        lp = (chosen, top_v, top_i)
    return SampledBatch(tokens, params, want_lp, lp)


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows `rows` (ascending): t itself when they are all of them, else a gathered copy."""
    if len(rows) == t.shape[0]:
        return t
    return t[to_device(torch.tensor(rows, dtype=torch.int64), t.device)]
