"""Loading real HF checkpoint directories, and refusing each broken case with a message that names the fault."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ringlinear.checkpoint import CheckpointError, INDEX_FILE, load_model, read_state_dict
from ringlinear.config import RingLinearConfig
from ringlinear.tools.make_tiny import make_tiny

IDS = torch.arange(1, 40)


@pytest.fixture(scope="module")
def reference_logits(tiny_model):
    return tiny_model.prefill(IDS)[0]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("shards", [1, 3])
def test_single_and_sharded_give_identical_models(tmp_path, shards, reference_logits):
    ckpt = make_tiny("tiny", tmp_path / "ckpt", shards=shards)
    assert (ckpt / INDEX_FILE).exists() == (shards > 1)
    logits, _ = load_model(ckpt).prefill(IDS)
    assert torch.equal(logits, reference_logits)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp32_and_fp16_checkpoints_load(tmp_path, dtype, reference_logits):
    ckpt = make_tiny("tiny", tmp_path / "ckpt", dtype=dtype)
    logits, _ = load_model(ckpt).prefill(IDS)
    tol = 0 if dtype == "float32" else 5e-2  # bf16 values are exact in fp32; fp16 rounds them again
    torch.testing.assert_close(logits, reference_logits, atol=tol * reference_logits.abs().max().item(), rtol=0)


def test_every_tensor_is_consumed_once(tiny_ckpt, tiny_model):
    sd = read_state_dict(tiny_ckpt, tiny_model.config)
    params = dict(tiny_model.state_dict())
    assert set(sd) == set(params)
    for name, t in sd.items():
        assert t.shape == params[name].shape, name


@pytest.mark.parametrize("shards", [1, 3])
def test_tensors_are_placed_as_they_are_read(tmp_path, shards, monkeypatch):
    """With a dtype and device every tensor is converted right after it is read (the host never holds the whole
    checkpoint), an expert stack is built once its last expert is in, and the result equals reading as stored and
    converting afterwards (the router's expert bias stays fp32)."""
    import ringlinear.checkpoint as ck

    ckpt = make_tiny("tiny", tmp_path / "ckpt", shards=shards)
    cfg = RingLinearConfig.from_file(ckpt)
    plain = read_state_dict(ckpt, cfg)
    placed, live, peak = [], [0], [0]  # tensors read but not yet placed: at most one at any time
    read = ck._placed

    def counting(name, t, dtype, device):
        placed.append(name)
        out = read(name, t, dtype, device)
        live[0] -= 1
        return out

    real_open = ck.safe_open

    class Counted:
        def __init__(self, *a, **kw):
            self.f = real_open(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            return self.f.get_tensor(name)

        def keys(self):
            return self.f.keys()

    monkeypatch.setattr(ck, "_placed", counting)
    monkeypatch.setattr(ck, "safe_open", Counted)
    sd = read_state_dict(ckpt, cfg, dtype=torch.bfloat16, device="cpu")
    assert peak[0] == 1 and len(placed) == len(ck.expected_tensors(cfg))
    assert set(sd) == set(plain)
    for name, t in sd.items():
        want = torch.float32 if name.endswith("expert_bias") else torch.bfloat16
        assert t.dtype == want and torch.equal(t, plain[name].to(want)), name


def test_bias_alias_and_ignored_buffers(tmp_path, tiny_ckpt, reference_logits):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = tensors.pop("model.layers.1.mlp.gate.expert_bias")
    tensors["model.layers.0.attention.slope"] = torch.zeros(4)
    save_file(tensors, str(ckpt / "model.safetensors"))
    assert torch.equal(load_model(ckpt).prefill(IDS)[0], reference_logits)


def _rewrite(ckpt, fn):
    tensors = load_file(str(ckpt / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


CASES = {
    "missing tensor": (lambda c: _rewrite(c, lambda t: t.pop("model.layers.2.attention.g_norm.weight")),
                       r"missing tensor model\.layers\.2\.attention\.g_norm\.weight"),
    "missing expert": (lambda c: _rewrite(c, lambda t: t.pop("model.layers.5.mlp.experts.7.up_proj.weight")),
                       r"missing tensor model\.layers\.5\.mlp\.experts\.7\.up_proj\.weight"),
    "shape mismatch": (lambda c: _rewrite(c, lambda t: t.update({"model.norm.weight": torch.ones(255)})),
                       r"tensor model\.norm\.weight: shape mismatch, expected \[256\], got \[255\]"),
    "softmax layer given linear qkv width": (
        lambda c: _rewrite(c, lambda t: t.update({"model.layers.3.attention.query_key_value.weight": torch.zeros(768, 256)})),
        r"query_key_value\.weight: shape mismatch, expected \[512, 256\], got \[768, 256\]"),
    "unexpected tensor": (lambda c: _rewrite(c, lambda t: t.update({"model.layers.0.attention.extra.weight": torch.zeros(2)})),
                          r"unexpected tensor\(s\).*model\.layers\.0\.attention\.extra\.weight"),
    "integer dtype": (lambda c: _rewrite(c, lambda t: t.update({"model.norm.weight": torch.ones(256, dtype=torch.int32)})),
                      r"tensor model\.norm\.weight: dtype torch\.int32 is not loadable"),
    "unknown model_type": (lambda c: (c / "config.json").write_text(json.dumps(dict(json.loads((c / "config.json").read_text()), model_type="bailing_moe"))),
                           r"unknown model_type 'bailing_moe'"),
    "bad JSON": (lambda c: (c / "config.json").write_text('{"model_type": "bailing_moe_linear",'),
                 r"bad JSON in .*config\.json"),
    "no config": (lambda c: (c / "config.json").unlink(), r"config\.json not found"),
    "truncated safetensors": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100000]),
                              r"model\.safetensors.*truncated"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), r"no model\.safetensors or model\.safetensors\.index\.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoints_are_rejected_by_name(tmp_path, tiny_ckpt, case):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    breaker, message = CASES[case]
    breaker(ckpt)
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


def test_broken_shards(tmp_path):
    ckpt = make_tiny("tiny", tmp_path / "s", shards=2)
    index = json.loads((ckpt / INDEX_FILE).read_text())
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"maps .* to model-00002-of-00002\.safetensors, which is missing"):
        load_model(ckpt)
    (ckpt / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bad model\.safetensors\.index\.json"):
        load_model(ckpt)
    del index


def test_config_round_trip(tiny_ckpt):
    cfg = RingLinearConfig.from_file(tiny_ckpt)
    assert RingLinearConfig.from_dict(cfg.to_dict()) == cfg
