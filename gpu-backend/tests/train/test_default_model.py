"""The shipped default model (models/default): structure, size, tokenizer, and the held-out NLL golden file."""

import json
from pathlib import Path

import pytest
import torch

from ringlinear.checkpoint import load_model
from ringlinear.config import RingLinearConfig
from ringlinear.tokenizer import ChatTokenizer
from ringlinear.train.evaluate import token_nll

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "models" / "default"
GOLDEN = REPO / "test" / "golden" / "default-heldout.json"


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL, dtype=torch.float32)


def test_config_keeps_every_structural_feature():
    cfg = RingLinearConfig.from_file(MODEL)
    assert cfg.softmax_layers and cfg.linear_layers and cfg.num_hidden_layers % cfg.layer_group_size == 0
    assert cfg.is_dense_layer(0) and not cfg.is_dense_layer(1)
    assert cfg.n_group > cfg.topk_group > 0 and cfg.num_experts_per_tok < cfg.num_experts
    assert cfg.shared_intermediate > 0 and cfg.moe_router_enable_expert_bias and cfg.score_function == "sigmoid"
    assert cfg.group_norm_size > 1 and cfg.num_key_value_heads < cfg.num_attention_heads
    assert 10e6 <= cfg.parameter_counts()["total"] <= 20e6


def test_checkpoint_fits_the_size_budget():
    assert (MODEL / "model.safetensors").stat().st_size <= 25 * 10**6


def test_expert_bias_was_trained(model):
    for layer in model.model.layers[1:]:
        b = layer.mlp.gate.expert_bias
        assert b.dtype == torch.float32 and b.abs().max() > 0 and abs(float(b.mean())) < 1e-4


def test_tokenizer_files():
    tok = ChatTokenizer(MODEL)
    assert tok.vocab_size == RingLinearConfig.from_file(MODEL).vocab_size
    assert tok.eos_ids == {0, 2}
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert prompt == "<role>HUMAN</role>Hello<|role_end|><role>ASSISTANT</role>"


def test_heldout_golden_matches_reference(model):
    g = json.loads(GOLDEN.read_text(encoding="utf-8"))
    tok = ChatTokenizer(MODEL)
    assert tok.tok.encode(g["text"], add_special_tokens=False).ids == g["ids"]
    nll = token_nll(model, torch.tensor([g["ids"]]))[0]
    assert len(g["nll"]) == len(g["ids"]) - 1
    assert float((nll - torch.tensor(g["nll"], dtype=torch.float64)).abs().max()) <= g["tolerances"]["f32_abs_per_token"]
    assert float(nll.mean()) == pytest.approx(g["mean_nll"], abs=1e-4)
    assert g["perplexity"] < 40  # a trained model, not noise (uniform over the vocabulary would be ~6144)
