"""GPU tests: the sampling kernel (csrc/sampling.cu) against its twin on the same device, token for token.

The draw is defined on integer weights (sampling_reference.py), so the only way the two could differ is the fp32
exp of a logit, and both call the same CUDA expf: equality is exact, at Ring's vocabulary and at awkward sizes, on
peaked, flat, tied and degenerate rows, including buckets too large for the kernel's shared-memory candidates.
"""

import pytest
import torch

from ringlinear.kernels import available
from ringlinear.kernels.sampling import sample_rows
from ringlinear.kernels.sampling_reference import sample_rows_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RING_VOCAB = 157184


def _spec(cols):
    return torch.tensor(list(zip(*cols)), dtype=torch.float64)


def _mixed_columns(n_rows: int, V: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cols = []
    for i in range(n):
        t = [1.0, 0.7, 0.0, 1.3, 0.05][i % 5]
        k = [0, 0, 1, 40, 2000, V, V + 5][i % 7]
        p = [1.0, 0.95, 0.5, 1e-6, 0.9999, 0.8][i % 6]
        u = float(torch.rand(1, generator=g, dtype=torch.float64))
        cols.append((i % n_rows, t, k, p, u))
    cols += [(0, 1.0, 0, 0.9, 0.0), (0, 1.0, 0, 0.9, 1 - 2.0**-53), (n_rows - 1, 1.0, 50, 0.95, 1 - 2.0**-53)]
    return _spec(cols)


def _check(logits, spec):
    """Kernel = twin on all columns at once, and in pieces of 16, 33 and 66 columns: the kernel spreads a row over a
    cluster of 8, 4, 2 or 1 CTAs depending on the step's row count."""
    assert available(), "the CUDA extension did not build"
    want = sample_rows_reference(logits, spec)
    for piece in (spec.shape[1], 16, 33, 66):
        got = torch.cat([sample_rows(logits, spec[:, i:i + piece]) for i in range(0, spec.shape[1], piece)])
        torch.cuda.synchronize()
        bad = (got != want).nonzero()[:, 0].tolist()
        assert not bad, (f"pieces of {piece}: {len(bad)} of {spec.shape[1]} rows differ, first columns {bad[:5]}: "
                         f"{spec[:, bad[:5]].T.tolist()}")
    return got


@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 4.0, 25.0])
def test_kernel_equals_twin_at_ring_vocabulary(scale):
    g = torch.Generator(device="cuda").manual_seed(int(scale * 1000))
    logits = torch.randn(8, RING_VOCAB, device="cuda", generator=g) * scale
    logits[1] = torch.round(logits[1] * 4) / 4  # large tie groups
    logits[2, 1000:] = float("-inf")  # a short row
    logits[3, ::2] -= 40.0  # half the tokens below 2^-40 of the maximum
    _check(logits, _mixed_columns(8, RING_VOCAB, 120, seed=int(scale * 10)))


@pytest.mark.parametrize("V", [1, 3, 33, 4099, 8192 * 3 + 1])
def test_kernel_equals_twin_at_awkward_sizes_and_unaligned_rows(V):
    g = torch.Generator(device="cuda").manual_seed(V)
    base = torch.randn(5, V + 1, device="cuda", generator=g) * 3
    for logits in (base[:, :V], base[:, 1:]):  # row starts 16-byte aligned or not (float4 loads or scalar)
        _check(logits, _mixed_columns(5, V, 60, seed=V))


def test_one_bucket_larger_than_the_candidates():
    """Every token in one histogram bucket (equal or nearly equal logits): the kernel cannot gather the bucket into
    shared memory and refines it by passes over the row down to the last level."""
    V = RING_VOCAB
    equal = torch.zeros(1, V, device="cuda")
    near = (torch.arange(V, device="cuda") % 4096).float()[None] * 1e-6  # 4 096 distinct weights, each 38 times
    logits = torch.cat([equal, near, near.flip(1)])
    cols = [(r, 1.0, k, p, u) for r in range(3) for k in (0, 10, 9000) for p in (1.0, 0.5, 0.01) for u in (0.0, 0.37, 0.99)]
    _check(logits, _spec(cols))


def test_degenerate_rows_and_row_order():
    V = 1000
    logits = torch.randn(6, V, device="cuda")
    logits[0] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[3, 5] = float("nan")
    logits[4] = -0.0
    logits[4, 9] = 0.0
    cols = [(r, t, 0, p, 0.5) for r in (5, 4, 3, 2, 1, 0, 5, 5) for t, p in ((1.0, 1.0), (0.0, 1.0), (1.0, 0.9))]
    got = _check(logits, _spec(cols)).tolist()
    assert got[cols.index((0, 1.0, 0, 1.0, 0.5))] == 0 and got[cols.index((1, 1.0, 0, 1.0, 0.5))] == 7
    assert got[cols.index((4, 0.0, 0, 1.0, 0.5))] == 0  # -0.0 and 0.0 are equal: the first is the argmax


def test_no_host_sync():
    logits = torch.randn(64, RING_VOCAB, device="cuda")
    spec = _mixed_columns(64, RING_VOCAB, 256, seed=3)
    sample_rows(logits, spec)  # build and first-call setup outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample_rows(logits, spec)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (spec.shape[1],)


def test_top_p_target_is_rounded_up():
    """The kernel's P = ceil(top_p x Q), as the twin's (a nucleus a fraction of a weight unit above one token)."""
    logits = torch.tensor([[0.0, -1.0, float("-inf")]], device="cuda")
    w = torch.exp(logits[0, 1])  # the twin's q1, on this device
    q0, q1 = 2**40, int(float(w) * 2**40)
    cols = [(0, 1.0, 0, (q0 + 0.5) / (q0 + q1), 1 - 2.0**-53), (0, 1.0, 0, q0 / (q0 + q1), 1 - 2.0**-53)]
    assert _check(logits, _spec(cols)).tolist() == [1, 0]
