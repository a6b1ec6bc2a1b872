"""`RingLinearConfig`: the fields of a BailingMoeLinearV2 config.json that the model uses, validated.

Everything derived from the config that engines must agree on lives here too: the layer schedule,
the per-head decay of the lightning layers, and parameter counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_TYPE = "bailing_moe_linear"
SLOPE_RULES = ("sglang", "hf")


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes a model we cannot build."""


@dataclass(frozen=True)
class RingLinearConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    head_dim: int | None = None
    layer_group_size: int = 1
    group_norm_size: int = 1
    partial_rotary_factor: float = 1.0
    rotary_dim: int | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    use_qk_norm: bool = True
    linear_silu: bool = False
    first_k_dense_replace: int = 0
    num_shared_experts: int = 0
    moe_shared_expert_intermediate_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    use_bias: bool = False
    use_qkv_bias: bool = False
    num_nextn_predict_layers: int = 0
    rope_scaling: dict | None = None
    torch_dtype: str = "bfloat16"
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    # Our switch for the disputed lightning layer factor (architecture doc §3.1): "sglang" = 1 - l/(L-1), "hf" = 1 - (l-1)/(L-1).
    ringlinear_slope_rule: str = "sglang"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RingLinearConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"unknown model_type {model_type!r} in config.json: expected {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {name: d[name] for name in known if name in d}
        missing = [n for n in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "intermediate_size", "moe_intermediate_size",
                               "num_experts", "num_experts_per_tok") if n not in d]
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        cfg = cls(**kwargs, extra={k: v for k, v in d.items() if k not in known})
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "RingLinearConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config.json not found: {path}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"bad JSON in {path}: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d.update(self.extra)
        d["model_type"] = MODEL_TYPE
        d.setdefault("architectures", ["BailingMoeLinearV2ForCausalLM"])
        return d

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                     "layer_group_size", "group_norm_size", "n_group", "topk_group"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"config field {name} must be a positive integer, got {v!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})")
        need((self.num_attention_heads * self.d_head) % self.group_norm_size == 0,
             f"group_norm_size ({self.group_norm_size}) must divide num_attention_heads*head_dim ({self.num_attention_heads * self.d_head})")
        need(self.num_experts % self.n_group == 0, f"n_group ({self.n_group}) must divide num_experts ({self.num_experts})")
        need(self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        need(self.num_experts_per_tok <= self.topk_group * (self.num_experts // self.n_group),
             "num_experts_per_tok exceeds the experts in the kept groups (topk_group * num_experts / n_group)")
        need(self.score_function == "sigmoid", f"score_function {self.score_function!r} is not supported (only 'sigmoid')")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        need(not self.use_bias and not self.use_qkv_bias, "use_bias / use_qkv_bias are not supported (released models have none)")
        need(not self.tie_word_embeddings, "tie_word_embeddings=true is not supported (the architecture has an untied lm_head)")
        need(self.rope_scaling is None, "rope_scaling is not supported yet (set it to null)")
        need(self.ringlinear_slope_rule in SLOPE_RULES, f"ringlinear_slope_rule must be one of {SLOPE_RULES}, got {self.ringlinear_slope_rule!r}")
        need(0 < self.rot_dim <= self.d_head and self.rot_dim % 2 == 0,
             f"rotary dim {self.rot_dim} must be even and within head_dim {self.d_head}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace out of range")
        need(self.num_nextn_predict_layers == 0, "num_nextn_predict_layers > 0 (MTP) is not supported")

    # ---------------------------------------------------------------- derived shapes

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim else self.hidden_size // self.num_attention_heads

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim if self.rotary_dim else int(self.d_head * self.partial_rotary_factor)

    @property
    def shared_intermediate(self) -> int:
        per = self.moe_shared_expert_intermediate_size or self.moe_intermediate_size
        return self.num_shared_experts * per

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def is_softmax_layer(self, l: int) -> bool:
        """Softmax (GQA) iff (l+1) % G == 0, or l falls in the tail beyond the last whole group (HF rule)."""
        G, L = self.layer_group_size, self.num_hidden_layers
        return (l + 1) % G == 0 or l >= (L // G) * G

    def is_dense_layer(self, l: int) -> bool:
        return l < self.first_k_dense_replace

    @property
    def linear_layers(self) -> list[int]:
        return [l for l in range(self.num_hidden_layers) if not self.is_softmax_layer(l)]

    @property
    def softmax_layers(self) -> list[int]:
        return [l for l in range(self.num_hidden_layers) if self.is_softmax_layer(l)]

    # ---------------------------------------------------------------- lightning decay

    def layer_factor(self, l: int) -> float:
        L = self.num_hidden_layers
        if L <= 1:
            return 1 + 1e-5
        idx = l if self.ringlinear_slope_rule == "sglang" else l - 1
        return 1 - idx / (L - 1) + 1e-5

    def decay_rates(self, l: int) -> list[float]:
        """Per-head decay rate s_{l,h} > 0 of linear layer l; the per-step decay is exp(-s)."""
        f = self.layer_factor(l)
        return [s * f for s in alibi_slopes(self.num_attention_heads)]

    # ---------------------------------------------------------------- parameter counts

    def layer_parameter_counts(self, l: int) -> dict[str, int]:
        """Layer l's parameters from shapes alone: its attention, its two norms, its FFN (all experts) and the part of
        the FFN one token activates."""
        D, H, Hkv, d = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.d_head
        if self.is_softmax_layer(l):
            attn = (H + 2 * Hkv) * d * D + 2 * d + D * H * d
        else:
            attn = 3 * H * d * D + 2 * d + H * d * D + H * d + D * H * d
        if self.is_dense_layer(l):
            ffn_total = ffn_active = 3 * D * self.intermediate_size
        else:
            expert, shared = 3 * D * self.moe_intermediate_size, 3 * D * self.shared_intermediate
            router = self.num_experts * D + self.num_experts
            ffn_total = self.num_experts * expert + shared + router
            ffn_active = self.num_experts_per_tok * expert + shared + router
        return {"attention": attn, "norms": 2 * D, "ffn_total": ffn_total, "ffn_active": ffn_active}

    def parameter_counts(self) -> dict[str, int]:
        """Total and activated parameter counts from shapes alone (no weights are allocated)."""
        emb = self.vocab_size * self.hidden_size
        total = 2 * emb + self.hidden_size
        active = 0
        for l in range(self.num_hidden_layers):
            c = self.layer_parameter_counts(l)
            total += c["attention"] + c["norms"] + c["ffn_total"]
            active += c["attention"] + c["norms"] + c["ffn_active"]
        active += self.hidden_size  # final norm
        return {"total": total, "active_non_embedding": active, "active_with_embeddings": active + 2 * emb}


def alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes: 2^(-8(h+1)/n) for n a power of two, else the interleaved extension of the next powers."""

    def pow2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start ** (i + 1) for i in range(m)]

    if n & (n - 1) == 0:
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + pow2(2 * c)[0::2][: n - c]
