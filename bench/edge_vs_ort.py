"""Prepares the models of bench/edge_vs_ort.ts: the ~45M-parameter bench checkpoint (deterministic random weights,
the tiny tokenizer) and the ONNX exports (both MoE forms) of it and of the tiny fixture, into
test/fixtures/onnx-bench/ (max_context 1024). Skips whatever is already there.

    .venv/bin/python bench/edge_vs_ort.py        (bench/edge_vs_ort.sh runs it)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "gpu-backend"))

from ringlinear.checkpoint import save_checkpoint  # noqa: E402
from ringlinear.config import RingLinearConfig  # noqa: E402
from ringlinear.export.onnx import export, is_up_to_date  # noqa: E402
from ringlinear.tools.golden import FIXTURES_DIR, ensure_fixture  # noqa: E402
from ringlinear.tools.make_tiny import TINY, random_tensors  # noqa: E402

BENCH_NAME = "bench-45m"
# The tiny config scaled up: D 512, 8 layers (softmax at 3 and 7), 8 heads of 64, 8 experts (top-2 of 4 groups x 2).
BENCH_CONFIG = dict(
    TINY, vocab_size=8192, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    intermediate_size=1536, num_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
    moe_intermediate_size=256, moe_shared_expert_intermediate_size=256, group_norm_size=2,
    eos_token_id=0, pad_token_id=0, bos_token_id=1,
)
MAX_CONTEXT = 1024
BENCH_ONNX_DIR = FIXTURES_DIR / "onnx-bench"  # apart from the tests' exports (other max_context)


def make_bench_checkpoint(out: Path) -> Path:
    if (out / "model.safetensors").exists():
        return out
    cfg = RingLinearConfig.from_dict(BENCH_CONFIG)
    save_checkpoint(out, cfg, random_tensors(cfg, seed=45))
    tiny = ensure_fixture("tiny", FIXTURES_DIR)  # its token ids (< 4096) are all inside this vocabulary
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, out / name)
    return out


def ensure_onnx(ckpt: Path, out: Path, moe: str) -> None:
    if not is_up_to_date(ckpt, out, MAX_CONTEXT, moe):
        export(ckpt, out, MAX_CONTEXT, moe)


def main() -> None:
    bench = make_bench_checkpoint(FIXTURES_DIR / BENCH_NAME)
    counts = RingLinearConfig.from_file(bench).parameter_counts()
    tiny = ensure_fixture("tiny", FIXTURES_DIR)
    # Both MoE forms of the graph: gather (k experts per token) and dense (all experts, plain GEMMs).
    for name, ckpt in (("tiny", tiny), (BENCH_NAME, bench)):
        ensure_onnx(ckpt, BENCH_ONNX_DIR / f"{name}.onnx", "gather")
        ensure_onnx(ckpt, BENCH_ONNX_DIR / f"{name}-dense.onnx", "dense")
    print(json.dumps({"bench_checkpoint": str(bench.relative_to(ROOT)), "params": counts}))


if __name__ == "__main__":
    main()
