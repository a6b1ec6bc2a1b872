"""Engine test helpers (plain functions, importable from the server tests too)."""

from __future__ import annotations

import torch


def make_engine(model, tokenizer=None, eos_ids=frozenset(), **kw):
    from ringlinear.engine import Engine, EngineConfig

    kw.setdefault("memory_budget", 32 << 20)
    kw.setdefault("max_context", 1024)
    return Engine(model, EngineConfig(**kw), tokenizer=tokenizer, eos_ids=set(eos_ids))


def run_all(engine, max_steps: int = 10_000):
    """Step until idle; returns every RequestOutput."""
    outs = []
    for _ in range(max_steps):
        if not engine.has_work():
            return outs
        outs += engine.step()
    raise AssertionError("engine did not finish")


def greedy(n: int, **kw):
    from ringlinear.engine import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def random_prompt(n: int, seed: int, vocab: int = 4096) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(16, vocab, (n,), generator=g).tolist()
