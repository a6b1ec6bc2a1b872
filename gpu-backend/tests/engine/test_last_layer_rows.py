"""The runner's last layer on the logit rows only (ModelRunner.last_layer_logit_rows_only): steps run the last
(softmax) layer's attention, output projection and MLP for the rows whose logits they return, and still write its
K/V for every row. Against the same engine running every row: the same tokens, logits within rounding, and bitwise the
same KV cache and linear states; on the reference path, the kernels' twins (CPU) and the kernels (CUDA), eager and
on the step pieces' padded buffers (where the last piece then runs eagerly on the logit rows)."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import greedy, make_engine, random_prompt, run_all


def _watch(eng):
    """Record each step's logits, and the (step rows, logit rows) of every trimmed last layer."""
    logits, trims = [], []
    runner = eng.runner
    execute, last_rows = runner.execute, runner._last_layer_logit_rows

    def wrapped_execute(segs, feed=None):
        out, snaps = execute(segs, feed)
        logits.append(None if out is None else out.float().cpu())
        return out, snaps

    def wrapped_last(io, plan):
        trims.append((io.x.shape[1], plan.out_rows.numel()))
        return last_rows(io, plan)

    runner.execute, runner._last_layer_logit_rows = wrapped_execute, wrapped_last
    return logits, trims


def _scenario(eng):
    """A prompt cut into chunks that do not end it (no logit rows), prompts ending beside decodes, decodes alone."""
    first = eng.add_request(random_prompt(200, 1), greedy(5))
    eng.step()
    reqs = [first] + [eng.add_request(random_prompt(n, seed), greedy(4)) for n, seed in ((150, 2), (9, 3), (40, 4))]
    run_all(eng)
    return [r.output for r in reqs]


def _ab(model, tol, padded=False, **kw):
    on, off = (make_engine(model, max_batch=4, max_step_tokens=64, **kw) for _ in range(2))
    off.runner.last_layer_logit_rows_only = False
    if padded:  # the piece path (padded buffers; captured graphs on CUDA): the last piece eagerly on the logit rows
        for e in (on, off):
            assert e.runner.capture_step_graphs(64, eager=e.runner.model.device.type != "cuda") > 0
    (log_on, trims), (log_off, none) = _watch(on), _watch(off)
    assert _scenario(on) == _scenario(off)
    assert not none
    # trimmed steps: chunks that end no prompt (no rows), and steps where prompts end beside decodes (a few rows)
    assert any(n_out == 0 for _, n_out in trims), trims
    assert any(0 < n_out < rows for rows, n_out in trims), trims
    assert len(log_on) == len(log_off)
    for step, (a, b) in enumerate(zip(log_on, log_off)):
        assert (a is None) == (b is None)
        if a is not None:
            err = ((a - b).abs().amax(-1) / b.abs().amax(-1)).max().item()
            assert err <= tol, f"step {step}: logits differ by {err:.2e} of their range"
    for l in model.config.softmax_layers:  # the last layer's K/V too: written for every row by its prologue
        assert torch.equal(on.kv.k[l], off.kv.k[l]) and torch.equal(on.kv.v[l], off.kv.v[l]), l
    for l in model.config.linear_layers:
        assert torch.equal(on.states.states[l], off.states.states[l]), l
    return trims


@pytest.mark.parametrize("kernels,padded", [(False, False), (True, False), (True, True)],
                         ids=["reference", "twins", "twins-padded"])
def test_last_layer_on_logit_rows_keeps_tokens_cache_and_states(tiny_model, kernels, padded):
    assert tiny_model.config.is_softmax_layer(tiny_model.config.num_hidden_layers - 1)
    _ab(tiny_model, 1e-5, padded=padded, kernels=kernels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("padded", [False, True], ids=["eager", "graphs"])
def test_last_layer_on_logit_rows_on_cuda(padded):
    """The kernel path (bf16, cuDNN / FlashAttention-2 chunk attention, fused MoE), eager and with the step pieces
    replayed from captured graphs: the same A/B within bf16 rounding; the K/V and states bitwise."""
    from ringlinear import kernels as K
    from ringlinear.engine.weights import random_model
    from ringlinear.tools.make_tiny import TINY
    from ringlinear.config import RingLinearConfig

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    model = random_model(RingLinearConfig.from_dict(TINY), "cuda", torch.bfloat16, seed=3)
    _ab(model, 2e-2, padded=padded, cuda_graphs=padded)
