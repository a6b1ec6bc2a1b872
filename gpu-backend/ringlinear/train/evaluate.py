"""Held-out perplexity, per-token NLL and sample generation with the reference model (any device, fp32).

Perplexity convention (shared with the other engines): the held-out stream is cut into consecutive windows of
`seq_len` tokens; each window starts from an empty state; every token after the first of a window is predicted
(seq_len - 1 predictions per window); perplexity = exp(mean NLL over all predictions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model import RingLinearForCausalLM


@torch.no_grad()
def token_nll(model: RingLinearForCausalLM, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """NLL (nats) of tokens 1..T-1 of every window given the tokens before it: [N, T-1] float64."""
    out = []
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i:i + batch_size].to(model.device)
        logits, _ = model(w)
        logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
        out.append(-logp.gather(-1, w[:, 1:, None]).squeeze(-1).cpu())
    return torch.cat(out)


def perplexity(model: RingLinearForCausalLM, windows: torch.Tensor, batch_size: int = 8) -> dict:
    nll = token_nll(model, windows, batch_size)
    mean = float(nll.mean())
    return {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "predicted_tokens": int(nll.numel()),
            "mean_nll": mean, "perplexity": math.exp(mean)}


@torch.no_grad()
def generate(model: RingLinearForCausalLM, prompt: list[int], max_new: int, eos_ids: set[int],
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """Greedy (temperature 0) or temperature + nucleus sampling, through the step API (prefill, then decode)."""
    gen = torch.Generator().manual_seed(seed)
    logits, state = model.prefill(torch.tensor(prompt))
    step = logits[0, -1]
    out: list[int] = []
    for _ in range(max_new):
        nxt = _pick(step.float().cpu(), temperature, top_p, gen)
        if nxt in eos_ids:
            break
        out.append(nxt)
        step, state = model.decode(nxt, state)
        step = step[0]
    return out


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, -1)
    sorted_p, idx = probs.sort(descending=True, stable=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(idx[choice])
