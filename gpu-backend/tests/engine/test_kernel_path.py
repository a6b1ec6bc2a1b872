"""The runner's kernel path: dispatch on CPU, the kernel-path glue through the kernels' twins on CPU, and (CUDA only)
the kernels against the reference ops on the tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import greedy, make_engine, random_prompt

from ringlinear import kernels as K
from ringlinear.engine.runner import kernels_usable
from ringlinear.ops import lightning_recurrent_step


def _record_logits(eng):
    """Wrap the runner so every step's logits (or None) are kept."""
    log, execute = [], eng.runner.execute

    def wrapped(segs):
        logits, snaps = execute(segs)
        log.append(None if logits is None else logits.float().cpu())
        return logits, snaps

    eng.runner.execute = wrapped
    return log


def _scenario(eng):
    """Three prompts that need chunked prefill (64-aligned cuts, snapshots) next to running decodes."""
    reqs = [eng.add_request(random_prompt(n, seed), greedy(6)) for n, seed in ((150, 1), (70, 2), (5, 3))]
    while eng.has_work():
        eng.step()
    return [r.output for r in reqs]


def test_dispatch_picks_reference_on_cpu(tiny_model, monkeypatch):
    assert not kernels_usable(tiny_model)
    eng = make_engine(tiny_model, max_step_tokens=64)
    assert eng.runner.use_kernels is False
    assert eng.runner.lightning_decode is lightning_recurrent_step

    def no_kernels(*a, **k):
        raise AssertionError("the kernel path ran on CPU")

    for name in ("fused_moe", "lightning_decode", "lightning_prefill"):
        monkeypatch.setattr(K, name, no_kernels)
    assert _scenario(eng) == [tiny_model.generate_greedy(random_prompt(n, s), 6)[0] for n, s in ((150, 1), (70, 2), (5, 3))]


def test_kernel_path_through_twins_matches_reference(tiny_model):
    """kernels=True on CPU runs the runner's kernel glue (varlen cut rounds, in-place slot decode, fused-MoE call,
    GQA decode attention) over the kernels' reference twins: it must equal the reference path."""
    ref = make_engine(tiny_model, max_batch=4, max_step_tokens=64, kernels=False)
    ker = make_engine(tiny_model, max_batch=4, max_step_tokens=64, kernels=True)
    assert ker.runner.use_kernels and not ref.runner.use_kernels
    log_ref, log_ker = _record_logits(ref), _record_logits(ker)
    assert _scenario(ref) == _scenario(ker)
    assert len(log_ref) == len(log_ker) > 5
    for step, (a, b) in enumerate(zip(log_ref, log_ker)):
        assert (a is None) == (b is None)
        if a is not None:
            err = ((a - b).abs().amax(-1) / a.abs().amax(-1)).max().item()
            assert err <= 1e-4, f"step {step}: logits differ by {err:.2e}"
    snaps = lambda e: {k: v.states for k, v in e.prefix.entries.items()}  # noqa: E731
    s_ref, s_ker = snaps(ref), snaps(ker)
    assert s_ref.keys() == s_ker.keys() and s_ref
    for key in s_ref:
        for l, st in s_ref[key].items():
            assert torch.allclose(s_ker[key][l], st, rtol=0, atol=1e-4 * st.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_reference_ops_on_cuda(tiny_ckpt):
    from ringlinear.checkpoint import load_model

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    assert kernels_usable(model)
    ref = make_engine(model, max_batch=4, max_step_tokens=64, kernels=False)
    ker = make_engine(model, max_batch=4, max_step_tokens=64)  # auto: kernels on CUDA
    assert ker.runner.use_kernels and not ref.runner.use_kernels
    log_ref, log_ker = _record_logits(ref), _record_logits(ker)
    _scenario(ref), _scenario(ker)
    # bf16 greedy can part after a near-tie: compare every step's logits up to the first step whose argmax parts
    # (scheduling is lockstep: it depends on token counts only). Later steps feed different tokens.
    assert len(log_ref) == len(log_ker)
    compared = 0
    for step, (a, b) in enumerate(zip(log_ref, log_ker)):
        assert (a is None) == (b is None)
        if a is None:
            continue
        err = ((a - b).abs().amax(-1) / a.abs().amax(-1)).max().item()
        assert err <= 5e-2, f"step {step}: bf16 logits differ by {err:.2e} of their range"
        compared += 1
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            break
    assert compared >= 3, f"only {compared} steps compared"
