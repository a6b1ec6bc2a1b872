"""The runner's kernel path: dispatch on CPU, the kernel-path glue through the kernels' twins on CPU, and (CUDA only)
the kernels against the reference ops on the tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import greedy, make_engine, random_prompt, run_all

from ringlinear import kernels as K
from ringlinear.engine.runner import kernels_usable
from ringlinear.ops import lightning_recurrent_step


def _record_logits(eng, forced_tokens: bool = False):
    """Wrap the runner so every step's logits (or None) are kept. forced_tokens: the sampler gets logits that force a
    token fixed by (step, row), so engines whose logits differ by rounding still feed the same tokens and every step
    stays comparable."""
    log, execute = [], eng.runner.execute

    def wrapped(segs, feed=None):
        logits, snaps = execute(segs, feed)
        log.append(None if logits is None else logits.float().cpu())
        if forced_tokens and logits is not None:
            rows = torch.arange(logits.shape[0], device=logits.device)
            logits = logits.clone()
            logits[rows, (7919 * len(log) + 104729 * rows + 17) % logits.shape[1]] = 1e4
        return logits, snaps

    eng.runner.execute = wrapped
    return log


def _prologue_ab(model, run, **engine_kw):
    """run(eng) on three engines (every step size): one copying the lightning layers' v, one reading it in place from
    the projection, one also handing q and k raw to the prefill (which applies the QK-norm and RoPE). Per engine its
    logits per step, what run returned, and how many qkv_prologue calls took v_in_place and prefill calls a
    QKPrologue."""
    logs, outs, counts = [], [], []
    originals = {name: getattr(K, name) for name in ("qkv_prologue", "lightning_prefill", "run_prepared_prefill")}
    keys = {"qkv_prologue": "v_in_place", "lightning_prefill": "qk_prologue", "run_prepared_prefill": "qk_prologue"}
    for in_place, qk_raw in ((False, False), (True, False), (True, True)):
        eng = make_engine(model, cuda_graphs=False, **engine_kw)
        eng.runner.v_in_place, eng.runner.v_in_place_min_tokens = in_place, 0
        eng.runner.qk_prologue_in_prefill = qk_raw
        seen = {"v_in_place": 0, "qk_prologue": 0}

        def counted(name):
            def call(*a, **kw):
                seen[keys[name]] += kw.get(keys[name]) is not None and kw.get(keys[name]) is not False
                return originals[name](*a, **kw)
            return call

        for name in originals:
            setattr(K, name, counted(name))
        try:
            logs.append(_record_logits(eng))
            outs.append(run(eng))
        finally:
            for name, fn in originals.items():
                setattr(K, name, fn)
        counts.append(seen)
    return logs, outs, counts


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


def test_v_in_place_glue_through_twins_keeps_every_logit(tiny_ckpt):
    """The runner's v_in_place and raw q / k glue on CPU (a bf16 model, the kernels' twins): prompt-only steps hand
    the lightning layers v as a view of the projection (and q, k raw with a QKPrologue), chunked prompts and decodes
    beside them too; bitwise the logits of the same engine copying v."""
    from ringlinear.checkpoint import load_model

    model = load_model(tiny_ckpt, dtype=torch.bfloat16)
    logs, outs, counts = _prologue_ab(model, _scenario, max_batch=4, max_step_tokens=64, kernels=True)
    assert counts[0] == {"v_in_place": 0, "qk_prologue": 0}, counts
    assert counts[1]["v_in_place"] > 0 and counts[1]["qk_prologue"] == 0, counts
    assert counts[2]["v_in_place"] == 0 and counts[2]["qk_prologue"] > 0, counts
    assert outs[0] == outs[1] == outs[2]
    for log in logs[1:]:
        for step, (a, b) in enumerate(zip(logs[0], log)):
            assert (a is None) == (b is None)
            assert a is None or torch.equal(a, b), f"step {step}: logits differ"


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


def _decode_inputs(segs, slots=None, pad_after=()):
    """The runner's graph inputs for decode segments; a padding row (token 0, position 0, slot -1) after each index
    in pad_after."""
    ids, pos, sl = [], [], []
    for i, s in enumerate(segs):
        ids.append(s.tokens[0]), pos.append(s.start), sl.append(s.slot)
        if i in pad_after:
            ids.append(0), pos.append(0), sl.append(-1)
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return {"ids": t(ids), "pos": t(pos), "slots": t(sl)}


def test_graph_body_padding_rows_touch_nothing(tiny_model):
    """`_decode_step`, the function CUDA graphs capture, run eagerly over the twins: padding rows (slot -1) leave the
    real rows' logits, every linear state and every KV row but the cache's scratch row exactly as without them."""
    eng = make_engine(tiny_model, max_batch=4, max_step_tokens=256, kernels=True)
    reqs = [eng.add_request(random_prompt(n, seed), greedy(8)) for n, seed in ((40, 1), (9, 2), (23, 3))]
    while not all(r.output for r in reqs):
        eng.step()
    segs, _ = eng._schedule()
    assert len(segs) == 3 and all(s.decode for s in segs)
    runner = eng.runner
    runner._bind_tables(segs)
    states0 = {l: s.clone() for l, s in eng.states.states.items()}
    kv0 = {l: (eng.kv.k[l].clone(), eng.kv.v[l].clone()) for l in eng.kv.k}

    def run(inp):
        for l, s in eng.states.states.items():
            s.copy_(states0[l])
        for l in eng.kv.k:
            eng.kv.k[l].copy_(kv0[l][0]), eng.kv.v[l].copy_(kv0[l][1])
        with torch.inference_mode():
            logits = runner._decode_step(inp).clone()
        return logits, {l: s.clone() for l, s in eng.states.states.items()}, \
            {l: (eng.kv.k[l].clone(), eng.kv.v[l].clone()) for l in eng.kv.k}

    plain, st_plain, kv_plain = run(_decode_inputs(segs))
    padded, st_pad, kv_pad = run(_decode_inputs(segs, pad_after=(0, 2)))
    assert padded.shape[0] == 5
    real = torch.tensor([0, 2, 3])
    # CPU GEMMs may block differently for 3 and 5 rows: equal up to fp32 rounding
    torch.testing.assert_close(padded[real], plain, rtol=1e-5, atol=1e-5)
    for l in st_plain:
        torch.testing.assert_close(st_pad[l], st_plain[l], rtol=1e-5, atol=1e-5)
    scratch = eng.kv.scratch_row
    for l in kv_plain:
        for a, b in zip(kv_pad[l], kv_plain[l]):
            keep = torch.ones(a.shape[0], dtype=torch.bool)
            keep[scratch] = False
            torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
    # the step really wrote the new tokens' K/V (so the comparison above is not vacuous)
    l0 = next(iter(kv_plain))
    assert not torch.equal(kv_plain[l0][0], kv0[l0][0])


def test_decode_step_matches_mixed_step_path(tiny_model):
    """The same decode rows through `_decode_step` (device-derived tables, rows and lengths) and through the general
    step with a prompt chunk beside them (the mixed step's decode rows): equal logits for the decode rows."""
    ker = make_engine(tiny_model, max_batch=4, max_step_tokens=256, kernels=True)
    ref = make_engine(tiny_model, max_batch=4, max_step_tokens=256, kernels=False)
    outs = []
    for eng in (ker, ref):
        reqs = [eng.add_request(random_prompt(n, seed), greedy(12)) for n, seed in ((40, 1), (9, 2))]
        while not all(r.output for r in reqs):
            eng.step()
        late = eng.add_request(random_prompt(100, 4), greedy(2))  # a prompt chunk next to the decodes: mixed steps
        while eng.has_work():
            eng.step()
        outs.append([r.output for r in reqs + [late]])
    assert outs[0] == outs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_decode_matches_eager_decode_on_cuda(tiny_ckpt):
    """Decode steps replayed from CUDA graphs (padded to the captured batch sizes) against the same engine without
    graphs: the same greedy tokens, logits equal up to bf16 GEMM blocking differences between batch sizes."""
    from ringlinear.checkpoint import load_model

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    eager = make_engine(model, max_batch=6, max_step_tokens=64, cuda_graphs=False)
    graphed = make_engine(model, max_batch=6, max_step_tokens=64)  # auto: graphs on CUDA
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    log_e, log_g = _record_logits(eager), _record_logits(graphed)
    outs = []
    for eng in (eager, graphed):
        reqs = [eng.add_request(random_prompt(n, seed), greedy(10)) for n, seed in ((150, 1), (70, 2), (5, 3), (33, 4), (2, 5))]
        while eng.has_work():
            eng.step()
        outs.append([r.output for r in reqs])
    assert graphed.runner.graphs._graphs, "no decode graph was captured"
    compared = 0
    for step, (a, b) in enumerate(zip(log_e, log_g)):
        if a is None:
            continue
        err = ((a - b).abs().amax(-1) / a.abs().amax(-1)).max().item()
        assert err <= 2e-2, f"step {step}: graphed logits differ by {err:.2e} of their range"
        compared += 1
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            break
    assert compared >= 5
    assert graphed.runner.capture_decode_graphs() == len(graphed.runner.graphs.batch_sizes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dependent_launches_keep_every_logit_on_cuda(tiny_ckpt):
    """The engine's steps (decode graphs, mixed steps, prefill) with the kernels launched as programmatic dependents
    (the default) and plainly: bitwise the same logits at every step."""
    from ringlinear.checkpoint import load_model

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    logs, outs = [], []
    try:
        for dependent in (False, True):
            K.set_programmatic_launch(dependent)
            eng = make_engine(model, max_batch=6, max_step_tokens=64)
            logs.append(_record_logits(eng))
            reqs = [eng.add_request(random_prompt(n, seed), greedy(8)) for n, seed in ((150, 1), (70, 2), (5, 3), (1, 4))]
            while eng.has_work():
                eng.step()
            outs.append([r.output for r in reqs])
            assert eng.runner.graphs._graphs, "no decode graph was captured"
    finally:
        K.set_programmatic_launch(True)
    assert outs[0] == outs[1]
    assert len(logs[0]) == len(logs[1]) >= 8
    for step, (a, b) in enumerate(zip(*logs)):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b), f"step {step}: logits differ"


def test_moe_packing_keeps_the_model(tiny_ckpt):
    """The runner's MoE weight packing (gate and up as halves of one buffer, for one GEMM; the shared expert stored as
    expert E of the routed buffers, for the decode kernels): parameters become views of the buffers, values and the
    reference forward unchanged, and packing twice is a no-op."""
    from ringlinear.checkpoint import load_model
    from ringlinear.engine.runner import _pack_moe_weights

    model = load_model(tiny_ckpt)
    ids = torch.tensor([random_prompt(20, 9)])
    before = model(ids)[0]
    moe = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts_gate_proj"))
    sh = moe.shared_experts
    assert sh is not None, "the tiny checkpoint has a shared expert"
    params = lambda: (moe.experts_gate_proj, moe.experts_up_proj, moe.experts_down_proj,  # noqa: E731
                      sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
    old = [t.detach().clone() for t in params()]
    _pack_moe_weights(model)
    assert K.moe.packed_gate_up(moe.experts_gate_proj, moe.experts_up_proj) is not None
    assert K.moe.packed_gate_up(sh.gate_proj.weight, sh.up_proj.weight) is not None
    both = K.moe.shared_as_expert(*params()[:3], params()[3:])
    assert both is not None and both[0].shape[0] == moe.experts_gate_proj.shape[0] + 1
    assert torch.equal(both[2][-1], sh.down_proj.weight) and torch.equal(both[0][-1], sh.gate_proj.weight)
    assert all(torch.equal(a, b) for a, b in zip(params(), old))
    assert torch.equal(model(ids)[0], before)
    packed = [t.data_ptr() for t in params()]
    _pack_moe_weights(model)
    assert [t.data_ptr() for t in params()] == packed


def test_qkv_gate_packing_keeps_the_model(tiny_ckpt):
    """The lightning layers' qkv and gate projections stored as one buffer (one GEMM on the kernel path): views of it,
    values and the reference forward unchanged, packing twice a no-op."""
    from ringlinear.checkpoint import load_model
    from ringlinear.engine.runner import _pack_qkv_gate_weights

    model = load_model(tiny_ckpt)
    ids = torch.tensor([random_prompt(20, 9)])
    before = model(ids)[0]
    l = model.config.linear_layers[0]
    att = model.model.layers[l].attention
    qkv0, g0 = att.query_key_value.weight.detach().clone(), att.g_proj.weight.detach().clone()
    packed = _pack_qkv_gate_weights(model)
    assert sorted(packed) == sorted(model.config.linear_layers)
    both = packed[l]
    assert both.shape == (qkv0.shape[0] + g0.shape[0], qkv0.shape[1])
    assert att.query_key_value.weight.data_ptr() == both.data_ptr()
    assert torch.equal(both[: qkv0.shape[0]], qkv0) and torch.equal(both[qkv0.shape[0]:], g0)
    assert torch.equal(att.query_key_value.weight, qkv0) and torch.equal(att.g_proj.weight, g0)
    assert torch.equal(model(ids)[0], before)
    assert _pack_qkv_gate_weights(model)[l].data_ptr() == both.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warm_up_and_prefill_budget_on_cuda(tiny_ckpt):
    """The served configuration (a start-up warm-up, prompt-only steps of max_prefill_step_tokens, steps with decodes
    of max_step_tokens): the warm-up leaves no trace (the same tokens as without it), and a prompt's first-token logits
    match those of small steps (different chunk cuts: bf16 tolerance)."""
    from ringlinear.checkpoint import load_model

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    engines = {"warm": make_engine(model, max_batch=2, max_step_tokens=128, max_prefill_step_tokens=512),
               "cold": make_engine(model, max_batch=2, max_step_tokens=128, max_prefill_step_tokens=512),
               "small": make_engine(model, max_batch=2, max_step_tokens=128)}
    assert engines["warm"].warm_up().tokens == 512
    # the cuDNN plans of every chunk size bucket, at the tiny model's head shapes (Ring-mini's run in the benches)
    from ringlinear.ops.attention import cudnn_plan_shapes

    cfg = model.config
    shapes = cudnn_plan_shapes(4096, 131072, cfg.num_attention_heads, cfg.d_head)
    assert engines["warm"].runner.build_attention_plans(4096, 131072) == len(shapes) > 0
    outs, first = {}, {}
    for name, eng in engines.items():
        log = _record_logits(eng)
        a = eng.add_request(random_prompt(700, 11), greedy(6))  # alone: 512 + 188 vs 6 chunks of <= 128
        run_all(eng)
        first[name] = next(x for x in log if x is not None)
        b = eng.add_request(random_prompt(300, 12), greedy(4))
        c = eng.add_request(random_prompt(40, 13), greedy(12))
        run_all(eng)
        outs[name] = (a.output, b.output, c.output)
    assert outs["warm"] == outs["cold"]
    torch.testing.assert_close(first["warm"], first["cold"], rtol=0, atol=0)
    err = ((first["warm"] - first["small"]).abs().amax(-1) / first["small"].abs().amax(-1)).max().item()
    assert err <= 5e-2, f"first-token logits of 512-token vs 128-token steps differ by {err:.2e} of their range"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_step_queues_without_host_sync_on_cuda(tiny_ckpt):
    """A mixed step (decode rows beside prompt chunks) runs eagerly, so the host's launch rate bounds it: it must queue
    all its work without once waiting for the GPU (index tensors in one pinned copy, block tables likewise). torch's
    sync debug mode raises on any synchronising call inside the step."""
    from ringlinear.checkpoint import load_model

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    eng = make_engine(model, max_batch=4, max_step_tokens=64)
    execute, checked = eng.runner.execute, []

    def strict(segs, feed=None):
        if all(s.decode for s in segs) or all(not s.decode for s in segs):
            return execute(segs, feed)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = execute(segs, feed)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        checked.append(len(segs))
        return out

    eng.runner.execute = strict
    reqs = [eng.add_request(random_prompt(n, seed), greedy(12)) for n, seed in ((40, 1), (9, 2))]
    while not all(r.output for r in reqs):
        eng.step()
    late = [eng.add_request(random_prompt(n, seed), greedy(3)) for n, seed in ((150, 4), (100, 5))]
    while eng.has_work():
        eng.step()
    assert len(checked) >= 3 and all(r.output for r in late)


class _CountingPieces:
    """Wraps a runner's PieceGraphs to count the steps that replayed them (piece 0 runs once per step)."""

    def __init__(self, pieces):
        self.pieces, self.steps = pieces, 0
        self.eager, self.pool = pieces.eager, pieces.pool

    def __len__(self):
        return len(self.pieces)

    def __call__(self, i):
        self.steps += i == 0
        self.pieces(i)


def _count_pieces(eng):
    counting = [(n, _CountingPieces(g)) for n, g in eng.runner.step_graphs]
    eng.runner.step_graphs = counting
    return [c for _, c in counting]


def _mixed_scenario(eng):
    """Decodes beside a long prompt's 64-token chunks (66-row steps), then a short prompt beside up to 3 decodes
    (a ~32-row step), then the decodes alone."""
    reqs = [eng.add_request(random_prompt(n, seed), greedy(12)) for n, seed in ((20, 1), (7, 2))]
    while not all(r.output for r in reqs):
        eng.step()
    late = eng.add_request(random_prompt(300, 3), greedy(3))
    while not late.output:
        eng.step()
    short = eng.add_request(random_prompt(29, 4), greedy(2))
    run_all(eng)
    return [r.output for r in reqs + [late, short]]


def _assert_logits_close(logs, tol):
    assert len(logs[0]) == len(logs[1])
    for step, (a, b) in enumerate(zip(*logs)):
        assert (a is None) == (b is None)
        if a is not None:
            err = ((a - b).abs().amax(-1) / a.abs().amax(-1)).max().item()
            assert err <= tol, f"step {step}: logits differ by {err:.2e} of their range"


def test_step_pieces_on_padded_buffers_match_eager_steps(tiny_model):
    """The padded-buffer path of steps with prompt tokens (`capture_step_graphs(eager=True)`: the pieces run on the
    fixed buffers of 64, 96 or 128 rows, uncaptured, with the attention between them on the first n rows) gives the eager
    steps' tokens and logits; padding rows write their K/V to the scratch row only, so later steps agree too."""
    from ringlinear.engine.step_io import StepIO

    eager = make_engine(tiny_model, max_batch=4, max_step_tokens=128, max_prefill_step_tokens=256, kernels=True)
    padded = make_engine(tiny_model, max_batch=4, max_step_tokens=128, max_prefill_step_tokens=256, kernels=True)
    L = tiny_model.config.num_hidden_layers
    assert padded.runner.capture_step_graphs(128) == 0  # no decode graphs on CPU: nothing to capture
    assert padded.runner.capture_step_graphs(128, eager=True) == 3 * (L + 1)
    assert [n for n, _ in padded.runner.step_graphs] == [64, 96, 128]
    ios = padded.runner._step_io
    assert sorted(ios) == [64, 96, 128] and all(isinstance(io, StepIO) and io.x.shape[1] == n for n, io in ios.items())
    assert ios[64].x.data_ptr() == ios[128].x.data_ptr()  # the smaller size works on views of the larger's buffers
    counting = _count_pieces(padded)
    logs = [_record_logits(e) for e in (eager, padded)]
    assert _mixed_scenario(eager) == _mixed_scenario(padded)
    assert min(c.steps for c in counting) >= 1 and counting[1].steps >= 3, [c.steps for c in counting]  # 66 rows: 96
    _assert_logits_close(logs, 1e-4)
    # a prompt alone takes a step of 200 rows, more than the largest captured size: eager, and the same
    before = sum(c.steps for c in counting)
    lone = [e.add_request(random_prompt(200, 5), greedy(2)) for e in (eager, padded)]
    for e in (eager, padded):
        run_all(e)
    assert lone[0].output == lone[1].output and sum(c.steps for c in counting) == before
    _assert_logits_close(logs, 1e-4)


@pytest.mark.parametrize("padded", [False, True], ids=["eager", "padded"])
def test_segment_order_does_not_change_tokens(tiny_model, padded):
    """The engine puts a step's decodes first, so the runner reads their rows as views; in any other order it gathers
    them by index. Both give every request the same tokens, on the eager and the padded-buffer paths."""
    engines = [make_engine(tiny_model, max_batch=4, max_step_tokens=128, kernels=True) for _ in range(2)]
    if padded:
        for e in engines:
            e.runner.capture_step_graphs(128, eager=True)
    flipped, schedule = engines[1], engines[1]._schedule

    def prompts_first():
        segs, reqs = schedule()
        return segs[::-1], reqs[::-1]

    flipped._schedule = prompts_first
    assert _mixed_scenario(engines[0]) == _mixed_scenario(flipped)


def test_qkv_prologue_writes_given_buffers():
    """qkv_prologue(out=...) fills the caller's buffers (what a replayed piece needs) with the values it would return,
    and names a buffer of the wrong shape or dtype."""
    torch.manual_seed(0)
    N, H, d = 5, 2, 16
    qkv, pos = torch.randn(N, 3 * H * d), torch.arange(N)
    kw = dict(silu=True, q_norm_weight=torch.rand(d) + 0.5, k_norm_weight=torch.rand(d) + 0.5, eps=1e-6,
              rotary_dim=8, rope_theta=1e4, out_dtype=torch.float32)
    want = K.qkv_prologue(qkv, pos, H, H, d, **kw)
    bufs = tuple(torch.full((N, H, d), float("nan")) for _ in range(3))
    got = K.qkv_prologue(qkv, pos, H, H, d, **kw, out=bufs)
    for w, g, b in zip(want, got, bufs):
        assert g is b and torch.equal(g, w)
    with pytest.raises(ValueError, match="out k must be"):
        K.qkv_prologue(qkv, pos, H, H, d, **kw, out=(bufs[0], torch.zeros(N, H, d + 1), bufs[2]))
    with pytest.raises(ValueError, match="out v is missing"):
        K.qkv_prologue(qkv, pos, H, H, d, **kw, out=(bufs[0], bufs[1], None))


def test_piece_graphs_eager_runs_the_functions_in_order():
    calls = []
    pieces = K.PieceGraphs([lambda: calls.append(0), lambda: calls.append(1)], eager=True)
    assert len(pieces) == 2 and pieces.eager
    pieces(1)
    pieces(0)
    assert calls == [1, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_graphs_replay_the_mixed_steps_on_cuda(tiny_ckpt):
    """Steps that carry prompt tokens replay the pieces captured at the smallest size that holds them (64, 96 and 128
    rows for max_step_tokens 128), with the attention eager between the replays: the same tokens as fully eager steps,
    logits within bf16 noise (the GEMMs see other row counts), and both sizes really ran."""
    from ringlinear.checkpoint import load_model

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    eager = make_engine(model, max_batch=4, max_step_tokens=128)
    graphed = make_engine(model, max_batch=4, max_step_tokens=128)
    L = model.config.num_hidden_layers
    assert graphed.runner.capture_step_graphs(128) == 3 * (L + 1)
    assert [n for n, _ in graphed.runner.step_graphs] == [64, 96, 128]
    assert not any(g.eager for _, g in graphed.runner.step_graphs)
    assert graphed.runner.capture_step_graphs(128) == 3 * (L + 1)  # kept, not captured again
    counting = _count_pieces(graphed)
    logs = [_record_logits(e) for e in (eager, graphed)]
    assert _mixed_scenario(eager) == _mixed_scenario(graphed)
    assert min(c.steps for c in counting) >= 1 and counting[1].steps >= 3, [c.steps for c in counting]  # 66 rows: 96
    _assert_logits_close(logs, 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_piece_graphs_replay_on_the_callers_buffers_on_cuda():
    """PieceGraphs: each replay recomputes its piece from the buffers' current contents, pieces hand each other
    buffers, and a second set shares the first's pool."""
    w0, w1 = torch.randn(16, 16).cuda(), torch.randn(16, 16).cuda()
    x, y, z = (torch.zeros(8, 16, device="cuda") for _ in range(3))
    fns = [lambda: y.copy_(torch.relu(x @ w0)), lambda: z.copy_(y @ w1 + 1)]
    g = K.PieceGraphs(fns)
    assert len(g) == 2 and not g.eager
    for _ in range(3):
        x.copy_(torch.randn(8, 16))  # (drawn on the host: CUDA's generator refuses draws between captures here)
        g(0)
        torch.testing.assert_close(y, torch.relu(x @ w0))
        g(1)
        torch.testing.assert_close(z, torch.relu(x @ w0) @ w1 + 1)
    small = K.PieceGraphs([lambda: y[:4].copy_(x[:4] @ w1)], pool=g.pool)
    small(0)
    torch.testing.assert_close(y[:4], x[:4] @ w1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_v_in_place_keeps_every_logit_on_cuda():
    """Prompt-only bf16 steps leave the lightning layers' v in the projection (the prologue writes q and k, the prefill
    kernel reads v in place), and also q and k (the prefill kernel applies the QK-norm and RoPE as it loads them):
    the engine's steps with and without either give bitwise the same logits, at a head dim of 128 and with norm
    weights away from 1; the prompts cover one-round steps, a prompt cut into chunks, and decodes beside prompts
    (which copy v)."""
    from ringlinear.config import RingLinearConfig
    from ringlinear.engine.weights import random_model
    from ringlinear.tools.make_tiny import TINY

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    cfg = RingLinearConfig.from_dict({**TINY, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
                                       "group_norm_size": 2})
    model = random_model(cfg, "cuda", torch.bfloat16, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)

    def run(eng):
        first = eng.add_request(random_prompt(300, 1), greedy(4))
        while eng.has_work():
            eng.step()
        reqs = [first] + [eng.add_request(random_prompt(n, seed), greedy(4)) for n, seed in ((700, 2), (90, 3))]
        while eng.has_work():
            eng.step()
        return [r.output for r in reqs]

    logs, outs, counts = _prologue_ab(model, run, max_batch=4, max_step_tokens=512)
    assert counts[1]["v_in_place"] >= len(cfg.linear_layers), counts
    assert counts[2]["qk_prologue"] >= len(cfg.linear_layers) and counts[2]["v_in_place"] == 0, counts
    assert outs[0] == outs[1] == outs[2]
    assert len(logs[0]) == len(logs[1]) == len(logs[2])
    for log in logs[1:]:
        for step, (a, b) in enumerate(zip(logs[0], log)):
            assert (a is None) == (b is None)
            assert a is None or torch.equal(a, b), f"step {step}: logits differ"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["ring-mini-linear-2.0", "ring-flash-linear-2.0"])
def test_family_layer_shapes_match_reference_on_cuda(preset):
    """The kernel path at each released model's layer shapes (hidden size 2 048 / 4 096, 16 / 32 heads, a GQA group of
    4 / 8, output norm groups of 512 / 1 024 channels, 256 experts of 512 / 1 024 rows, the dense first layer), four
    layers deep, against the reference ops in fp32 on the same bf16 weights, as closely as the reference ops in bf16
    get: a 12 800-token prompt in one step (the MoE's TMA GEMMs, v read in place, cuDNN attention), graphed decodes,
    and short prompts beside them (mixed steps, chunk attention).
    The router's weights are zero and its bias tells the experts apart: a random router puts many tokens within
    rounding of an expert-choice boundary, and bf16 then picks other experts than fp32 in either path, 10-30% of the
    logits' norm (measured on the H200). The routing kernels are compared with their twin bitwise in tests/kernels."""
    import copy

    from ringlinear.config import RingLinearConfig
    from ringlinear.engine.weights import random_model
    from ringlinear.tools.params import PRESETS

    if not K.available():
        pytest.skip("CUDA extension unavailable")
    cfg = RingLinearConfig.from_dict({**PRESETS[preset], "num_hidden_layers": 4, "layer_group_size": 2})
    if torch.cuda.mem_get_info()[0] < 8 * cfg.parameter_counts()["total"]:  # bf16 + fp32 weights + activations
        pytest.skip(f"{preset}'s layers in bf16 and fp32 need more GPU memory")
    m16 = random_model(cfg, "cuda", torch.bfloat16, seed=11)
    with torch.no_grad():
        for name, p in m16.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.zero_()
        for name, b in m16.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.linspace(-1, 1, b.numel(), device=b.device)[torch.randperm(b.numel(), device=b.device)])
    m32 = copy.deepcopy(m16).float()

    def run(eng):
        eng.add_request(random_prompt(12_800, 1, cfg.vocab_size), greedy(3))
        while eng.has_work():
            eng.step()
        for n, seed in ((40, 2), (700, 3)):
            eng.add_request(random_prompt(n, seed, cfg.vocab_size), greedy(4))
        while eng.has_work():
            eng.step()

    kw = dict(max_batch=4, max_context=16_384, memory_budget=2 << 30, max_step_tokens=512,
              max_prefill_step_tokens=16_384)
    engines = {"ref32": make_engine(m32, kernels=False, **kw), "ref16": make_engine(m16, kernels=False, **kw),
               "kernels": make_engine(m16, **kw)}  # built last: it packs m16's MoE and qkv weights (views)
    assert engines["kernels"].runner.use_kernels and engines["kernels"].runner.graphs is not None
    logs = {name: _record_logits(eng, forced_tokens=True) for name, eng in engines.items()}
    for eng in engines.values():
        run(eng)
    steps = [i for i, a in enumerate(logs["ref32"]) if a is not None]
    assert len(steps) >= 6 and all(len(log) == len(logs["ref32"]) for log in logs.values())
    rel = {name: [((logs[name][i] - logs["ref32"][i]).norm(dim=-1) / logs["ref32"][i].norm(dim=-1)).max().item()
                  for i in steps] for name in ("ref16", "kernels")}
    # H200: 0.014-0.017 for both, per step; a 10% error in one layer's gate-norm weight gives 0.034-0.050
    for i, ours, ref in zip(steps, rel["kernels"], rel["ref16"]):
        assert ours <= 1.4 * ref + 2e-3, f"{preset} step {i}: {ours:.4f} of the logits' norm off fp32 (ref: {ref:.4f})"
    assert sum(rel["kernels"]) <= 1.15 * sum(rel["ref16"]), rel
