"""GPU tests: the lightning CUDA kernels against their reference twins (skipped without CUDA)."""

import pytest
import torch

from ringlinear.kernels import DecodeGraphs, available
from ringlinear.kernels.elementwise import qkv_prologue
from ringlinear.kernels.lightning import (
    _rows_in_place, lightning_decode, lightning_prefill, prepare_prefill, run_prepared_prefill,
)
from ringlinear.kernels.lightning_reference import (
    lightning_decode_reference,
    lightning_prefill_reference,
    rope_inv_freq,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DECODE_REL = 1e-5  # fp32 kernel vs fp64 twin, max error relative to max |ref| (fp32 accumulation over d)
PREFILL_REL = 1.5e-2  # bf16 tensor-core operands (q, k, decayed k, state for q S, scores) and bf16 output
STATE_REL = 1e-2  # final fp32 state, built from bf16 products of k and v


def _gamma(H, device):
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    return torch.exp(-slopes * 0.9).to(device=device, dtype=torch.float32)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def test_extension_builds():
    assert available()


@pytest.mark.parametrize("B", [1, 5, 64])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_matches_twin(B, d, dtype, fused):
    torch.manual_seed(B * d + fused)
    H, n_slots, dev = 16, B + 3, "cuda"
    q, k, v = (torch.randn(B, H, d, device=dev).to(dtype) for _ in range(3))
    state = torch.randn(n_slots, H, d, d, device=dev)
    ref_state = state.double()
    slots = torch.randperm(n_slots, device=dev)[:B]
    if B > 1:
        slots[1] = -1  # a padding row
    gamma = _gamma(H, dev)
    kw = {}
    if fused:
        kw = dict(q_norm_weight=torch.rand(d, device=dev) + 0.5, k_norm_weight=torch.rand(d, device=dev) + 0.5,
                  positions=torch.randint(0, 100000, (B,), device=dev))
    o = lightning_decode(q, k, v, state, slots, gamma, rotary_dim=d // 2 if fused else 0, **kw)
    o_ref = lightning_decode_reference(q, k, v, ref_state, slots, gamma, inv_freq=rope_inv_freq(d // 2, 1e6, dev) if fused else None, **kw)
    assert torch.isfinite(o).all()
    assert _rel(o, o_ref) < DECODE_REL * (10 if fused else 1)
    assert _rel(state, ref_state) < DECODE_REL


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("cols", [32, 64])
def test_decode_block_widths_agree_with_twin(d, cols):
    torch.manual_seed(d + cols)
    B, H = 37, 16
    q, k, v = (torch.randn(B, H, d, device="cuda") for _ in range(3))
    state = torch.randn(B + 1, H, d, d, device="cuda")
    ref_state = state.double()
    slots = torch.randperm(B + 1, device="cuda")[:B]
    gamma = _gamma(H, "cuda")
    w = torch.rand(d, device="cuda") + 0.5
    pos = torch.randint(0, 5000, (B,), device="cuda")
    o = lightning_decode(q, k, v, state, slots, gamma, q_norm_weight=w, k_norm_weight=w, positions=pos, rotary_dim=32,
                         cols_per_block=cols)
    o_ref = lightning_decode_reference(q, k, v, ref_state, slots, gamma, q_norm_weight=w, k_norm_weight=w,
                                       positions=pos, inv_freq=rope_inv_freq(32, 1e6, "cuda"))
    assert _rel(o, o_ref) < DECODE_REL * 10
    assert _rel(state, ref_state) < DECODE_REL


@pytest.mark.parametrize("d,cols", [(64, 64), (128, 32), (128, 64)])
def test_decode_l2_read_ahead_changes_no_bit(d, cols):
    """The L2 read-ahead (each block prefetches a later block's state) at any distance - one pair, past the batch's
    end, onto padding and out-of-range rows - gives bitwise the outputs and states of the kernel without it.
    Targets inside the launch's first wave are not prefetched (at most 132 SMs x 8 blocks of one pair each on an
    H200: 1 056 pairs), so the batch is larger than that and the padding and out-of-range rows sit beyond it."""
    torch.manual_seed(d + cols)
    B, H = 96, 16
    q, k, v = (torch.randn(B, H, d, device="cuda").to(torch.bfloat16) for _ in range(3))
    state = torch.randn(B + 2, H, d, d, device="cuda")
    slots = torch.randperm(B + 2, device="cuda")[:B]
    slots[80], slots[90] = -1, B + 50  # a padding row, an out-of-range row (NaN output, state untouched)
    gamma = _gamma(H, "cuda")
    ref_state = state.clone()
    o_ref = lightning_decode(q, k, v, ref_state, slots, gamma, cols_per_block=cols, prefetch_bytes=0)
    for pairs in (1, 2, 5, 300, B * H - 1, B * H, 1 << 20):
        st = state.clone()
        o = lightning_decode(q, k, v, st, slots, gamma, cols_per_block=cols, prefetch_bytes=pairs * d * d * 4)
        assert torch.equal(st, ref_state), pairs
        assert torch.equal(o.nan_to_num(7.0), o_ref.nan_to_num(7.0)), pairs
    assert torch.isnan(o_ref[90]).all()
    with pytest.raises(ValueError, match="prefetch_bytes"):
        lightning_decode(q, k, v, state, slots, gamma, prefetch_bytes=-1)


def test_decode_out_of_range_slot_gives_nan_and_keeps_state():
    H, d = 4, 64
    q = torch.randn(2, H, d, device="cuda")
    state = torch.randn(3, H, d, d, device="cuda")
    before = state.clone()
    o = lightning_decode(q, q, q, state, torch.tensor([7, -1], device="cuda"), _gamma(H, "cuda"))
    assert torch.isnan(o[0]).all() and torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.equal(state, before)


def test_decode_graph_replay_matches_eager():
    H, d, n_slots = 16, 128, 40
    gamma = _gamma(H, "cuda")
    state_g = torch.randn(n_slots, H, d, d, device="cuda")
    state_e = state_g.clone()

    out_buf = {}

    def make(bp):
        out_buf[bp] = torch.empty(bp, H, d, device="cuda")
        return {"q": torch.empty(bp, H, d, device="cuda"), "k": torch.empty(bp, H, d, device="cuda"),
                "v": torch.empty(bp, H, d, device="cuda"), "slots": torch.empty(bp, dtype=torch.long, device="cuda")}

    def step(inp):
        out = out_buf[inp["q"].shape[0]]
        return lightning_decode(inp["q"], inp["k"], inp["v"], state_g, inp["slots"], gamma, out=out)

    graphs = DecodeGraphs(step, make, batch_sizes=(4, 8), pad={"slots": -1})
    for it in range(3):
        B = 5 + it
        inp = {"q": torch.randn(B, H, d, device="cuda"), "k": torch.randn(B, H, d, device="cuda"),
               "v": torch.randn(B, H, d, device="cuda"), "slots": torch.randperm(n_slots, device="cuda")[:B]}
        og = graphs(inp).clone()
        oe = lightning_decode(inp["q"], inp["k"], inp["v"], state_e, inp["slots"], gamma)
        assert torch.equal(og, oe)
        assert torch.equal(state_g, state_e)


def _cu(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


@pytest.mark.parametrize(
    "lens,block_len",
    [([1], None), ([63], None), ([100], None), ([4097], None), ([0, 300, 65, 1], None), ([4097, 700], 128),
     ([20000], None), ([3, 0, 2048], 64)],
)
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("init", [False, True])
def test_prefill_matches_twin(lens, block_len, d, init):
    torch.manual_seed(sum(lens) + d + init)
    H, dev = 16, "cuda"
    cu = _cu(lens)
    T = cu[-1]
    q, k, v = (torch.randn(T, H, d, device=dev).to(torch.bfloat16) for _ in range(3))
    n_slots = len(lens) + 2
    state = torch.randn(n_slots, H, d, d, device=dev) * 0.1
    ref_state = state.double()
    untouched = state[-1].clone()
    slots = torch.randperm(n_slots - 1).tolist()[: len(lens)]
    use = [init and i % 2 == 0 for i in range(len(lens))]
    gamma = _gamma(H, dev)
    o = lightning_prefill(q, k, v, state, torch.tensor(cu, device=dev, dtype=torch.int32), slots, gamma,
                          use_initial_state=use, block_len=block_len)
    o_ref = lightning_prefill_reference(q.double(), k.double(), v.double(), ref_state, cu, slots, gamma,
                                        use_initial_state=use)
    assert o.dtype == torch.bfloat16 and o.shape == q.shape
    assert torch.isfinite(o.float()).all()
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        if b > a:
            assert _rel(o[a:b], o_ref[a:b]) < PREFILL_REL, f"output of sequence {i}"
        assert _rel(state[slots[i]], ref_state[slots[i]]) < STATE_REL, f"state of sequence {i}"
    assert torch.equal(state[-1], untouched)


@pytest.mark.parametrize("lens,block_len", [([4097, 0, 700], 128), ([20000], None), ([1, 63], None)])
@pytest.mark.parametrize("jsplit", [1, 2])
def test_prefill_jsplit_variants_agree(lens, block_len, jsplit):
    torch.manual_seed(len(lens) + jsplit)
    H, d, dev = 16, 128, "cuda"
    cu = _cu(lens)
    q, k, v = (torch.randn(cu[-1], H, d, device=dev).to(torch.bfloat16) for _ in range(3))
    state = torch.randn(len(lens), H, d, d, device=dev) * 0.1
    ref_state = state.double()
    gamma = _gamma(H, dev)
    slots = list(range(len(lens)))
    o = lightning_prefill(q, k, v, state, cu, slots, gamma, block_len=block_len, jsplit=jsplit)
    o_ref = lightning_prefill_reference(q.double(), k.double(), v.double(), ref_state, cu, slots, gamma)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        if b > a:
            assert _rel(o[a:b], o_ref[a:b]) < PREFILL_REL, f"output of sequence {i}"
        assert _rel(state[i], ref_state[i]) < STATE_REL, f"state of sequence {i}"


@pytest.mark.parametrize("d,jsplit", [(128, 1), (128, 2), (64, 1)])
def test_prefill_rows_past_a_sequence_never_reach_its_state(d, jsplit):
    """A chunk that ends a sequence mid-tile is loaded whole (the kernel reads 64-token boxes), so its tail holds the
    next sequence's rows. Here those rows are inf: the neighbours' outputs and states must be bitwise what each
    sequence gives alone, and only the poisoned sequence goes non-finite."""
    torch.manual_seed(d + jsplit)
    H, dev = 16, "cuda"
    lens = [100, 50, 70]
    cu = _cu(lens)
    q, k, v = (torch.randn(cu[-1], H, d, device=dev).to(torch.bfloat16) for _ in range(3))
    k[cu[1]:cu[2]] = float("inf")
    v[cu[1]:cu[2]] = float("-inf")
    gamma = _gamma(H, dev)
    state0 = torch.randn(3, H, d, d, device=dev) * 0.1
    state = state0.clone()
    o = lightning_prefill(q, k, v, state, cu, [0, 1, 2], gamma, block_len=64, jsplit=jsplit)
    for i in (0, 2):
        a, b = cu[i], cu[i + 1]
        alone = state0[i:i + 1].clone()
        o_alone = lightning_prefill(q[a:b].clone(), k[a:b].clone(), v[a:b].clone(), alone, [0, b - a], [0], gamma,
                                    block_len=64, jsplit=jsplit)
        assert torch.equal(o[a:b], o_alone), f"output of sequence {i}"
        assert torch.equal(state[i], alone[0]), f"state of sequence {i}"
    assert not torch.isfinite(state[1]).all()


def test_prefill_then_decode_continues_the_sequence():
    H, d, T = 16, 128, 777
    torch.manual_seed(3)
    q, k, v = (torch.randn(T + 1, H, d, device="cuda").to(torch.bfloat16) for _ in range(3))
    gamma = _gamma(H, "cuda")
    state = torch.zeros(2, H, d, d, device="cuda")
    lightning_prefill(q[:T], k[:T], v[:T], state, [0, T], [1], gamma)
    o_dec = lightning_decode(q[T:], k[T:], v[T:], state, torch.tensor([1], device="cuda"), gamma)
    ref_state = torch.zeros(2, H, d, d, dtype=torch.float64, device="cuda")
    o_ref = lightning_prefill_reference(q.double(), k.double(), v.double(), ref_state, [0, T + 1], [1], gamma)
    assert _rel(o_dec[0], o_ref[T]) < PREFILL_REL
    assert _rel(state[1], ref_state[1]) < STATE_REL


@pytest.mark.parametrize("lens,block_len", [([1], None), ([4097, 700], 128), ([20000], None), ([3, 0, 2048], 64)])
@pytest.mark.parametrize("jsplit", [1, 2])
def test_prefill_reads_projection_views_in_place(lens, block_len, jsplit):
    """q, k, v as views of a projection's columns, each at a token stride of its own (v at the [T, 4 H d] qkv + gate
    GEMM output's stride, as qkv_prologue(v_in_place=True) returns it; q and k at two others) give bitwise the output
    and states of contiguous copies, and the wrapper reads them without copying."""
    torch.manual_seed(len(lens) + jsplit)
    H, d, dev = 16, 128, "cuda"
    T = sum(lens)
    proj = torch.randn(T, 4 * H * d, device=dev).to(torch.bfloat16)
    qbuf = torch.randn(T, 3 * H * d, device=dev).to(torch.bfloat16)
    kbuf = torch.randn(T, H * d + 64, device=dev).to(torch.bfloat16)
    views = (qbuf[:, H * d:2 * H * d].unflatten(1, (H, d)), kbuf[:, 64:].unflatten(1, (H, d)),
             proj[:, 2 * H * d:3 * H * d].unflatten(1, (H, d)))
    assert T == 1 or len({t.stride(0) for t in views}) == 3
    assert all(_rows_in_place(t).data_ptr() == t.data_ptr() for t in views)
    prep = prepare_prefill(lens, list(range(len(lens))), [True] * len(lens), H, d, dev, block_len, jsplit)
    state0 = torch.randn(len(lens), H, d, d, device=dev) * 0.1
    gamma = _gamma(H, dev)
    s_views, s_copies = state0.clone(), state0.clone()
    copies = [t.contiguous() for t in views]
    o_views = run_prepared_prefill(prep, *views, s_views, gamma)
    o_copies = run_prepared_prefill(prep, *copies, s_copies, gamma)
    assert torch.equal(o_views, o_copies) and torch.equal(s_views, s_copies)
    # the lightning layer's way: qkv_prologue writes q and k, v stays in the projection
    qkv = proj[:, :3 * H * d]
    pos = torch.arange(T, device=dev)
    kw = dict(silu=False, q_norm_weight=torch.rand(d, device=dev) + 0.5, k_norm_weight=torch.rand(d, device=dev) + 0.5,
              eps=1e-6, rotary_dim=64, rope_theta=1e6, out_dtype=torch.bfloat16)
    q, k, v = qkv_prologue(qkv, pos, H, H, d, v_in_place=True, **kw)
    assert v.data_ptr() == qkv.data_ptr() + 2 * H * d * qkv.element_size()
    assert v.stride(0) == 4 * H * d or T == 1  # (torch gives a single row the contiguous stride)
    q2, k2, v2 = qkv_prologue(qkv, pos, H, H, d, **kw)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    s_a, s_b = state0.clone(), state0.clone()
    assert torch.equal(run_prepared_prefill(prep, q, k, v, s_a, gamma), run_prepared_prefill(prep, q2, k2, v2, s_b, gamma))
    assert torch.equal(s_a, s_b)


@pytest.mark.parametrize("lens,block_len", [([1], None), ([4097, 700], 128), ([20000], None), ([3, 0, 2048], 64),
                                            ([63, 65, 129], 64)])
@pytest.mark.parametrize("jsplit", [1, 2])
def test_prefill_applies_the_qk_prologue_bitwise(lens, block_len, jsplit):
    """Raw q, k (the projection's columns) with a QKPrologue: bitwise qkv_prologue's q and k followed by the prefill -
    outputs and final states - whether the kernel applies it as it loads each chunk (jsplit 1) or the wrapper runs
    qkv_prologue first (jsplit 2); and as close to the fp64 twin as the prefill alone. Positions restart per sequence
    at distant offsets, the norm weights are away from 1 and the rows' scales vary, so every part of the prologue
    counts."""
    from ringlinear.kernels.lightning import QKPrologue
    from ringlinear.ops.rope import rope_cos_sin

    torch.manual_seed(7 * len(lens) + jsplit)
    H, d, dev = 16, 128, "cuda"
    T = sum(lens)
    proj = (torch.randn(T, 4 * H * d, device=dev) * torch.rand(T, 1, device=dev) * 4).to(torch.bfloat16)
    qkv = proj[:, :3 * H * d]
    pos = torch.cat([torch.arange(n, device=dev) + 50_000 * i for i, n in enumerate(lens)])
    qw, kw = torch.rand(d, device=dev) + 0.5, torch.rand(d, device=dev) + 0.5
    cos, sin = rope_cos_sin(pos, 64, 1e6)
    pro = QKPrologue(qw, kw, 1e-6, cos, sin, pos, 1e6)
    q_raw, k_raw, v = qkv.unflatten(1, (3 * H, d)).split(H, 1)
    slots = list(range(len(lens)))
    prep = prepare_prefill(lens, slots, [True] * len(lens), H, d, dev, block_len, jsplit)
    state0 = torch.randn(len(lens), H, d, d, device=dev) * 0.1
    gamma = _gamma(H, dev)
    s_fused, s_split = state0.clone(), state0.clone()
    o_fused = run_prepared_prefill(prep, q_raw, k_raw, v, s_fused, gamma, qk_prologue=pro)
    q, k, _ = qkv_prologue(qkv, pos, H, H, d, silu=False, q_norm_weight=qw, k_norm_weight=kw, eps=1e-6, rotary_dim=64,
                           rope_theta=1e6, out_dtype=torch.bfloat16, rope_cos_sin=(cos, sin))
    o_split = run_prepared_prefill(prep, q, k, v, s_split, gamma)
    assert torch.equal(o_fused, o_split) and torch.equal(s_fused, s_split)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    s_wrap = state0.clone()
    o_wrap = lightning_prefill(q_raw, k_raw, v, s_wrap, cu, slots, gamma, block_len=block_len, jsplit=jsplit,
                               qk_prologue=pro)
    assert torch.equal(o_wrap, o_split) and torch.equal(s_wrap, s_split)
    ref_state = state0.double()
    o_ref = lightning_prefill_reference(q.double(), k.double(), v.double(), ref_state, cu, slots, gamma)
    assert _rel(o_fused, o_ref) < PREFILL_REL
    assert _rel(s_fused, ref_state) < STATE_REL


def test_prefill_stamps_are_empty_in_the_normal_build():
    """The phase stamps and chunk-loop clocks (bench/profile_prefill_phases.py) exist only in a -DRL_PREFILL_STAMPS
    build."""
    from ringlinear.kernels import _build

    assert _build.extension().prefill_stamps().numel() == 0
    assert _build.extension().prefill_chunk_clocks().numel() == 0


def test_prefill_qk_prologue_rejects_bad_tables():
    """A QKPrologue whose tables do not match the rows fails by name before any launch."""
    from ringlinear.kernels.lightning import QKPrologue
    from ringlinear.ops.rope import rope_cos_sin

    H, d, T, dev = 2, 128, 100, "cuda"
    qkv = torch.randn(T, 3 * H * d, device=dev).to(torch.bfloat16)
    q, k, v = qkv.unflatten(1, (3 * H, d)).split(H, 1)
    pos = torch.arange(T, device=dev)
    cos, sin = rope_cos_sin(pos, 64, 1e6)
    w = torch.ones(d, device=dev)
    state = torch.zeros(1, H, d, d, device=dev)
    for bad, match in (((cos[:50], sin[:50]), "cos must be float32"), ((cos, sin.double()), "sin must be float32")):
        with pytest.raises(ValueError, match=match):
            lightning_prefill(q, k, v, state, [0, T], [0], _gamma(H, dev),
                              qk_prologue=QKPrologue(w, w, 1e-6, *bad, pos, 1e6))
    assert torch.count_nonzero(state) == 0
