"""CPU tests of the fused elementwise twins (kernels/elementwise_reference.py) and their wrappers' validation.

The oracles below are the runner's own sequences (engine/runner.py `_lightning` / `_softmax`, as of this writing)
copied verbatim apart from the tensor plumbing, so the twins (and through the GPU tests, the kernels) are pinned to
what the runner computes today.
"""

import pytest
import torch
import torch.nn.functional as F

from ringlinear.kernels.elementwise import add_rms_norm, gated_group_rmsnorm, qkv_prologue
from ringlinear.kernels.elementwise_reference import (add_rms_norm_reference, gated_group_rmsnorm_reference,
                                                      qkv_prologue_reference)
from ringlinear.model import RMSNorm
from ringlinear.ops import accum_dtype, apply_partial_rope, group_rms_norm, rope_cos_sin

EPS = 1e-6
THETA = 1e6
# The default (fp32) QK-norm vs the softmax layers' bf16 QK-norm: two extra bf16 roundings before RoPE, each <= 1/2
# ulp (<= 2^-8 relative) of a value that RoPE mixes with its partner (|cos| + |sin| <= sqrt 2), plus the final
# rounding: within 2^-6 of the row's largest magnitude.
BF16_NORM_VS_FP32_NORM_REL = 4 * 2.0**-8


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _norm(d, seed, dtype):
    m = RMSNorm(d, EPS)
    with torch.no_grad():
        m.weight.copy_(0.5 + torch.rand(d, generator=torch.Generator().manual_seed(seed)))
    return m.to(dtype)


