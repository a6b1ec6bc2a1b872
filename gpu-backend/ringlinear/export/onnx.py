"""Export a checkpoint to ONNX for onnxruntime-web: one step graph with explicit state inputs/outputs.

    python -m ringlinear export-onnx --model test/fixtures/tiny --out test/fixtures/onnx/tiny.onnx

Writes the graph (weights inside, fp32, one file) and beside it `<name>.json`, the metadata an engine needs
to drive it (input/output names, state shapes, the context limit of the RoPE table). See graph.py for the
interface and docs/ort-engine.md for how the engines use it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_model
from ..config import RingLinearConfig
from .graph import MOE_FORMS, StepGraph, step_io_names

OPSET = 18  # onnxruntime-web 1.30 runs it; TopK's lower-index tie rule holds since opset 11
DEFAULT_MAX_CONTEXT = 4096


def example_inputs(cfg: RingLinearConfig, T: int = 3, P: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of the step graph for T new tokens after P consumed ones (zero states, random-free)."""
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.d_head
    args: list[torch.Tensor] = [torch.arange(T, dtype=torch.int64) % cfg.vocab_size, torch.tensor([P], dtype=torch.int64)]
    for l in range(cfg.num_hidden_layers):
        if cfg.is_softmax_layer(l):
            args += [torch.zeros(Hkv, P, d), torch.zeros(Hkv, P, d)]
        else:
            args.append(torch.zeros(H, d, d))
    return tuple(args)


def metadata(cfg: RingLinearConfig, max_context: int, moe: str = "gather") -> dict:
    ins, outs = step_io_names(cfg)
    return {
        "format": "ringlinear-onnx-step/1",
        "opset": OPSET,
        "inputs": ins,
        "outputs": outs,
        "vocab_size": cfg.vocab_size,
        "max_context": max_context,
        "moe": moe,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.d_head,
        "linear_layers": cfg.linear_layers,
        "softmax_layers": cfg.softmax_layers,
        "eos_token_ids": cfg.eos_ids,
    }


def export(ckpt: Path, out: Path, max_context: int | None = None, moe: str = "gather") -> dict:
    """Exports `ckpt` to `out` (.onnx) plus `out.with_suffix('.json')`; returns the metadata."""
    model = load_model(ckpt, dtype=torch.float32)
    cfg = model.config
    max_context = min(max_context or DEFAULT_MAX_CONTEXT, cfg.max_position_embeddings)
    graph = StepGraph(model, max_context, moe).eval()
    ins, outs = step_io_names(cfg)
    T, P = torch.export.Dim("T", min=1, max=max_context), torch.export.Dim("P", min=0, max=max_context)
    per_state: list[dict | None] = []
    for l in range(cfg.num_hidden_layers):
        per_state += [{1: P}, {1: P}] if cfg.is_softmax_layer(l) else [None]
    dyn = ({0: T}, None, tuple(per_state))  # forward(input_ids, position, *states)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # T/P naming notice, harmless
        program = torch.onnx.export(graph, example_inputs(cfg), dynamo=True, opset_version=OPSET, input_names=ins,
                                    output_names=outs, dynamic_shapes=dyn, external_data=False, optimize=True)
    program.save(str(out), external_data=False)
    meta = metadata(cfg, max_context, moe)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def is_up_to_date(ckpt: Path, out: Path, max_context: int | None = None, moe: str = "gather") -> bool:
    """True when `out` (and its .json) was made with these options and is newer than every checkpoint file and
    than this exporter's code."""
    meta_path = out.with_suffix(".json")
    if not (out.exists() and meta_path.exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    cfg = RingLinearConfig.from_file(ckpt)
    if meta.get("moe") != moe or meta.get("max_context") != min(max_context or DEFAULT_MAX_CONTEXT, cfg.max_position_embeddings):
        return False
    sources = [*Path(ckpt).iterdir(), *Path(__file__).parent.glob("*.py")]
    return out.stat().st_mtime >= max(f.stat().st_mtime for f in sources)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ringlinear export-onnx", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", type=Path, required=True, help="output .onnx path (a .json with the metadata goes beside it)")
    p.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT,
                   help=f"positions the RoPE table covers (default {DEFAULT_MAX_CONTEXT}, capped at max_position_embeddings)")
    p.add_argument("--moe", choices=MOE_FORMS, default="gather",
                   help="gather: compute only the k routed experts (default); dense: all experts as wide matmuls")
    p.add_argument("--skip-existing", action="store_true",
                   help="do nothing when the .onnx is newer than the checkpoint and the exporter")
    a = p.parse_args(argv)
    if a.max_context < 2:
        sys.exit("export-onnx: --max-context must be >= 2")
    if a.skip_existing and a.model.is_dir() and is_up_to_date(a.model, a.out, a.max_context, a.moe):
        print(f"up to date: {a.out}")
        return
    try:
        export(a.model, a.out, a.max_context, a.moe)
    except CheckpointError as e:
        sys.exit(f"export-onnx: {e}")
    print(f"wrote {a.out} ({a.out.stat().st_size / 2**20:.1f} MiB) and {a.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
