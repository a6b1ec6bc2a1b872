"""CPU tests: the paged decode attention twin against an independent dense formulation, the wrapper's CPU path and
its validation."""

import math

import pytest
import torch

from ringlinear.kernels import paged_attention as PA
from ringlinear.kernels.paged_attention import paged_decode_attention, plan_splits
from ringlinear.kernels.paged_attention_reference import paged_decode_attention_reference, paged_kv_bytes

TWIN_FP64_TOL = 1e-12  # fp64 twin vs fp64 dense oracle: only summation order differs
TWIN_FP32_TOL = 2e-6  # fp32 twin vs fp64 oracle: fp32 dot products over d <= 128 and softmax over <= ~300 keys


def make_case(B, H, Hkv, d, block_size, lengths, dtype=torch.float64, max_blocks=None, seed=0, garbage=True):
    """Random cache with shuffled, non-contiguous blocks per row; unused table entries hold garbage block ids."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    max_blocks = max_blocks or max(1, max(need))
    num_blocks = sum(need) * 2 + 3  # spare blocks never referenced by a used table entry
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, 1 << 20, (B, max_blocks), generator=g) if garbage else torch.zeros(B, max_blocks)
    tables = tables.to(torch.int64)
    used = 0
    for b, nb in enumerate(need):
        tables[b, :nb] = perm[used:used + nb]
        used += nb
    rows = num_blocks * block_size
    q = torch.randn(B, H, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(rows, Hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(rows, Hkv, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, tables, torch.tensor(lengths, dtype=torch.int64)


def dense_oracle(q, k, v, tables, lengths, block_size, scale):
    """Independent formulation: build each row's dense K/V position by position, masked fp64 softmax over the padded
    [B, Lmax] batch with every query head expanded to its own copy of the KV head."""
    B, H, d = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    lmax = max(1, max(lengths.tolist()))
    K = torch.zeros(B, lmax, Hkv, d, dtype=torch.float64)
    V = torch.zeros_like(K)
    for b in range(B):
        for p in range(int(lengths[b])):
            r = int(tables[b, p // block_size]) * block_size + p % block_size
            K[b, p], V[b, p] = k[r].double(), v[r].double()
    Kh = K.permute(0, 2, 1, 3).repeat_interleave(rep, dim=1)  # [B, H, L, d]
    Vh = V.permute(0, 2, 1, 3).repeat_interleave(rep, dim=1)
    s = torch.einsum("bhd,bhld->bhl", q.double(), Kh) * scale
    valid = torch.arange(lmax)[None, :] < lengths[:, None]
    s = s.masked_fill(~valid[:, None, :], -math.inf)
    w = torch.exp(s - s.amax(-1, keepdim=True).clamp_min(-1e300))
    w = w.masked_fill(~valid[:, None, :], 0.0)
    den = w.sum(-1, keepdim=True)
    o = torch.einsum("bhl,bhld->bhd", w, Vh) / torch.where(den > 0, den, torch.ones_like(den))
    return o


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


LENGTHS = [0, 1, 15, 16, 17, 33, 64, 100, 257]  # padding, single key, block boundaries, odd lengths


@pytest.mark.parametrize("rep", [1, 4])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("d", [64, 128])
def test_twin_matches_dense_oracle_fp64(rep, block_size, d):
    Hkv = 2
    q, k, v, t, n = make_case(len(LENGTHS), Hkv * rep, Hkv, d, block_size, LENGTHS, seed=rep * d + block_size)
    o = paged_decode_attention_reference(q, k, v, t, n, block_size)
    assert o.dtype == torch.float64
    ref = dense_oracle(q, k, v, t, n, block_size, d**-0.5)
    assert rel(o, ref) < TWIN_FP64_TOL
    assert torch.all(o[0] == 0)  # length 0: zeros


def test_twin_fp32_and_int32_indices_and_custom_scale():
    q, k, v, t, n = make_case(4, 8, 2, 64, 16, [5, 0, 48, 131], dtype=torch.float32, seed=3)
    o = paged_decode_attention_reference(q, k, v, t.to(torch.int32), n.to(torch.int32), 16, 0.3)
    assert o.dtype == torch.float32
    assert rel(o, dense_oracle(q, k, v, t, n, 16, 0.3)) < TWIN_FP32_TOL


def test_twin_single_key_returns_its_value():
    q, k, v, t, n = make_case(2, 4, 4, 64, 16, [1, 1], seed=5)
    o = paged_decode_attention_reference(q, k, v, t, n, 16)
    for b in range(2):
        row = int(t[b, 0]) * 16
        assert torch.equal(o[b], v[row])  # softmax over one key is exactly 1 (heads: h uses KV head h)


def test_twin_clamps_lengths_to_max_len():
    q, k, v, t, n = make_case(2, 4, 2, 64, 16, [40, 20], seed=7)
    o = paged_decode_attention_reference(q, k, v, t, n, 16, max_len=24)
    ref = dense_oracle(q, k, v, t, torch.tensor([24, 20]), 16, 64**-0.5)
    assert rel(o, ref) < TWIN_FP64_TOL


def test_twin_out_parameter():
    q, k, v, t, n = make_case(3, 4, 1, 64, 16, [3, 30, 0], dtype=torch.float32, seed=9)
    out = torch.full((3, 4, 64), 7.0)
    r = paged_decode_attention_reference(q, k, v, t, n, 16, out=out)
    assert r is out
    assert torch.equal(out, paged_decode_attention_reference(q, k, v, t, n, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wrapper_on_cpu_equals_twin(dtype):
    q, k, v, t, n = make_case(len(LENGTHS), 8, 2, 128, 16, LENGTHS, dtype=dtype, seed=11)
    o = paged_decode_attention(q, k, v, t, n, 16)
    assert o.dtype == dtype and o.shape == q.shape
    assert torch.equal(o, paged_decode_attention_reference(q, k, v, t, n, 16))
    out = torch.empty_like(q)
    assert paged_decode_attention(q, k, v, t, n, 16, 0.1, max_len=200, out=out) is out
    assert torch.equal(out, paged_decode_attention_reference(q, k, v, t, n, 16, 0.1, max_len=200))


def test_wrapper_does_not_read_lengths_or_tables_on_host(monkeypatch):
    """Everything the wrapper does before running a kernel must be host-free: poison every Tensor->host path and
    check the wrapper still reaches the compute step with the caller's tensors."""
    q, k, v, t, n = make_case(3, 4, 2, 64, 16, [5, 0, 40], dtype=torch.float32, seed=13)
    reached = {}

    def compute(*args, **kw):
        reached["args"] = args
        reached["kw"] = kw
        return "computed"

    def poisoned(*_a, **_k):
        raise AssertionError("the wrapper read a tensor on the host")

    monkeypatch.setattr(PA, "paged_decode_attention_reference", compute)
    for attr in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, attr, poisoned)
    assert paged_decode_attention(q, k, v, t, n, 16, max_len=48) == "computed"
    assert reached["args"][3] is t and reached["args"][4] is n and reached["kw"]["max_len"] == 48


