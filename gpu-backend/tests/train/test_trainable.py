"""The training-only pieces against the reference: batched MoE == reference MoE, bias balancing, export names."""

import pytest
import torch

from ringlinear.checkpoint import expected_tensors, map_name
from ringlinear.model import MoE
from ringlinear.train.configs import model_config
from ringlinear.train.trainable import (BatchedMoE, checkpoint_tensors, init_model, moe_layers, update_expert_bias,
                                        use_batched_moe)


@pytest.fixture
def cfg():
    return model_config("tiny")


def test_batched_moe_equals_reference_forward(cfg):
    torch.manual_seed(1)
    ref = MoE(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        ref.gate.expert_bias.normal_(0, 0.3)  # the bias changes which experts are picked
    fast = BatchedMoE.from_moe(ref)
    x = torch.randn(3, 7, cfg.hidden_size)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    assert fast.last_load.sum() == 3 * 7 * cfg.num_experts_per_tok


def test_batched_moe_gradients_equal_reference(cfg):
    torch.manual_seed(2)
    ref = MoE(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    fast = BatchedMoE(cfg)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, cfg.hidden_size)
    ref(x).square().sum().backward()
    fast(x).square().sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        # fp32 sums in another order: the error scales with the gradient's magnitude (up to ~1e3 here), not with the
        # element's own, so the absolute tolerance is relative to the tensor's largest entry (torch 2.15 summed one
        # small element of experts_up_proj 2e-4 away at a scale of 480)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * a.grad.abs().max().item(), msg=n)


def test_use_batched_moe_shares_parameters(cfg):
    model = init_model(cfg, seed=0)
    before = dict(model.named_parameters())
    use_batched_moe(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)
    assert all(isinstance(m, BatchedMoE) for m in moe_layers(model))


def test_bias_update_follows_load_sign_and_recentres(cfg):
    model = use_batched_moe(init_model(cfg, seed=0))
    moe = moe_layers(model)[0]
    load = torch.full((cfg.num_experts,), 4.0)
    load[0], load[1] = 20.0, 0.0  # expert 0 overloaded, expert 1 idle
    moe.last_load = load
    ratios = update_expert_bias(model, rate=0.01)
    b = moe.gate.expert_bias
    assert b[0] < 0 < b[1]
    assert abs(float(b.mean())) < 1e-7
    assert ratios is not None and ratios.shape == (1,) and float(ratios[0]) == pytest.approx(20.0 / load.mean().item())
    assert update_expert_bias(model, rate=0.01) is None  # load is consumed: no second update without a forward


def test_checkpoint_tensors_use_checkpoint_names(cfg):
    model = init_model(cfg, seed=0)
    t = checkpoint_tensors(model)
    assert set(t) == set(expected_tensors(cfg))
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert map_name(name) == ("model.layers.1.mlp.experts_down_proj", 3)
    torch.testing.assert_close(t[name].float(), model.model.layers[1].mlp.experts_down_proj[3].detach().to(torch.bfloat16).float())
    assert t["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
