"""Golden vectors: the reference model's outputs on fixed prompts, the contract every engine is tested against.

    python -m ringlinear golden            # writes test/golden/<variant>.{safetensors,json}
    python -m ringlinear golden --check    # regenerates into a temp dir and requires identical bytes

Computed in float64 from the bf16 checkpoint, stored as float32 (see docs/architecture.md, Contract 2).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import load_model
from ..tokenizer import ChatTokenizer
from .make_tiny import make_tiny

REPO = Path(__file__).resolve().parents[3]
GOLDEN_DIR = REPO / "test" / "golden"
FIXTURES_DIR = REPO / "test" / "fixtures"

PROMPTS = [
    "The ring turns and the river runs.",
    "Hello world, how are you?",
    "Experts are chosen by a router: eight of many, or two of sixteen in this tiny test model. " * 3,
]
# Per variant: how many prompts (the variants test structure, the main model covers long prompts too).
PLAN = {"tiny": len(PROMPTS), "tiny-h6": 1, "tiny-tail": 1, "tiny-hfslope": 1}
GREEDY_TOKENS = 8
TOLERANCES = {
    "f32": {"logits_rel": 1e-4, "state_rel": 1e-4, "greedy": "exact",
            "note": "per row: max|ours - golden| <= rel * max|golden|"},
    "int8": {"greedy": "exact on these prompts", "logits_rel": "engine-documented bound"},
    "bf16": {"logits_rel": 5e-2, "greedy": "may differ after near-ties"},
}


def _margins(first: torch.Tensor, rest: torch.Tensor) -> list[float]:
    """Per greedy step: (top1 - top2) / max|logit|. A quantised engine whose logit error is well below a step's
    margin must make the same choice there; the prompts above were picked with no near-ties on `tiny`."""
    rows = torch.cat([first, rest])
    top = rows.topk(2, dim=-1).values
    return [round(float(m), 5) for m in (top[:, 0] - top[:, 1]) / rows.abs().amax(-1)]


def generate(variant: str, ckpt: Path, out_dir: Path) -> None:
    model = load_model(ckpt, dtype=torch.float64)
    tok = ChatTokenizer(ckpt)
    tensors: dict[str, torch.Tensor] = {}
    prompts = []
    for i, text in enumerate(PROMPTS[: PLAN[variant]]):
        ids = tok.encode(text)
        greedy, logits, dec, state = model.generate_greedy(ids, GREEDY_TOKENS)
        tensors[f"p{i}.input_ids"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"p{i}.logits"] = logits.float().contiguous()
        tensors[f"p{i}.greedy_ids"] = torch.tensor(greedy, dtype=torch.int32)
        tensors[f"p{i}.decode_logits"] = dec.float().contiguous()
        for l, s in state.linear.items():
            tensors[f"p{i}.state.{l}"] = s[0].float().contiguous()
        prompts.append({"name": f"p{i}", "text": text, "input_ids": ids, "greedy_ids": greedy,
                        "greedy_text": tok.decode(greedy), "greedy_margins": _margins(logits[-1:], dec[:-1])})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / f"{variant}.safetensors"))
    manifest = {
        "checkpoint": f"test/fixtures/{variant}",
        "make_checkpoint": f"python -m ringlinear make-tiny --variant {variant} --out test/fixtures/{variant}",
        "reference": "ringlinear.model, float64, chunked prefill (chunk 64) then recurrent decode",
        "greedy_tokens": GREEDY_TOKENS,
        "linear_layers": model.config.linear_layers,
        "softmax_layers": model.config.softmax_layers,
        "prompts": prompts,
        "tolerances": TOLERANCES,
    }
    (out_dir / f"{variant}.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def ensure_fixture(variant: str, fixtures: Path) -> Path:
    ckpt = fixtures / variant
    if not (ckpt / "model.safetensors").exists():
        make_tiny(variant, ckpt)
    return ckpt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ringlinear golden", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=GOLDEN_DIR)
    p.add_argument("--fixtures", type=Path, default=FIXTURES_DIR)
    p.add_argument("--check", action="store_true", help="regenerate everything in a temp dir and compare bytes")
    a = p.parse_args(argv)
    if not a.check:
        for variant in PLAN:
            generate(variant, ensure_fixture(variant, a.fixtures), a.out)
            print(f"wrote {a.out / variant}.safetensors/.json")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bad = []
        for variant in PLAN:
            generate(variant, make_tiny(variant, tmp / "fixtures" / variant), tmp / "golden")
            for ext in (".safetensors", ".json"):
                name = variant + ext
                if not (a.out / name).exists() or not filecmp.cmp(tmp / "golden" / name, a.out / name, shallow=False):
                    bad.append(name)
        if bad:
            sys.exit(f"golden vectors differ from a fresh regeneration: {', '.join(bad)}")
        print(f"golden vectors reproduce byte for byte ({len(PLAN)} variants)")