def test_plan_splits_covers_max_len_in_whole_blocks():
    for max_len in (0, 1, 15, 16, 4096, 70001, 131072):
        for batch in (1, 3, 64, 256):
            for bs in (16, 32):
                split_len, splits = plan_splits(max_len, batch, 4, bs, 132)
                assert split_len % bs == 0 and split_len > 0 and splits >= 1
                assert split_len * splits >= max_len
                assert split_len * (splits - 1) < max(1, max_len)  # no empty trailing split
                assert splits <= max(1, -(-max_len // PA.MIN_SPLIT_KEYS))
    assert plan_splits(131072, 1, 4, 16, 132)[1] * 4 >= 132  # B=1 fills the GPU
    assert plan_splits(131072, 256, 4, 16, 132)[1] == 1  # large batches need no split


def test_kv_bytes():
    assert paged_kv_bytes([3, 0, -1, 5], 4, 128, 2) == 2 * 8 * 4 * 128 * 2


def _base():
    q, k, v, t, n = make_case(2, 8, 2, 64, 16, [5, 30], dtype=torch.float32, seed=17)
    return dict(q=q, k_cache=k, v_cache=v, block_tables=t, lengths=n, block_size=16)


BAD = [
    ("q", lambda a: a.update(q=a["q"][0])),
    ("q", lambda a: a.update(q=a["q"].double())),
    ("q", lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2))),
    ("q", lambda a: a.update(q=a["q"][..., :48].contiguous(), k_cache=a["k_cache"][..., :48].contiguous(),
                             v_cache=a["v_cache"][..., :48].contiguous())),
    ("k_cache", lambda a: a.update(k_cache=a["k_cache"].half())),
    ("k_cache", lambda a: a.update(k_cache=a["k_cache"][:, :, :32])),
    ("k_cache", lambda a: a.update(k_cache=a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1))),
    ("v_cache", lambda a: a.update(v_cache=a["v_cache"][:-1])),
    ("k_cache KV heads", lambda a: a.update(k_cache=torch.randn(a["k_cache"].shape[0], 3, 64),
                                            v_cache=torch.randn(a["k_cache"].shape[0], 3, 64))),
    ("q heads per KV head", lambda a: a.update(q=a["q"][:, :6].contiguous())),
    ("block_size", lambda a: a.update(block_size=7)),
    ("block_size", lambda a: a.update(block_size=0)),
    ("block_size", lambda a: a.update(block_size=16.0)),
    ("block_tables", lambda a: a.update(block_tables=a["block_tables"][0])),
    ("block_tables", lambda a: a.update(block_tables=a["block_tables"][:1])),
    ("block_tables", lambda a: a.update(block_tables=a["block_tables"].float())),
    ("lengths", lambda a: a.update(lengths=a["lengths"][:1])),
    ("lengths", lambda a: a.update(lengths=a["lengths"].float())),
    ("lengths", lambda a: a.update(lengths=[5, 30])),
    ("max_len", lambda a: a.update(max_len=10_000)),
    ("max_len", lambda a: a.update(max_len=-1)),
    ("max_len", lambda a: a.update(max_len=3.5)),
    ("scale", lambda a: a.update(scale=float("nan"))),
    ("out", lambda a: a.update(out=torch.empty(2, 8, 32))),
    ("out", lambda a: a.update(out=torch.empty(2, 8, 64, dtype=torch.float16))),
    ("out", lambda a: a.update(out=torch.empty(2, 64, 8).transpose(1, 2))),
]


@pytest.mark.parametrize("what,mutate", BAD, ids=[f"{w}-{i}" for i, (w, _) in enumerate(BAD)])
def test_validation_errors_name_the_argument(what, mutate):
    a = _base()
    mutate(a)
    with pytest.raises(ValueError, match=what):
        paged_decode_attention(**a)
