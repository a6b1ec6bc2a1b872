"""CPU tests: the GEMV wrapper's argument checks and its twin (what runs without CUDA)."""

import pytest
import torch

from ringlinear.kernels.gemv import GEMV_MAX_TOKENS, linear_small
from ringlinear.kernels.gemv_reference import linear_small_bytes, linear_small_reference


def test_twin_is_fp32_matmul_rounded_once():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(48, 64, generator=g).to(torch.bfloat16)
    ref = (x.double() @ w.double().t())
    y = linear_small(x, w)  # the twin on CPU
    assert y.dtype == torch.bfloat16 and y.shape == (2, 48)
    assert torch.equal(y, linear_small_reference(x, w))
    assert ((y.double() - ref).abs() <= ref.abs() * 2.0**-8 + 1e-6).all()  # one rounding to bf16 of an exact-ish sum
    out = torch.empty(2, 48, dtype=torch.bfloat16)
    assert linear_small(x, w, out=out) is out and torch.equal(out, y)
    assert linear_small_bytes(2, 48, 64) == (48 * 64 + 2 * 64 + 2 * 48) * 2


@pytest.mark.parametrize("x,w,out,match", [
    (torch.zeros(2, 8), torch.zeros(4, 16), None, "w is"),
    (torch.zeros(GEMV_MAX_TOKENS + 1, 8), torch.zeros(4, 8), None, "at most"),
    (torch.zeros(8), torch.zeros(4, 8), None, "x must be a 2-d"),
    (torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.float64), None, "share a floating dtype"),
    (torch.zeros(2, 8, dtype=torch.int32), torch.zeros(4, 8, dtype=torch.int32), None, "share a floating dtype"),
    (torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(2, 5), "out must be"),
    (torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(4, 2).t(), "out must be"),
])
def test_bad_arguments_name_what_is_wrong(x, w, out, match):
    with pytest.raises(ValueError, match=match):
        linear_small(x, w, out=out)
