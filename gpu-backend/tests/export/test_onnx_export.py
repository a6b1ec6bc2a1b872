"""The exported ONNX step graph, run by onnxruntime (CPU, one thread), against the golden vectors and the reference.

The .onnx files go to test/fixtures/onnx/ (git-ignored) and are reused while newer than their checkpoint, so the
Node/workerd tests and these share one export per variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the `export` extra (onnx, onnxscript, onnxruntime) is not installed")
ort = pytest.importorskip("onnxruntime")

from safetensors.numpy import load_file  # noqa: E402

from ringlinear.export.graph import route_topk, step_io_names  # noqa: E402
from ringlinear.export.onnx import OPSET, export, is_up_to_date, main  # noqa: E402
from ringlinear.ops import route  # noqa: E402
from ringlinear.tools.golden import FIXTURES_DIR, GOLDEN_DIR, PLAN, ensure_fixture  # noqa: E402
from ringlinear.tools.make_tiny import config_for  # noqa: E402

ONNX_DIR = FIXTURES_DIR / "onnx"


def exported(variant: str, moe: str = "gather") -> Path:
    ckpt = ensure_fixture(variant, FIXTURES_DIR)
    out = ONNX_DIR / (f"{variant}.onnx" if moe == "gather" else f"{variant}-{moe}.onnx")
    if not is_up_to_date(ckpt, out, moe=moe):
        export(ckpt, out, moe=moe)
    return out


class Runner:
    """Drives the step graph: feeds states back, tracks the position."""

    def __init__(self, path: Path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.meta = json.loads(path.with_suffix(".json").read_text())
        self.state_names = self.meta["inputs"][2:]

    def initial(self) -> dict[str, np.ndarray]:
        H, Hkv, d = self.meta["num_attention_heads"], self.meta["num_key_value_heads"], self.meta["head_dim"]
        return {n: np.zeros((H, d, d) if n.startswith("state_") else (Hkv, 0, d), np.float32) for n in self.state_names}

    def step(self, ids, pos: int, state: dict[str, np.ndarray]):
        out = dict(zip(self.meta["outputs"], self.session.run(None, {
            "input_ids": np.asarray(ids, np.int64), "position": np.array([pos], np.int64), **state})))
        nxt = {n: out[n.replace("state_", "state_out_") if n.startswith("state_") else n.replace("past_", "present_")]
               for n in self.state_names}
        return out["logits"], nxt


def row_rel(ours: np.ndarray, gold: np.ndarray) -> float:
    ours, gold = ours.reshape(-1, gold.shape[-1]), gold.reshape(-1, gold.shape[-1])
    return float((np.abs(ours - gold).max(-1) / np.abs(gold).max(-1)).max())


# Every golden variant with the default (gather) MoE, plus the dense MoE form on tiny.
CASES = [(v, "gather") for v in PLAN] + [("tiny", "dense")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{v}-{m}" for v, m in CASES])
def variant_runner(request):
    variant, moe = request.param
    r = Runner(exported(variant, moe))
    assert r.meta["moe"] == moe
    return variant, r


def test_graph_interface_matches_metadata(variant_runner):
    variant, r = variant_runner
    cfg = config_for(variant)
    ins, outs = step_io_names(cfg)
    assert [i.name for i in r.session.get_inputs()] == ins == r.meta["inputs"]
    assert [o.name for o in r.session.get_outputs()] == outs == r.meta["outputs"]
    model = onnx.load(r.path, load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= OPSET


def test_matches_golden_vectors(variant_runner):
    variant, r = variant_runner
    golden = load_file(str(GOLDEN_DIR / f"{variant}.safetensors"))
    manifest = json.loads((GOLDEN_DIR / f"{variant}.json").read_text())
    rel = manifest["tolerances"]["f32"]["logits_rel"]
    for p in manifest["prompts"]:
        n = p["name"]
        ids = golden[f"{n}.input_ids"]
        logits, state = r.step(ids, 0, r.initial())
        assert row_rel(logits, golden[f"{n}.logits"]) <= rel, f"{variant} {n} prefill"
        for l in manifest["linear_layers"]:
            assert row_rel(state[f"state_{l}"].reshape(1, -1), golden[f"{n}.state.{l}"].reshape(1, -1)) <= rel, f"state {l}"
        greedy = [int(logits[-1].argmax())]
        pos = len(ids)
        for j, t in enumerate(p["greedy_ids"]):
            step, state = r.step([t], pos, state)
            pos += 1
            assert row_rel(step, golden[f"{n}.decode_logits"][j]) <= rel, f"{variant} {n} decode {j}"
            greedy.append(int(step[0].argmax()))
        assert greedy[: len(p["greedy_ids"])] == p["greedy_ids"]


def test_chunked_and_tokenwise_prefill_agree(variant_runner):
    """The engine may feed a prompt in chunks (state and KV carried between calls); every split gives the same logits."""
    variant, r = variant_runner
    ids = load_file(str(GOLDEN_DIR / f"{variant}.safetensors"))["p0.input_ids"]
    whole, s_whole = r.step(ids, 0, r.initial())
    for chunk in (1, 3):
        state, rows = r.initial(), []
        for c0 in range(0, len(ids), chunk):
            out, state = r.step(ids[c0:c0 + chunk], c0, state)
            rows.append(out)
        assert row_rel(np.concatenate(rows), whole) <= 1e-5
        for name, v in s_whole.items():
            np.testing.assert_allclose(state[name], v, rtol=1e-4, atol=1e-5 * float(np.abs(v).max() or 1))


def test_router_ties_choose_lower_expert_indices_in_onnx(tmp_path):
    """ONNX TopK must pick the same experts as the reference's stable sort when scores tie (groups and experts)."""
    cfg = config_for("tiny")  # 16 experts, 4 groups, top-2 groups, top-2 experts

    class Router(torch.nn.Module):
        def forward(self, logits, bias):
            return route_topk(logits, bias, cfg)

    E = cfg.num_experts
    cases = torch.zeros(6, E)
    cases[1, [3, 5, 9, 12]] = 2.0  # ties across groups
    cases[2, :] = torch.tensor([1.0, 1.0, 0.5, 0.5] * 4)  # every group equal, experts tie inside groups
    cases[3, [7, 6, 15, 14]] = 3.0
    cases[4] = torch.linspace(-2, 2, E)
    cases[5] = -torch.linspace(-2, 2, E)
    bias = torch.zeros(E)
    path = tmp_path / "router.onnx"
    torch.onnx.export(Router().eval(), (cases, bias), dynamo=True, opset_version=OPSET, input_names=["logits", "bias"],
                      output_names=["ids", "weights"], dynamic_shapes=({0: torch.export.Dim("N", min=1)}, None)).save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, weights = sess.run(None, {"logits": cases.numpy(), "bias": bias.numpy()})
    ref_ids, ref_w = route(cases.double(), bias.double(), cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok,
                           cfg.norm_topk_prob, cfg.routed_scaling_factor)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(weights, ref_w.numpy(), rtol=1e-6)


def test_cli_names_a_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--out", str(tmp_path / "x.onnx")])
    assert "model_type" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--out", str(tmp_path / "x.onnx"), "--max-context", "1"])
    assert "--max-context" in str(e.value)
