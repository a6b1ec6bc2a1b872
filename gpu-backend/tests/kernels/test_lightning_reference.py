"""CPU tests of the lightning reference twins, the prefill planner and the wrappers' validation / CPU fallback."""

import itertools
import math

import pytest
import torch

from ringlinear.kernels.lightning import lightning_decode, lightning_prefill, plan_prefill
from ringlinear.kernels.lightning_reference import (
    lightning_chunked_reference,
    lightning_decode_reference,
    lightning_prefill_reference,
    lightning_recurrent_reference,
    prefill_dram_bytes,
    rope_inv_freq,
    rope_neox_partial,
)

FP64_TOL = 1e-10  # chunked vs recurrent in float64: only rounding differs


def _gamma(H, dtype=torch.float64):
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=dtype)
    return torch.exp(-slopes * 0.7)


def _cu(lens):
    """cu_seqlens of sequences of these lengths."""
    return [0, *itertools.accumulate(lens)]


def _rand(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 100])
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("init", [False, True])
def test_chunked_equals_recurrent(T, chunk, init):
    H, d = 3, 8
    q, k, v = (_rand(T, H, d, seed=s) for s in (1, 2, 3))
    S0 = _rand(H, d, d, seed=4) if init else None
    o1, s1 = lightning_recurrent_reference(q, k, v, _gamma(H), initial_state=S0)
    o2, s2 = lightning_chunked_reference(q, k, v, _gamma(H), initial_state=S0, chunk=chunk)
    assert (o1 - o2).abs().max() <= FP64_TOL * o1.abs().max()
    assert (s1 - s2).abs().max() <= FP64_TOL * s1.abs().max()


def test_recurrent_matches_closed_form():
    # o_t = d^-1/2 sum_{j<=t} gamma^{t-j} (q_t . k_j) v_j
    T, H, d = 7, 2, 4
    q, k, v = (_rand(T, H, d, seed=s) for s in (5, 6, 7))
    gamma = _gamma(H)
    o, _ = lightning_recurrent_reference(q, k, v, gamma)
    for t in range(T):
        for h in range(H):
            want = sum(gamma[h] ** (t - j) * (q[t, h] @ k[j, h]) * v[j, h] for j in range(t + 1)) / math.sqrt(d)
            assert torch.allclose(o[t, h], want, atol=1e-12)


def test_decode_reference_continues_recurrence_and_skips_padding():
    T, H, d = 9, 2, 8
    q, k, v = (_rand(T + 1, H, d, seed=s) for s in (8, 9, 10))
    gamma = _gamma(H)
    o_all, s_all = lightning_recurrent_reference(q, k, v, gamma)
    _, s_T = lightning_recurrent_reference(q[:T], k[:T], v[:T], gamma)
    state = torch.zeros(4, H, d, d, dtype=torch.float64)
    state[2] = s_T
    before = state.clone()
    slots = torch.tensor([2, -1])
    qb = torch.stack([q[T], q[T]]); kb = torch.stack([k[T], k[T]]); vb = torch.stack([v[T], v[T]])
    o = lightning_decode_reference(qb, kb, vb, state, slots, gamma)
    assert torch.allclose(o[0], o_all[T], atol=1e-12)
    assert torch.allclose(state[2], s_all, atol=1e-12)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    for s in (0, 1, 3):
        assert torch.equal(state[s], before[s])


def test_rope_matches_complex_rotation():
    N, H, d, r = 5, 2, 16, 8
    x = _rand(N, H, d, seed=11, dtype=torch.float32)
    pos = torch.tensor([0, 1, 7, 100, 4096])
    inv = rope_inv_freq(r, 1e6)
    y = rope_neox_partial(x, pos, inv)
    half = r // 2
    z = torch.complex(x[..., :half].double(), x[..., half:r].double())
    ang = (pos.float()[:, None] * inv[None, :]).double()
    rot = z * torch.exp(1j * ang)[:, None, :]
    assert torch.allclose(y[..., :half].double(), rot.real, atol=1e-5)
    assert torch.allclose(y[..., half:r].double(), rot.imag, atol=1e-5)
    assert torch.equal(y[..., r:], x[..., r:])


