import math

import pytest

from ringlinear.config import ConfigError, RingLinearConfig, alibi_slopes
from ringlinear.tools.make_tiny import config_for
from ringlinear.tools.params import PRESETS


def test_parameter_counts_match_published_figures():
    mini = RingLinearConfig.from_dict(PRESETS["ring-mini-linear-2.0"]).parameter_counts()
    assert round(mini["total"] / 1e9, 2) == 16.42
    assert round(mini["active_non_embedding"] / 1e9, 3) == 0.957
    assert round(mini["active_with_embeddings"] / 1e9, 3) == 1.601
    flash = RingLinearConfig.from_dict(PRESETS["ring-flash-linear-2.0"]).parameter_counts()
    assert round(flash["total"] / 1e9, 2) == 104.18
    assert round(flash["active_non_embedding"] / 1e9, 2) == 6.16


def test_layer_schedules():
    mini = RingLinearConfig.from_dict(PRESETS["ring-mini-linear-2.0"])
    assert mini.softmax_layers == [4, 9, 14, 19]
    flash = RingLinearConfig.from_dict(PRESETS["ring-flash-linear-2.0"])
    assert flash.softmax_layers == [7, 15, 23, 31]
    assert config_for("tiny").softmax_layers == [3, 7]
    assert config_for("tiny-tail").softmax_layers == [3, 4, 5]  # HF tail rule


def test_alibi_slopes_reference_values():
    mini16 = [0.70711, 0.5, 0.35355, 0.25, 0.17678, 0.125, 0.08839, 0.0625, 0.04419, 0.03125,
              0.02210, 0.01563, 0.01105, 0.00781, 0.00552, 0.00391]
    assert alibi_slopes(16) == pytest.approx(mini16, abs=1e-5)
    assert alibi_slopes(4) == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625])
    # non-power-of-two: slopes(4) ++ every other of slopes(8), first 2
    assert alibi_slopes(6) == pytest.approx(alibi_slopes(4) + alibi_slopes(8)[0::2][:2])


def test_decay_reference_values_and_slope_rule():
    mini = RingLinearConfig.from_dict(PRESETS["ring-mini-linear-2.0"])
    gamma = lambda l, h: math.exp(-mini.decay_rates(l)[h])
    assert gamma(0, 0) == pytest.approx(0.49307, abs=1e-5)
    assert gamma(0, 15) == pytest.approx(0.99610, abs=1e-5)
    assert gamma(18, 0) == pytest.approx(0.96346, abs=1e-5)
    assert gamma(18, 15) == pytest.approx(0.999794, abs=1e-6)
    hf = RingLinearConfig.from_dict(dict(PRESETS["ring-mini-linear-2.0"], ringlinear_slope_rule="hf"))
    assert hf.layer_factor(0) == pytest.approx(1 + 1 / 19 + 1e-5)
    assert hf.layer_factor(5) - mini.layer_factor(5) == pytest.approx(1 / 19)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unknown model_type 'llama'"),
    ({"num_experts": 15}, "n_group (4) must divide num_experts (15)"),
    ({"score_function": "softmax"}, "score_function 'softmax' is not supported"),
    ({"hidden_size": "256"}, "hidden_size must be a positive integer"),
    ({"ringlinear_slope_rule": "other"}, "ringlinear_slope_rule must be one of"),
])
def test_bad_configs_name_the_field(change, message):
    d = config_for("tiny").to_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RingLinearConfig.from_dict(d)


def test_missing_required_field():
    d = config_for("tiny").to_dict()
    del d["num_experts"]
    with pytest.raises(ConfigError, match="lacks required field.*num_experts"):
        RingLinearConfig.from_dict(d)
