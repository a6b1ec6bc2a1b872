"""Deterministic tiny checkpoints in the real HF format, for tests and golden vectors.

    python -m ringlinear make-tiny --variant tiny --out test/fixtures/tiny

Weights come from numpy's PCG64 seeded per tensor name, so the bytes are the same on every machine;
the tokenizer is a byte-level BPE trained by the `tokenizers` library on a fixed, generated corpus.
"""

from __future__ import annotations

import argparse
import random
import zlib
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import expected_tensors, save_checkpoint
from ..config import RingLinearConfig
from ..tokenizer_files import BOS_ID, EOT_ID, train_bpe, write_tokenizer_files

# The tiny config of the architecture doc §9; it keeps every structural feature.
TINY = {
    "architectures": ["BailingMoeLinearV2ForCausalLM"],
    "model_type": "bailing_moe_linear",
    "vocab_size": 4096,
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "layer_group_size": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "partial_rotary_factor": 0.5,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "use_qk_norm": True,
    "linear_silu": False,
    "group_norm_size": 2,
    "intermediate_size": 512,
    "first_k_dense_replace": 1,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "num_shared_experts": 1,
    "moe_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64,
    "n_group": 4,
    "topk_group": 2,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "router_dtype": "fp32",
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_bias": False,
    "use_qkv_bias": False,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
}

VARIANTS: dict[str, dict] = {
    "tiny": {},
    "tiny-h6": {"num_attention_heads": 6, "head_dim": 32, "num_key_value_heads": 2, "group_norm_size": 3},
    "tiny-tail": {"num_hidden_layers": 6},
    "tiny-hfslope": {"ringlinear_slope_rule": "hf"},
}

_SEED_TEXT = """The ring turns and the river runs. A small model reads the prompt, keeps a fixed state for each head,
and answers one token at a time. Linear attention forgets old tokens at a constant rate per head, while every fourth
layer still looks at the whole context with softmax attention. Experts are chosen by a router: eight of many, or two
of sixteen in this tiny test model. Hello, world! How are you today? I am fine, thank you. 0123456789 + - * / = ( ) .
"""


def config_for(variant: str) -> RingLinearConfig:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    d = dict(TINY, **VARIANTS[variant])
    d["eos_token_id"] = EOT_ID
    d["pad_token_id"] = EOT_ID
    d["bos_token_id"] = BOS_ID
    return RingLinearConfig.from_dict(d)


def _corpus() -> list[str]:
    """A fixed corpus: the seed text plus pseudo-words from a seeded generator (stable across Python versions)."""
    rng = random.Random(20261128)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "th", "st", "tr", "w"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
    codas = ["", "", "n", "r", "s", "t", "nd", "ng", "st", "l"]
    lines = _SEED_TEXT.split("\n") * 20
    for _ in range(6000):
        words = []
        for _ in range(rng.randrange(4, 14)):
            w = "".join(onsets[rng.randrange(len(onsets))] + vowels[rng.randrange(len(vowels))] + codas[rng.randrange(len(codas))]
                        for _ in range(rng.randrange(1, 4)))
            words.append(w.capitalize() if rng.random() < 0.1 else w)
        lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
    return lines


def _tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic weights by role: norms near 1, projections ~ 0.3/sqrt(fan_in), peaked logits, small router bias.

    The 0.3 gain keeps the random model well-conditioned: at 1/sqrt(fan_in) it is chaotic, and rounding the weights
    to int8 already changes its greedy ids, so no int8 engine could be held to the golden continuation.
    """
    rng = np.random.Generator(np.random.PCG64(seed ^ zlib.crc32(name.encode())))
    if name.endswith("expert_bias"):
        return torch.from_numpy(0.1 * rng.standard_normal(shape, dtype=np.float32))  # stays fp32
    if "norm" in name:
        a = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif name == "model.word_embeddings.weight":
        a = rng.standard_normal(shape, dtype=np.float32)
    elif name == "lm_head.weight":
        a = (4.0 / np.sqrt(shape[1])) * rng.standard_normal(shape, dtype=np.float32)
    else:
        a = (0.3 / np.sqrt(shape[1])) * rng.standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(a).to(torch.bfloat16)


def random_tensors(cfg: RingLinearConfig, seed: int) -> dict[str, torch.Tensor]:
    return {name: _tensor(name, shape, seed) for name, shape in expected_tensors(cfg).items()}


def make_tiny(variant: str, out: str | Path, seed: int = 0, shards: int = 1, dtype: str = "bfloat16") -> Path:
    cfg = config_for(variant)
    out = Path(out)
    tensors = random_tensors(cfg, seed)
    if dtype != "bfloat16":
        td = {"float32": torch.float32, "float16": torch.float16}[dtype]
        tensors = {n: (t if n.endswith("expert_bias") else t.to(td)) for n, t in tensors.items()}
    save_checkpoint(out, cfg, tensors, shards=shards)
    write_tokenizer_files(train_bpe(_corpus(), cfg.vocab_size), out, cfg.max_position_embeddings)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ringlinear make-tiny", description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="tiny", choices=sorted(VARIANTS))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1, help="write N shards + model.safetensors.index.json")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = p.parse_args(argv)
    print(make_tiny(a.variant, a.out, a.seed, a.shards, a.dtype))
