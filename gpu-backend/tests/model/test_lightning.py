"""Chain of trust for lightning attention: naive loop == recurrent steps == chunked form."""

import pytest
import torch

from ringlinear.ops import lightning_chunked, lightning_naive, lightning_recurrent_step

ATOL = 1e-10  # float64 inputs: the three forms are the same arithmetic up to summation order


def _inputs(B, T, H, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for _ in range(3))
    s = torch.tensor([0.7, 0.05, 0.003][:H], dtype=torch.float64)
    return q, k, v, s


@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 64, 65, 130])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_chunked_equals_naive_across_chunk_boundaries(T, with_state):
    q, k, v, s = _inputs(2, T, 3, 8)
    s0 = torch.randn(2, 3, 8, 8, dtype=torch.float64) if with_state else None
    o_ref, S_ref = lightning_naive(q, k, v, s, 8 ** -0.5, s0)
    for chunk in (16, 64):
        o, S = lightning_chunked(q, k, v, s, 8 ** -0.5, s0, chunk_size=chunk)
        torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(S, S_ref, atol=ATOL, rtol=0)


def test_chunked_fp32_state_stays_fp32_and_close():
    q, k, v, s = _inputs(1, 100, 3, 16)
    o64, S64 = lightning_chunked(q, k, v, s, 0.25)
    o32, S32 = lightning_chunked(q.float(), k.float(), v.float(), s.float(), 0.25)
    assert S32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, atol=1e-4, rtol=1e-4)


def test_recurrent_step_definition():
    """o_t uses the updated state: the token attends to itself, decayed history by exp(-s)."""
    q, k, v, s = _inputs(1, 1, 1, 4)
    S0 = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    o, S = lightning_recurrent_step(q[:, 0], k[:, 0], v[:, 0], s[:1], 0.5, S0)
    expect_S = torch.exp(-s[0]) * S0 + k[0, 0, 0][:, None] * v[0, 0, 0][None, :]
    torch.testing.assert_close(S[0, 0], expect_S[0, 0])
    torch.testing.assert_close(o[0, 0], 0.5 * q[0, 0, 0] @ expect_S[0, 0])


def test_split_prefill_hands_state_on():
    q, k, v, s = _inputs(1, 90, 2, 8)
    o_all, S_all = lightning_chunked(q, k, v, s, 1.0)
    o1, S1 = lightning_chunked(q[:, :37], k[:, :37], v[:, :37], s, 1.0)
    o2, S2 = lightning_chunked(q[:, 37:], k[:, 37:], v[:, 37:], s, 1.0, S1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all, atol=ATOL, rtol=0)
    torch.testing.assert_close(S2, S_all, atol=ATOL, rtol=0)
