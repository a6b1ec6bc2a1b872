"""A few CPU training steps end to end: the loss falls, the bias moves, the checkpoint reloads with load_model."""

import json

import numpy as np
import pytest
import torch

from ringlinear.checkpoint import load_model
from ringlinear.train.configs import model_config
from ringlinear.train.data import WindowSampler, encode_documents, heldout_windows
from ringlinear.train.loop import TrainSettings, lr_at, train
from ringlinear.train.trainable import checkpoint_tensors, init_model, moe_layers


def _pattern_stream(n=4000, period=24, vocab=512):
    """A periodic token stream: easy to learn, so a handful of steps must lower the loss."""
    rng = np.random.default_rng(0)
    motif = rng.integers(3, vocab, size=period)
    return np.tile(motif, n // period + 1)[:n].astype(np.uint16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = model_config("tiny")
    s = TrainSettings(seq_len=32, batch_size=4, lr=1e-2, warmup_steps=1, steps=8, log_every=1, eval_every=4,
                      eval_windows=2, bias_update_rate=0.01, save_dtype="float32")
    stream = _pattern_stream()
    model, summary = train(cfg, stream, stream[:400], out, s, device="cpu", progress=False)
    return cfg, model, summary, out


def test_loss_falls(trained):
    _, _, summary, out = trained
    losses = [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 8
    assert summary["last_logged_loss"] < summary["first_logged_loss"] - 0.5, losses


def test_log_has_heldout_and_load_records(trained):
    _, _, _, out = trained
    recs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert recs[0]["event"] == "start" and recs[-1]["event"] == "done"
    assert [r["step"] for r in recs if "heldout_loss" in r] == [4, 8]
    loads = [r["expert_load_max_over_mean"] for r in recs if "loss" in r]
    assert all(len(x) == 7 for x in loads)  # 7 MoE layers (layer 0 is dense)


def test_balancing_moved_the_bias(trained):
    _, model, _, _ = trained
    for moe in moe_layers(model):
        b = moe.gate.expert_bias
        assert b.abs().max() > 0  # 8 updates of +-0.01
        assert abs(float(b.mean())) < 1e-6


def test_checkpoint_reloads_with_reference_loader(trained):
    cfg, model, _, out = trained
    ref = load_model(out, dtype=torch.float32)
    assert ref.config == cfg
    ids = torch.tensor([[5, 9, 11, 3, 200, 17, 42, 8]])
    model.eval()
    with torch.no_grad():
        want, _ = model(ids)  # the trained model runs the batched MoE; the loaded one the reference loop
        got, _ = ref(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(moe_layers(model), moe_layers(ref)):
        assert torch.equal(a.gate.expert_bias, b.gate.expert_bias)


class FakeClock:
    """Advances a fixed amount per reading, so the time-budget logic is tested independently of machine speed."""

    def __init__(self, tick):
        self.t, self.tick = 0.0, tick

    def __call__(self):
        self.t += self.tick
        return self.t


def test_time_budget_fixes_the_step_count(tmp_path):
    cfg = model_config("tiny")
    s = TrainSettings(seq_len=16, batch_size=2, warmup_steps=2, time_budget_s=3.0, calibrate_steps=8, log_every=4,
                      eval_every=10**9, save_dtype="bfloat16", shards=2)
    _, summary = train(cfg, _pattern_stream(), None, tmp_path, s, device="cpu", progress=False, clock=FakeClock(0.1))
    recs = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    cal = [r for r in recs if r.get("event") == "calibrated"]
    assert len(cal) == 1 and cal[0]["total_steps"] > 8
    assert summary["steps"] == cal[0]["total_steps"]  # the cosine schedule ran to its end within the budget
    assert not [r for r in recs if r.get("event") == "stopped_on_time"]
    assert (tmp_path / "model.safetensors.index.json").exists()
    load_model(tmp_path)  # the sharded bf16 checkpoint loads


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        train(model_config("tiny"), _pattern_stream(), None, tmp_path, TrainSettings(steps=None), progress=False)


def test_lr_schedule_warmup_then_cosine():
    s = TrainSettings(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, 100, s) == pytest.approx(0.1)
    assert lr_at(9, 100, s) == pytest.approx(1.0)
    assert lr_at(10, 100, s) == pytest.approx(1.0)
    assert lr_at(55, 100, s) == pytest.approx(0.55)
    assert lr_at(100, 100, s) == pytest.approx(0.1)
    assert all(lr_at(i, 100, s) >= lr_at(i + 1, 100, s) for i in range(10, 100))


def test_windows_and_sampler():
    stream = np.arange(100, dtype=np.uint16)
    w = heldout_windows(stream, 30, None)
    assert w.shape == (3, 30) and int(w[1, 0]) == 30
    assert heldout_windows(stream, 30, 2).shape == (2, 30)
    with pytest.raises(ValueError):
        heldout_windows(stream[:10], 30, None)
    b = WindowSampler(stream, 8, 5, torch.device("cpu"), seed=0).next()
    assert b.shape == (5, 9) and torch.all(b[:, 1:] - b[:, :-1] == 1)  # contiguous windows


def test_encode_documents_ends_each_with_eot():
    class Tok:
        def get_vocab_size(self):
            return 100

        def encode_batch(self, texts, add_special_tokens):
            class E:
                def __init__(self, ids):
                    self.ids = ids
            return [E([len(t) + 10, 5]) for t in texts]

    ids = encode_documents(Tok(), iter(["ab", "cde"]), batch=1)
    assert ids.dtype == np.uint16 and ids.tolist() == [12, 5, 0, 13, 5, 0]


def test_checkpoint_tensors_reject_foreign_names():
    model = init_model(model_config("tiny"), 0)
    model.register_buffer("stray", torch.zeros(1))
    with pytest.raises(RuntimeError, match="export names"):
        checkpoint_tensors(model)
