"""GPU tests: the decode path's kernels launched as programmatic dependents (csrc/common.cuh) compute exactly what
plain launches do. Each kernel reads what the kernel before it wrote only after its griddepcontrol.wait, and before
the wait only weights, the lightning state and outputs two launches old; a kernel that broke this would read a stale
or half-written buffer, and its output would differ from the plain launch's. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from ringlinear import kernels as K
from ringlinear.kernels import _build
from ringlinear.kernels.moe import pack_moe
from ringlinear.kernels.moe_reference import RING_MINI_ROUTER
from ringlinear.ops.rope import rope_cos_sin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D, H, HD, E, I = 2048, 16, 128, 256, 512  # Ring-mini: hidden, heads, head dim, experts, expert width
LAYERS, BLOCK, CONTEXT = 4, 16, 4096


@pytest.fixture(scope="module", autouse=True)
def _needs_extension():
    if not _build.available():
        pytest.fail("CUDA is present but the ringlinear extension did not build")
    yield
    K.set_programmatic_launch(True)  # the default, whatever a failing test left


def _weights(seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s, scale=0.05: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    wg, wu, wd, shared = pack_moe(mk(E, I, D), mk(E, I, D), mk(E, D, I), (mk(I, D), mk(I, D), mk(D, I)))
    return dict(
        norm=[mk(D, scale=1.0).abs() + 0.5 for _ in range(2)],
        w_qkv=mk(3 * H * HD, D, scale=0.02), w_gate=mk(H * HD, D, scale=0.02), w_o=mk(D, H * HD, scale=0.02),
        qn=torch.rand(HD, device="cuda", generator=g) + 0.5, kn=torch.rand(HD, device="cuda", generator=g) + 0.5,
        gate_norm=torch.rand(H * HD, device="cuda", generator=g) + 0.5,
        gamma=torch.rand(H, device="cuda", generator=g) * 0.1 + 0.9,
        router=mk(E, D), bias=torch.randn(E, device="cuda", generator=g) * 0.01,
        experts=(wg, wu, wd, shared),
        k_cache=mk(CONTEXT + BLOCK, 4, HD, scale=1.0), v_cache=mk(CONTEXT + BLOCK, 4, HD, scale=1.0),
    )


def _decode_layers(x, pos, slots, tables, lengths, states, w):
    """LAYERS decode layers of N tokens through the kernel path, in the engine's order: add + norm, qkv projection
    (cuBLAS), prologue, lightning decode (state in place), paged attention over a shared KV cache (split + combine),
    gated norm, output projection, add + norm, the MoE's router, gate/up, down and combine."""
    N = x.shape[0]
    delta = None
    for layer in range(LAYERS):
        s, h = K.add_rms_norm(x, delta, w["norm"][0], 1e-6)
        qkv = h @ w["w_qkv"].T
        q, k, v = K.qkv_prologue(qkv, pos, H, H, HD, silu=True, q_norm_weight=w["qn"], k_norm_weight=w["kn"],
                                 eps=1e-6, rotary_dim=64, rope_theta=1e6)
        o = K.lightning_decode(q, k, v, states[layer], slots, w["gamma"])
        att = K.paged_decode_attention(q, w["k_cache"], w["v_cache"], tables, lengths, BLOCK)
        o = o + att.float()
        g = K.gated_group_rmsnorm(o.view(N, H * HD), h @ w["w_gate"].T, w["gate_norm"], 4, 1e-6)
        x, h = K.add_rms_norm(s, g @ w["w_o"].T, w["norm"][1], 1e-6)
        delta = K.fused_moe(h, w["router"], w["bias"], *w["experts"], RING_MINI_ROUTER)
    return x + delta