def _positions(N, seed):
    return torch.randint(0, 1_000_000, (N,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- oracles: the runner's sequences
def lightning_oracle(qkv_proj, pos, H, d, rot, linear_silu, use_qk_norm, qln, kln):
    acc = accum_dtype(qkv_proj.dtype)
    N = qkv_proj.shape[0]
    cos, sin = rope_cos_sin(pos[None], rot, THETA, acc)  # execute()
    qkv = qkv_proj[None].to(acc)  # att.query_key_value(h).to(self.acc)
    if linear_silu:
        qkv = F.silu(qkv)
    q, k, v = qkv.view(1, N, 3, H, d).unbind(2)
    if use_qk_norm:
        q, k = qln(q), kln(k)
    q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
    return q[0], k[0], v[0]


def softmax_oracle(qkv_proj, pos, H, Hkv, d, rot, use_qk_norm, qln, kln):
    acc = accum_dtype(qkv_proj.dtype)
    N = qkv_proj.shape[0]
    cos, sin = rope_cos_sin(pos[None], rot, THETA, acc)
    q, k, v = qkv_proj[None].view(1, N, H + 2 * Hkv, d).split([H, Hkv, Hkv], dim=2)
    if use_qk_norm:
        q, k = qln(q), kln(k)
    q = apply_partial_rope(q.to(acc), cos, sin).to(qkv_proj.dtype)[0]  # [N, H, d]
    k = apply_partial_rope(k.to(acc), cos, sin).to(qkv_proj.dtype)[0]  # [N, Hkv, d]
    return q, k, v[0]


def gate_oracle(o, g_proj, weight, group_norm_size, out_dtype):
    N, C = o.shape
    acc = accum_dtype(out_dtype)
    o = group_rms_norm(o.reshape(1, N, C), weight, group_norm_size, EPS)
    o = o * torch.sigmoid(g_proj[None].to(acc))
    return o.to(out_dtype)[0]


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), (a.double() - b.double()).abs().max()


# ------------------------------------------------------------------------- twins == oracles, bit for bit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("use_qk_norm", [False, True])
@pytest.mark.parametrize("d,rot", [(128, 64), (64, 32), (16, 8)])
@pytest.mark.parametrize("wrapper", [False, True])
def test_lightning_twin_is_the_runner_sequence(dtype, silu, use_qk_norm, d, rot, wrapper):
    N, H = 9, 3
    qkv = _rand(N, 3 * H * d, seed=d + rot, dtype=dtype)
    pos = _positions(N, seed=1)
    qln, kln = _norm(d, 2, dtype), _norm(d, 3, dtype)
    want = lightning_oracle(qkv, pos, H, d, rot, silu, use_qk_norm, qln, kln)
    fn = qkv_prologue if wrapper else qkv_prologue_reference
    got = fn(qkv, pos, H, H, d, silu=silu, q_norm_weight=qln.weight if use_qk_norm else None,
             k_norm_weight=kln.weight if use_qk_norm else None, eps=EPS, rotary_dim=rot, rope_theta=THETA,
             out_dtype=accum_dtype(dtype))
    for a, b in zip(got, want):
        _same(a, b.contiguous())
        assert a.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_qk_norm", [False, True])
@pytest.mark.parametrize("H,Hkv,d,rot", [(16, 4, 128, 64), (4, 2, 64, 32), (2, 2, 16, 16)])
@pytest.mark.parametrize("wrapper", [False, True])
def test_softmax_twin_is_the_runner_sequence(dtype, use_qk_norm, H, Hkv, d, rot, wrapper):
    N = 7
    qkv = _rand(N, (H + 2 * Hkv) * d, seed=H + d, dtype=dtype)
    pos = _positions(N, seed=4)
    qln, kln = _norm(d, 5, dtype), _norm(d, 6, dtype)
    want = softmax_oracle(qkv, pos, H, Hkv, d, rot, use_qk_norm, qln, kln)
    fn = qkv_prologue if wrapper else qkv_prologue_reference
    got = fn(qkv, pos, H, Hkv, d, silu=False, q_norm_weight=qln.weight if use_qk_norm else None,
             k_norm_weight=kln.weight if use_qk_norm else None, eps=EPS, rotary_dim=rot, rope_theta=THETA,
             out_dtype=dtype, norm_dtype=dtype)
    for a, b in zip(got, want):
        _same(a, b.contiguous())


def test_fp32_norm_on_bf16_projection_stays_within_two_bf16_ulps():
    N, H, Hkv, d = 33, 4, 2, 128
    qkv = _rand(N, (H + 2 * Hkv) * d, seed=7, dtype=torch.bfloat16)
    pos = _positions(N, seed=8)
    w = _norm(d, 9, torch.bfloat16).weight
    kw = dict(silu=False, q_norm_weight=w, k_norm_weight=w, eps=EPS, rotary_dim=64, rope_theta=THETA)
    exact = qkv_prologue_reference(qkv, pos, H, Hkv, d, norm_dtype=torch.bfloat16, **kw)
    fp32 = qkv_prologue_reference(qkv, pos, H, Hkv, d, **kw)
    for a, b in zip(fp32, exact):
        scale = b.double().abs().amax(-1, keepdim=True)
        assert ((a.double() - b.double()).abs() <= BF16_NORM_VS_FP32_NORM_REL * scale).all()
    assert not torch.equal(fp32[0], exact[0])  # the norm dtype matters: the option is not a no-op


@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("C,groups", [(2048, 4), (64, 1), (64, 16), (48, 3)])
@pytest.mark.parametrize("wrapper", [False, True])
def test_gate_twin_is_the_runner_sequence(gate_dtype, out_dtype, C, groups, wrapper):
    N = 6
    o = _rand(N, C, seed=C + groups)
    g = _rand(N, C, seed=11, dtype=gate_dtype)
    w = _norm(C, 12, out_dtype).weight  # g_norm.weight is in the model dtype
    want = gate_oracle(o, g, w, groups, out_dtype)
    fn = gated_group_rmsnorm if wrapper else gated_group_rmsnorm_reference
    _same(fn(o, g, w, groups, EPS, out_dtype), want)


def test_gate_groups_are_contiguous_slices_counted_by_groups():
    """`groups` is the number of groups (config group_norm_size), each C / groups contiguous channels."""
    N, C, G = 3, 32, 4
    o, g, w = _rand(N, C, seed=1, dtype=torch.float64), _rand(N, C, seed=2, dtype=torch.float64), torch.rand(C).double()
    y = gated_group_rmsnorm(o, g, w, G, EPS, torch.float64)
    s = C // G
    for j in range(G):
        sl = slice(j * s, (j + 1) * s)
        want = o[:, sl] / torch.sqrt((o[:, sl] ** 2).mean(-1, keepdim=True) + EPS) * w[sl] / (1 + torch.exp(-g[:, sl]))
        assert torch.allclose(y[:, sl], want, rtol=1e-12, atol=0)


def test_prologue_rope_at_position_zero_is_identity_and_norm_gives_unit_rms():
    N, H, d = 2, 2, 64
    qkv = _rand(N, 3 * H * d, seed=3, dtype=torch.float64)
    ones = torch.ones(d, dtype=torch.float64)
    q, k, v = qkv_prologue(qkv, torch.zeros(N, dtype=torch.int64), H, H, d, silu=False, q_norm_weight=ones,
                           k_norm_weight=None, eps=0.0, rotary_dim=d, rope_theta=THETA, out_dtype=torch.float64)
    qs, ks, vs = qkv.view(N, 3, H, d).unbind(1)
    assert torch.allclose((q**2).mean(-1), torch.ones(N, H, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(q, qs / qs.pow(2).mean(-1, keepdim=True).sqrt(), rtol=1e-12)
    _same(k, ks.contiguous())
    _same(v, vs.contiguous())


# ------------------------------------------------------------------------- shapes N = 0 / 1
@pytest.mark.parametrize("N", [0, 1])
def test_prologue_small_batches(N):
    H, Hkv, d = 4, 2, 64
    qkv = _rand(N, (H + 2 * Hkv) * d, seed=5, dtype=torch.bfloat16)
    w = torch.rand(d)
    q, k, v = qkv_prologue(qkv, torch.arange(N) + 123456, H, Hkv, d, silu=True, q_norm_weight=w, k_norm_weight=w,
                           eps=EPS, rotary_dim=32, rope_theta=THETA)
    assert q.shape == (N, H, d) and k.shape == v.shape == (N, Hkv, d) and q.dtype == torch.bfloat16
    if N:
        ref = qkv_prologue_reference(qkv, torch.arange(N) + 123456, H, Hkv, d, silu=True, q_norm_weight=w,
                                     k_norm_weight=w, eps=EPS, rotary_dim=32, rope_theta=THETA)
        for a, b in zip((q, k, v), ref):
            _same(a, b)


@pytest.mark.parametrize("N", [0, 1])
def test_gate_small_batches(N):
    o, g = _rand(N, 64, seed=1), _rand(N, 64, seed=2, dtype=torch.bfloat16)
    y = gated_group_rmsnorm(o, g, torch.rand(64), 2, EPS)
    assert y.shape == (N, 64) and y.dtype == torch.bfloat16


# ------------------------------------------------------------------------- validation
def _prologue_args(**over):
    H, Hkv, d = 4, 2, 64
    a = dict(qkv=torch.zeros(3, (H + 2 * Hkv) * d), positions=torch.arange(3), num_q_heads=H, num_kv_heads=Hkv,
             head_dim=d, silu=False, q_norm_weight=torch.ones(d), k_norm_weight=None, eps=EPS, rotary_dim=32,
             rope_theta=THETA)
    a.update(over)
    return a


@pytest.mark.parametrize("over,name", [
    (dict(qkv=torch.zeros(3, 4, 2)), "qkv"),
    (dict(qkv=torch.zeros(3, 512, dtype=torch.int32)), "qkv"),
    (dict(qkv=torch.zeros(3, 500)), "qkv has 500 columns"),
    (dict(num_q_heads=0), "num_q_heads"),
    (dict(num_kv_heads=1.5), "num_kv_heads"),
    (dict(head_dim=True), "head_dim"),
    (dict(positions=torch.arange(4)), "positions"),
    (dict(positions=torch.zeros(3)), "positions"),
    (dict(positions=[0, 1, 2]), "positions"),
    (dict(q_norm_weight=torch.ones(32)), "q_norm_weight"),
    (dict(k_norm_weight=torch.ones(64, 1)), "k_norm_weight"),
    (dict(silu=1), "silu"),
    (dict(eps=-1.0), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(rotary_dim=3), "rotary_dim"),
    (dict(rotary_dim=66), "rotary_dim"),
    (dict(rotary_dim=-2), "rotary_dim"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(out_dtype=torch.int8), "out_dtype"),
    (dict(norm_dtype=torch.int32), "norm_dtype"),
    (dict(v_in_place=1), "v_in_place"),
    (dict(v_in_place=True, silu=True), "v_in_place"),
    (dict(v_in_place=True, out_dtype=torch.bfloat16), "v_in_place"),
    (dict(v_in_place=True, out=(torch.zeros(3, 4, 64), torch.zeros(3, 2, 64), torch.zeros(3, 2, 64))), "v_in_place"),
])
def test_prologue_validation(over, name):
    a = _prologue_args(**over)
    with pytest.raises(ValueError, match=name):
        qkv_prologue(a.pop("qkv"), a.pop("positions"), a.pop("num_q_heads"), a.pop("num_kv_heads"),
                     a.pop("head_dim"), **a)


@pytest.mark.parametrize("over,name", [
    (dict(o=torch.zeros(2, 3, 64)), "o"),
    (dict(gate=torch.zeros(2, 32)), "gate"),
    (dict(gate=torch.zeros(2, 64, dtype=torch.int64)), "gate"),
    (dict(weight=torch.zeros(32)), "weight"),
    (dict(groups=0), "groups"),
    (dict(groups=5), "groups"),
    (dict(eps=-1e-6), "eps"),
    (dict(out_dtype=torch.bool), "out_dtype"),
])
def test_gate_validation(over, name):
    a = dict(o=torch.zeros(2, 64), gate=torch.zeros(2, 64), weight=torch.ones(64), groups=4, eps=EPS)
    a.update(over)
    with pytest.raises(ValueError, match=name):
        gated_group_rmsnorm(**a)


# ------------------------------------------------------------------------- residual add + RMSNorm
def residual_oracle(x, a, norm):
    """runner._forward: `x = x + a` then the next layer's norm (input_layernorm / post_attention_layernorm / final)."""
    if a is not None:
        x = x + a
    return x, norm(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("D", [64, 48, 2048, 20])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("wrapper", [False, True])
def test_add_rms_norm_twin_is_the_runner_sequence(dtype, D, with_delta, wrapper):
    N = 5
    x = _rand(N, D, seed=D, dtype=dtype) * 3
    a = _rand(N, D, seed=D + 1, dtype=dtype) if with_delta else None
    norm = _norm(D, 13, dtype)
    want_s, want_y = residual_oracle(x, a, norm)
    fn = add_rms_norm if wrapper else add_rms_norm_reference
    with torch.no_grad():
        s, y = fn(x, a, norm.weight, EPS)
    _same(s, want_s)
    _same(y, want_y)
    if with_delta:  # the add really rounds once in x's dtype (not a no-op, not kept in fp32)
        assert torch.equal(s, (x.double() + a.double()).to(dtype)) or dtype == torch.float64


def test_add_rms_norm_weight_is_cast_to_x_dtype_first():
    """An fp32 weight on bf16 rows: ops.rms_norm rounds the weight to bf16 before the product."""
    N, D = 4, 64
    x, a = _rand(N, D, seed=1, dtype=torch.bfloat16), _rand(N, D, seed=2, dtype=torch.bfloat16)
    w = 0.5 + torch.rand(D, generator=torch.Generator().manual_seed(3))
    s, y = add_rms_norm(x, a, w, EPS)
    norm = _norm(D, 0, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w.to(torch.bfloat16))
        _same(y, norm(x + a))


@pytest.mark.parametrize("wrapper", [False, True])
def test_add_rms_norm_without_delta_returns_x_itself(wrapper):
    x = _rand(3, 64, seed=4, dtype=torch.bfloat16)
    fn = add_rms_norm if wrapper else add_rms_norm_reference
    s, y = fn(x, None, torch.ones(64), EPS)
    assert s is x
    assert y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("N", [0, 1])
def test_add_rms_norm_small_batches(N):
    x, a = _rand(N, 64, seed=5, dtype=torch.bfloat16), _rand(N, 64, seed=6, dtype=torch.bfloat16)
    s, y = add_rms_norm(x, a, torch.ones(64), EPS)
    assert s.shape == y.shape == (N, 64) and s.dtype == y.dtype == torch.bfloat16


@pytest.mark.parametrize("over,name", [
    (dict(x=torch.zeros(1, 2, 64)), "x"),
    (dict(x=torch.zeros(2, 64, dtype=torch.int32)), "x"),
    (dict(x=[[0.0] * 64]), "x"),
    (dict(delta=torch.zeros(2, 32)), "delta"),
    (dict(delta=torch.zeros(2, 64, dtype=torch.float64)), "delta"),
    (dict(delta=torch.zeros(128)), "delta"),
    (dict(weight=torch.ones(32)), "weight"),
    (dict(weight=torch.ones(1, 64)), "weight"),
    (dict(weight=torch.ones(64, dtype=torch.int64)), "weight"),
    (dict(eps=-1e-6), "eps"),
    (dict(eps=float("inf")), "eps"),
    (dict(eps=None), "eps"),
])
def test_add_rms_norm_validation(over, name):
    a = dict(x=torch.zeros(2, 64), delta=torch.zeros(2, 64), weight=torch.ones(64), eps=EPS)
    a.update(over)
    with pytest.raises(ValueError, match=name):
        add_rms_norm(**a)


def test_prologue_kv_cache_rows_on_cpu():
    """kv_cache=(K, V, rows) on the twin: k and v scattered to the rows, the caches returned, q unchanged."""
    g = torch.Generator().manual_seed(4)
    N, H, Hkv, d = 5, 4, 2, 64
    qkv = torch.randn(N, (H + 2 * Hkv) * d, generator=g)
    pos = torch.arange(N)
    args = dict(silu=False, q_norm_weight=None, k_norm_weight=None, eps=1e-6, rotary_dim=32, rope_theta=1e4,
                out_dtype=torch.float32)
    q, k, v = qkv_prologue(qkv, pos, H, Hkv, d, **args)
    K, V = torch.zeros(9, Hkv, d), torch.zeros(9, Hkv, d)
    rows = torch.tensor([8, 0, 3, 5, 1])
    q2, K2, V2 = qkv_prologue(qkv, pos, H, Hkv, d, kv_cache=(K, V, rows), **args)
    assert K2 is K and V2 is V and torch.equal(q2, q)
    assert torch.equal(K[rows], k) and torch.equal(V[rows], v)
    assert not K[[2, 4, 6, 7]].any() and not V[[2, 4, 6, 7]].any()
    with pytest.raises(ValueError, match="kv_cache rows"):
        qkv_prologue(qkv, pos, H, Hkv, d, kv_cache=(K, V, rows[:3]), **args)


@pytest.mark.parametrize("out", [False, True])
def test_prologue_v_in_place_returns_the_projection_view(out):
    """v_in_place: q and k as the copying call computes them (into given buffers too), v a view of qkv's v columns
    that nothing writes (the caller's projection is left as it was)."""
    H, Hkv, d, N = 4, 2, 64, 5
    wide = torch.randn(N, (H + 2 * Hkv) * d + 64)
    qkv = wide[:, : (H + 2 * Hkv) * d]
    before = wide.clone()
    kw = dict(silu=False, q_norm_weight=torch.rand(d) + 0.5, k_norm_weight=torch.rand(d) + 0.5, eps=EPS, rotary_dim=32,
              rope_theta=THETA, out_dtype=torch.float32)
    bufs = (torch.empty(N, H, d), torch.empty(N, Hkv, d), None) if out else None
    q, k, v = qkv_prologue(qkv, torch.arange(N), H, Hkv, d, v_in_place=True, out=bufs, **kw)
    q2, k2, v2 = qkv_prologue(qkv, torch.arange(N), H, Hkv, d, **kw)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    assert v.data_ptr() == qkv[:, (H + Hkv) * d:].data_ptr() and v.stride() == (qkv.stride(0), d, 1)
    if out:
        assert q.data_ptr() == bufs[0].data_ptr() and k.data_ptr() == bufs[1].data_ptr()
    assert torch.equal(wide, before)