def test_prefill_reference_varlen_with_empty_segment():
    H, d = 2, 8
    lens = [5, 0, 70, 1]
    cu = _cu(lens)
    T = cu[-1]
    q, k, v = (_rand(T, H, d, seed=s) for s in (12, 13, 14))
    gamma = _gamma(H)
    state = _rand(6, H, d, d, seed=15)
    init = state.clone()
    slots, use = [4, 1, 0, 3], [True, False, True, False]
    o = lightning_prefill_reference(q, k, v, state, cu, slots, gamma, use_initial_state=use, chunk=16)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        o_ref, s_ref = lightning_recurrent_reference(q[a:b], k[a:b], v[a:b], gamma, initial_state=init[slots[i]] if use[i] else None)
        assert torch.allclose(o[a:b], o_ref, atol=1e-10)
        assert torch.allclose(state[slots[i]], s_ref, atol=1e-10)
    assert torch.equal(state[1], torch.zeros(H, d, d, dtype=torch.float64))  # empty segment, no initial state
    for s in (2, 5):
        assert torch.equal(state[s], init[s])


@pytest.mark.parametrize("lens,block", [([4096], None), ([1, 0, 130, 64], 64), ([20000, 5], 1024), ([0], None)])
def test_plan_covers_every_token_once(lens, block):
    slots = list(range(len(lens)))
    plan = plan_prefill(lens, slots, [True] * len(lens), heads=16, num_sms=132, block_len=block)
    assert plan.block_len % 64 == 0
    covered = sorted((s, n) for s, n, _, _ in plan.items_out)
    pos = 0
    for s, n in covered:
        assert s == pos and 0 < n <= plan.block_len
        pos += n
    assert pos == sum(lens)
    finals = [slot for *_, slot in plan.items_out if slot >= 0]
    assert sorted(finals) == [s for s, n in zip(slots, lens) if n > 0]
    assert len(plan.items_state) == len(plan.items_out) - len(finals)
    assert all(n == plan.block_len for _, n, _, _ in plan.items_state)
    assert plan.n_ws == len(plan.items_out)


def _run_plan_in_float64(plan, q, k, v, state, gamma):
    """The CUDA kernel's three passes over a plan, each block through the chunked twin: pass 1 writes every block's
    delta but the last's, the scan turns them into entering states (reading each sequence's initial state from its
    slot), pass 3 runs the blocks in reverse, so that a block reading a slot its sequence's last block already
    overwrote, or a workspace entry nobody wrote, would show."""
    H, d = q.shape[1], q.shape[2]
    ws = torch.full((max(plan.n_ws, 1), H, d, d), float("nan"), dtype=torch.float64)
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    for start, n, w, _ in plan.items_state:
        ws[w] = lightning_chunked_reference(q[start:start + n], k[start:start + n], v[start:start + n], gamma, None,
                                            None)[1]
    for w0, nblk, blk_len, use_init, slot in plan.scan:
        S = state[slot].clone() if use_init else torch.zeros(H, d, d, dtype=torch.float64)
        if nblk == 0:
            state[slot] = S
        for b in range(nblk):
            delta, ws[w0 + b] = ws[w0 + b].clone(), S
            S = (gamma ** blk_len)[:, None, None] * S + delta
    for start, n, w, slot in reversed(plan.items_out):
        r = slice(start, start + n)
        out[r], S = lightning_chunked_reference(q[r], k[r], v[r], gamma, None, ws[w].clone())
        if slot >= 0:
            state[slot] = S
    return out