def _run(n_tokens: int, dependent: bool, graphed: bool, w: dict, steps: int = 4):
    """Outputs of `steps` consecutive decode steps (new hidden states each, the lightning states carried over) and
    the final states, with the kernels launched as programmatic dependents or plainly."""
    K.set_programmatic_launch(dependent)
    assert K.programmatic_launch() == dependent
    g = torch.Generator(device="cuda").manual_seed(100 + n_tokens)
    xs = [torch.randn(n_tokens, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(steps)]
    states = [torch.randn(n_tokens + 1, H, HD, HD, device="cuda", generator=g) * 0.01 for _ in range(LAYERS)]
    pos = torch.arange(CONTEXT - n_tokens, CONTEXT, device="cuda")
    slots = torch.arange(1, n_tokens + 1, device="cuda")  # slot 0 stays untouched
    lengths = (pos + 1).to(torch.int32)
    tables = torch.randperm(CONTEXT // BLOCK + 1, device="cuda", generator=g)[None].repeat(n_tokens, 1).to(torch.int32)
    x_in = torch.empty_like(xs[0])
    fn = lambda: _decode_layers(x_in, pos, slots, tables, lengths, states, w)  # noqa: E731
    outs = []
    if graphed:
        saved = [s.clone() for s in states]
        graph, out = K.graphs.capture_graph(fn)  # its warm-up call ran on the states: put them back
        for s, s0 in zip(states, saved):
            s.copy_(s0)
    for x in xs:
        x_in.copy_(x)
        if graphed:
            graph.replay()
            outs.append(out.clone())
        else:
            outs.append(fn())
    torch.cuda.synchronize()
    return outs, states


@pytest.mark.parametrize("graphed", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("n_tokens", [1, 2, 5])
def test_dependent_launches_change_no_bit(n_tokens, graphed):
    """1 and 2 tokens take the decode MoE kernels (one-token and two-token layouts), 5 the stream path; bitwise the
    same outputs at every step and the same lightning states, as one CUDA graph and eagerly."""
    w = _weights(7)
    plain, plain_states = _run(n_tokens, False, graphed, w)
    dep, dep_states = _run(n_tokens, True, graphed, w)
    for step, (a, b) in enumerate(zip(plain, dep)):
        assert torch.isfinite(a.float()).all()
        assert torch.equal(a, b), f"step {step}: dependent launches changed the output"
    for layer, (a, b) in enumerate(zip(plain_states, dep_states)):
        assert torch.equal(a, b), f"layer {layer}: dependent launches changed the lightning state"
    assert torch.equal(plain_states[0][0], dep_states[0][0])  # the untouched slot


def test_switch_is_read_at_launch():
    K.set_programmatic_launch(False)
    assert not K.programmatic_launch()
    K.set_programmatic_launch(True)
    assert K.programmatic_launch()
    with K.plain_launches():
        assert not K.programmatic_launch()
    assert K.programmatic_launch()  # restored
    assert not K.plain_launches()(K.programmatic_launch)()  # as a decorator: plain during each call
    assert K.programmatic_launch()


def _prefill_layers(x, prep, pos, cos, sin, states, w, fused: bool):
    """LAYERS prompt-step lightning layers: add + norm, qkv projection (cuBLAS), then either qkv_prologue (q, k
    written, v read in place) and the prefill, or the prefill with the QK prologue inside; the gated norm and output
    projection read its output. The prefill's state pass, scan and output pass sit in the middle of the chain."""
    T = x.shape[0]
    delta = None
    for layer in range(LAYERS):
        s, h = K.add_rms_norm(x, delta, w["norm"][0], 1e-6)
        qkv = h @ w["w_qkv"].T
        if fused:
            q, k, v = qkv.unflatten(1, (3 * H, HD)).split(H, 1)
            o = K.run_prepared_prefill(prep, q, k, v, states[layer], w["gamma"],
                                       qk_prologue=K.QKPrologue(w["qn"], w["kn"], 1e-6, cos, sin, pos, 1e6))
        else:
            q, k, v = K.qkv_prologue(qkv, pos, H, H, HD, silu=False, q_norm_weight=w["qn"], k_norm_weight=w["kn"],
                                     eps=1e-6, rotary_dim=64, rope_theta=1e6, out_dtype=torch.bfloat16,
                                     v_in_place=True)
            o = K.run_prepared_prefill(prep, q, k, v, states[layer], w["gamma"])
        g = K.gated_group_rmsnorm(o.reshape(T, H * HD).float(), h @ w["w_gate"].T, w["gate_norm"], 4, 1e-6)
        x, delta = s, g @ w["w_o"].T
    return x + delta


@pytest.mark.parametrize("graphed", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("fused", [True, False], ids=["qk-in-prefill", "qkv-prologue"])
def test_dependent_prefill_launches_change_no_bit(fused, graphed):
    """A prompt step's lightning layers (sequences of one and of several blocks, with and without an initial state):
    the scan and the output pass launched as dependents (the output pass loading its first tiles before the scan is
    done) give bitwise the plain launches' outputs and states."""
    w = _weights(11)
    lens = [700, 64, 0, 333]
    T = sum(lens)
    pos = torch.cat([torch.arange(n, device="cuda") for n in lens])
    cos, sin = rope_cos_sin(pos, 64, 1e6)
    slots = list(range(1, len(lens) + 1))  # slot 0 stays untouched
    prep = K.prepare_prefill(lens, slots, [i % 2 == 0 for i in range(len(lens))], H, HD, "cuda", block_len=128)
    g = torch.Generator(device="cuda").manual_seed(5)
    x0 = torch.randn(T, D, device="cuda", generator=g).to(torch.bfloat16)
    states0 = [torch.randn(len(lens) + 1, H, HD, HD, device="cuda", generator=g) * 0.01 for _ in range(LAYERS)]
    results = []
    for dependent in (False, True):
        K.set_programmatic_launch(dependent)
        states = [s.clone() for s in states0]
        x_in = x0.clone()
        fn = lambda: _prefill_layers(x_in, prep, pos, cos, sin, states, w, fused)  # noqa: E731
        if graphed:
            graph, out = K.graphs.capture_graph(fn)  # its warm-up call ran on the states: put them back
            for s, s0 in zip(states, states0):
                s.copy_(s0)
            graph.replay()
        else:
            out = fn()
        torch.cuda.synchronize()
        results.append((out.clone(), states))
    (a, sa), (b, sb) = results
    assert torch.isfinite(a.float()).all()
    assert torch.equal(a, b), "dependent launches changed the prompt step's output"
    for layer, (x, y) in enumerate(zip(sa, sb)):
        assert torch.equal(x, y), f"layer {layer}: dependent launches changed the lightning states"
        assert torch.equal(x[0], states0[layer][0])  # the untouched slot
