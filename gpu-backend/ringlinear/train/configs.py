"""Model configs for training: the shipped default model and a tiny one for CPU tests.

Both keep every structural feature of the architecture: lightning + softmax layers by the group rule,
a dense first layer, a sigmoid group-limited MoE with a shared expert and expert bias, the group-norm output gate.
"""

from __future__ import annotations

from ..config import RingLinearConfig
from ..tokenizer_files import BOS_ID, EOT_ID, ROLE_END_ID, SPECIAL_TOKENS  # noqa: F401 (re-exported)

# ~12.0M parameters: bf16 safetensors ~24 MB, int8 ~12 MB (edge budget 128 MB, leaving room for request state).
DEFAULT = {
    "architectures": ["BailingMoeLinearV2ForCausalLM"],
    "model_type": "bailing_moe_linear",
    "vocab_size": 6144,
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "layer_group_size": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "use_qk_norm": True,
    "linear_silu": False,
    "group_norm_size": 2,
    "intermediate_size": 768,
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
    "eos_token_id": EOT_ID,
    "pad_token_id": EOT_ID,
    "bos_token_id": BOS_ID,
}

# Same structure, tiny widths: trains a few steps on a CPU in seconds (tests).
TINY = dict(DEFAULT, vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)

CONFIGS = {"default": DEFAULT, "tiny": TINY}


def model_config(name: str, vocab_size: int | None = None) -> RingLinearConfig:
    if name not in CONFIGS:
        raise SystemExit(f"unknown model config {name!r}; choose from {', '.join(CONFIGS)}")
    d = dict(CONFIGS[name])
    if vocab_size is not None:
        d["vocab_size"] = vocab_size
    return RingLinearConfig.from_dict(d)
