"""Parameter counts of a config, from shapes alone (no weights allocated).

    python -m ringlinear params --preset ring-mini-linear-2.0
    python -m ringlinear params --config path/to/config.json
"""

from __future__ import annotations

import argparse
import json

from ..config import RingLinearConfig

_COMMON = {"model_type": "bailing_moe_linear", "vocab_size": 157184, "num_key_value_heads": 4, "head_dim": 128,
           "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1, "first_k_dense_replace": 1,
           "n_group": 8, "topk_group": 4, "partial_rotary_factor": 0.5, "rope_theta": 1000000, "group_norm_size": 4,
           "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
           "eos_token_id": 156892, "pad_token_id": 156892}
PRESETS = {
    # architecture doc §1.1 (verbatim config values)
    "ring-mini-linear-2.0": dict(_COMMON, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
                                 intermediate_size=5120, moe_intermediate_size=512, moe_shared_expert_intermediate_size=512,
                                 layer_group_size=5),
    # architecture doc §1.2 (moe sizes inferred there from the published counts)
    "ring-flash-linear-2.0": dict(_COMMON, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                  intermediate_size=9216, moe_intermediate_size=1024, moe_shared_expert_intermediate_size=1024,
                                  layer_group_size=8),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ringlinear params", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=sorted(PRESETS))
    g.add_argument("--config")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cfg = RingLinearConfig.from_dict(PRESETS[a.preset]) if a.preset else RingLinearConfig.from_file(a.config)
    c = cfg.parameter_counts()
    if a.json:
        print(json.dumps(c))
        return
    print(f"total                 {c['total'] / 1e9:8.2f} B")
    print(f"active (non-embedding){c['active_non_embedding'] / 1e9:8.3f} B")
    print(f"active (+embeddings)  {c['active_with_embeddings'] / 1e9:8.3f} B")