@pytest.mark.parametrize("n", [1, 64, 65, 200, 512])
def test_state_delta_walked_backwards_equals_the_forward_recurrence(n):
    """The CUDA state pass's order (csrc/lightning_prefill.cu): chunks last to first, each chunk's term scaled by
    gamma^(tokens after the chunk) * gamma^(Lc - 1 - s) per row s, summed without decaying the running sum. It must give
    the delta that the forward chunked recurrence leaves from a zero state."""
    H, d, C = 3, 16, 64
    q, k, v = (_rand(n, H, d, seed=s) for s in (21, 22, 23))
    gamma = _gamma(H)
    forward = lightning_chunked_reference(q, k, v, gamma, chunk=C)[1]
    lg2 = torch.log2(gamma)[:, None]
    S = torch.zeros(H, d, d, dtype=torch.float64)
    nchunks = -(-n // C)
    for c in reversed(range(nchunks)):
        Lc = min(C, n - c * C)
        after = n - c * C - Lc
        f = torch.exp2(after * lg2) * torch.exp2((Lc - 1 - torch.arange(Lc, dtype=torch.float64)) * lg2)  # [H, Lc]
        K, V = k[c * C:c * C + Lc].transpose(0, 1), v[c * C:c * C + Lc].transpose(0, 1)  # [H, Lc, d]
        S += K.transpose(1, 2) @ (V * f[..., None])
    assert torch.allclose(S, forward, atol=FP64_TOL, rtol=0)


@pytest.mark.parametrize("lens,block", [([700], 128), ([1, 0, 130, 64], 64), ([300, 0, 5, 129], 64), ([0, 0], 64)])
@pytest.mark.parametrize("init", [False, True, "mixed"])
def test_plan_passes_give_the_whole_sequences_results(lens, block, init):
    """The plan's three passes (block deltas, their scan onto each sequence's initial state, the blocks' outputs)
    reproduce the twin run over whole sequences: outputs, final states, empty sequences (zeroed without an initial
    state, kept with one) and untouched slots."""
    H, d = 2, 64
    T = sum(lens)
    q, k, v = (_rand(T, H, d, seed=s) for s in (1, 2, 3))
    gamma = _gamma(H)
    slots = [2 * i + 1 for i in range(len(lens))]  # the even slots are never named
    use = [init is True or (init == "mixed" and i % 2 == 0) for i in range(len(lens))]
    state = _rand(2 * len(lens) + 1, H, d, d, seed=4) * 0.1
    ref_state = state.clone()
    plan = plan_prefill(lens, slots, use, heads=H, num_sms=132, block_len=block)
    assert [nblk for _, nblk, *_ in plan.scan] == [-(-n // block) for n in lens]
    o = _run_plan_in_float64(plan, q, k, v, state, gamma)
    cu = _cu(lens)
    o_ref = lightning_prefill_reference(q, k, v, ref_state, cu, slots, gamma, use_initial_state=use)
    assert torch.allclose(o, o_ref, atol=FP64_TOL, rtol=0)
    assert torch.allclose(state, ref_state, atol=FP64_TOL, rtol=0)


@pytest.mark.parametrize("lens", [[4096], [131072], [700, 0, 5000]])
def test_prefill_dram_floor_counts_each_tensor_and_the_state_pass_reread(lens):
    """The benchmark's DRAM floor: q, k, v and o once, plus k and v again for every token a state-pass item walks."""
    H, D = 16, 128
    plan = plan_prefill(lens, list(range(len(lens))), [False] * len(lens), H, 132)
    T = sum(lens)
    state_tokens = sum(ln for _, ln, _, _ in plan.items_state)
    tile = torch.empty(T, H, D, dtype=torch.bfloat16, device="meta").nbytes
    kv_again = 2 * torch.empty(state_tokens, H, D, dtype=torch.bfloat16, device="meta").nbytes
    assert prefill_dram_bytes(T, H, D, state_tokens) == 4 * tile + kv_again
    assert prefill_dram_bytes(T, H, D) == 4 * tile  # a single pass
    if lens == [4096]:  # one wave of 16 heads x 8 blocks: the state pass walks all but the last 512 tokens
        assert state_tokens == 4096 - 512


@pytest.mark.parametrize(
    "lens,expected",
    [([4096], 512), ([8192], 1024), ([16384], 2048), ([32768], 4096), ([65536], 8192), ([131072], 16384),
     ([4096] * 4, 2048), ([16384] * 4, 8192), ([1000], 512), ([131072, 1024], 18752), ([300] * 20, 512),
     ([5000] * 20, 5056), ([0, 0], 512)],
)
def test_plan_block_length_is_one_wave_of_output_ctas(lens, expected):
    """The H200 sweep's best L at every measured shape: heads x blocks <= SMs (8 blocks per head at H=16, 132 SMs),
    never under 8 chunks, one block per sequence when the sequences alone exceed the SMs."""
    plan = plan_prefill(lens, list(range(len(lens))), [True] * len(lens), heads=16, num_sms=132)
    assert plan.block_len == expected
    live = [n for n in lens if n > 0]
    assert len(plan.items_out) == sum(-(-n // expected) for n in live)
    assert len(plan.items_out) * 16 <= max(132, 16 * len(live))


def test_wrappers_fall_back_to_the_twin_on_cpu():
    H, d = 2, 64
    lens = [3, 0, 66]
    cu = torch.tensor([0, 3, 3, 69])
    q, k, v = (_rand(69, H, d, seed=s, dtype=torch.float32) for s in (16, 17, 18))
    gamma = _gamma(H, torch.float32)
    st1 = _rand(3, H, d, d, seed=19, dtype=torch.float32)
    st2 = st1.clone()
    o1 = lightning_prefill(q, k, v, st1, cu, [2, 0, 1], gamma)
    o2 = lightning_prefill_reference(q, k, v, st2, cu, [2, 0, 1], gamma)
    assert torch.allclose(o1, o2.float()) and torch.allclose(st1, st2)
    assert len(lens) == 3
    qd, kd, vd = q[:2], k[:2], v[:2]
    st3 = st1.clone()
    od = lightning_decode(qd, kd, vd, st1, torch.tensor([0, 2]), gamma, q_norm_weight=torch.ones(d),
                          k_norm_weight=torch.ones(d), positions=torch.tensor([5, 9]), rotary_dim=32)
    od_ref = lightning_decode_reference(qd, kd, vd, st3, torch.tensor([0, 2]), gamma, q_norm_weight=torch.ones(d),
                                        k_norm_weight=torch.ones(d), positions=torch.tensor([5, 9]),
                                        inv_freq=rope_inv_freq(32, 1e6))
    assert torch.allclose(od, od_ref) and torch.allclose(st1, st3)


def test_qk_prologue_twin_is_qkv_prologue_then_prefill():
    """On the CPU a prefill handed raw q, k and a QKPrologue runs qkv_prologue's twin, then the prefill twin; rows()
    takes the tables (and positions) of a slice or of runs of rows, as the runner's cut rounds need."""
    from ringlinear.kernels.elementwise_reference import qkv_prologue_reference
    from ringlinear.kernels.lightning import QKPrologue
    from ringlinear.ops.rope import rope_cos_sin

    H, d, T = 2, 64, 40
    qkv = _rand(T, 3 * H * d, seed=31, dtype=torch.float32).to(torch.bfloat16) * 3
    pos = torch.arange(T) + 7
    cos, sin = rope_cos_sin(pos, 32, 1e4)
    qw, kw = torch.rand(d) + 0.5, torch.rand(d) + 0.5
    pro = QKPrologue(qw, kw, 1e-6, cos, sin, pos, 1e4)
    q_raw, k_raw, v = qkv.unflatten(1, (3 * H, d)).split(H, 1)
    gamma = _gamma(H, torch.float32)
    s1, s2 = torch.zeros(2, H, d, d), torch.zeros(2, H, d, d)
    o1 = lightning_prefill(q_raw, k_raw, v, s1, [0, 15, T], [1, 0], gamma, qk_prologue=pro)
    q, k, _ = qkv_prologue_reference(qkv, pos, H, H, d, silu=False, q_norm_weight=qw, k_norm_weight=kw, eps=1e-6,
                                     rotary_dim=32, rope_theta=1e4, out_dtype=torch.bfloat16)
    assert not torch.equal(q, q_raw.contiguous())
    o2 = lightning_prefill(q, k, v, s2, [0, 15, T], [1, 0], gamma)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    part = pro.rows([(3, 9), (20, 25)])
    assert torch.equal(part.cos, torch.cat([cos[3:9], cos[20:25]]))
    assert torch.equal(part.positions, torch.cat([pos[3:9], pos[20:25]]))
    assert torch.equal(pro.rows(slice(5, 10)).sin, sin[5:10]) and pro.rows(slice(5, 10)).rope_theta == 1e4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cu_seqlens=[0, 3, 2, 5]), "cu_seqlens"),
        (dict(cu_seqlens=[0, 4]), "cu_seqlens"),
        (dict(slots=[1, 1]), "slots"),
        (dict(slots=[0, 9]), "slots"),
        (dict(slots=[0]), "slots"),
        (dict(gamma=torch.ones(3)), "gamma"),
        (dict(state=torch.zeros(2, 2, 8, 8, dtype=torch.float64)), "state"),
        (dict(use_initial_state=[True]), "use_initial_state"),
    ],
)
def test_prefill_rejects_bad_input(kwargs, match):
    H, d = 2, 8
    args = dict(q=torch.zeros(5, H, d), k=torch.zeros(5, H, d), v=torch.zeros(5, H, d), state=torch.zeros(2, H, d, d),
                cu_seqlens=[0, 2, 5], slots=[0, 1], gamma=torch.ones(H))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lightning_prefill(**args)


def test_decode_rejects_bad_input():
    H, d = 2, 8
    q = torch.zeros(3, H, d)
    with pytest.raises(ValueError, match="shapes differ"):
        lightning_decode(q, torch.zeros(3, H, d + 1), q, torch.zeros(4, H, d, d), torch.arange(3), torch.ones(H))
    with pytest.raises(ValueError, match="slots"):
        lightning_decode(q, q, q, torch.zeros(4, H, d, d), torch.arange(2), torch.ones(H))
    with pytest.raises(ValueError, match="positions"):
        lightning_decode(q, q, q, torch.zeros(4, H, d, d), torch.arange(3), torch.ones(H), rotary_dim=4)
    with pytest.raises(ValueError, match="rotary_dim"):
        lightning_decode(q, q, q, torch.zeros(4, H, d, d), torch.arange(3), torch.ones(H), rotary_dim=3,
                         positions=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="prefetch_bytes"):
        lightning_decode(q, q, q, torch.zeros(4, H, d, d), torch.arange(3), torch.ones(H), prefetch_bytes=-1)
