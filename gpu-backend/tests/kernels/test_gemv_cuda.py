"""GPU tests: the decode projections' kernels (kernels.linear_small: the CUDA-core GEMV at one row, the mma kernel at
two to eight) against their twin and nn.Linear (skipped without CUDA)."""

import pytest
import torch

from ringlinear.kernels import _build
from ringlinear.kernels.gemv import GEMV_MAX_TOKENS, linear_small
from ringlinear.kernels.gemv_reference import linear_small_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def _needs_extension():
    if not _build.available():
        pytest.fail("CUDA is present but the ringlinear extension did not build")


def _close(y, ref):
    """Both sum the same fp32 products in different orders and round once to bf16: at most one bf16 step apart,
    relative to the magnitude of the terms (cancellation makes a single output's own magnitude the wrong scale)."""
    scale = ref.float().abs().amax().clamp_min(1e-6)
    err = ((y.float() - ref.float()).abs() / scale).max().item()
    assert err <= 2.0**-7, err


# Ring-mini's decode projections (lightning qkv + gate, softmax qkv, output, dense MLP, lm_head) and ragged shapes:
# rows of 33 and 641 16-byte chunks (a partial and several passes of a lane's 8 chunks), M not a multiple of 8 warps.
SHAPES = [(8192, 2048), (3072, 2048), (2048, 2048), (10240, 2048), (2048, 5120), (157184, 2048), (13, 264),
          (1001, 5128)]


@pytest.mark.parametrize("N", range(1, GEMV_MAX_TOKENS + 1))
@pytest.mark.parametrize("M,K", SHAPES)
def test_gemv_matches_twin_and_linear(M, K, N):
    g = torch.Generator(device="cuda").manual_seed(M + K + N)
    x = torch.randn(N, K, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(M, K, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)
    y = linear_small(x, w)
    assert y.shape == (N, M) and y.dtype == torch.bfloat16
    _close(y, linear_small_reference(x, w))
    _close(y, torch.nn.functional.linear(x, w))
    assert torch.equal(y, linear_small(x, w))  # deterministic


@pytest.mark.parametrize("ksplit", [1, 2, 4, 8])
@pytest.mark.parametrize("M,K", [(2048, 2048), (13, 264), (1001, 5128), (40, 8)])
def test_mma_kernel_every_k_split(M, K, ksplit):
    """The mma kernel at each K split the host may pick (and 1 to 8 rows, one included, which the runner sends to the
    GEMV): slices that end inside a 32-wide block, empty slices (K = 8 has one block), M past the last row group."""
    ext = _build.extension()
    g = torch.Generator(device="cuda").manual_seed(M * 7 + K + ksplit)
    w = (torch.randn(M, K, device="cuda", generator=g) * K**-0.5).to(torch.bfloat16)
    for N in range(1, GEMV_MAX_TOKENS + 1):
        x = torch.randn(N, K, device="cuda", generator=g).to(torch.bfloat16)
        y = torch.full((N, M), 7.0, device="cuda", dtype=torch.bfloat16)
        ext.skinny_gemm(x, w, y, ksplit)
        _close(y, linear_small_reference(x, w))


@pytest.mark.parametrize("N", [1, 3, 8])
def test_mma_kernel_fp32_out_is_the_fp32_gemm(N):
    """fp32 y (the MoE router's logits): the fp32 GEMM of the upcast operands up to the order of the sums."""
    ext = _build.extension()
    g = torch.Generator(device="cuda").manual_seed(50 + N)
    x = torch.randn(N, 2048, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(256, 2048, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    y = torch.empty(N, 256, device="cuda", dtype=torch.float32)
    ext.skinny_gemm(x, w, y, 0)
    ref = x.double() @ w.double().t()
    assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_mma_kernel_rejects_a_bad_split_and_too_many_rows():
    ext = _build.extension()
    x = torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(32, 64, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(2, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="ksplit"):
        ext.skinny_gemm(x, w, y, 3)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        ext.skinny_gemm(x, w, y.half(), 0)
    with pytest.raises(ValueError, match="at most 8 rows"):
        ext.skinny_gemm(torch.zeros(9, 64, device="cuda", dtype=torch.bfloat16), w,
                        torch.zeros(9, 32, device="cuda", dtype=torch.bfloat16), 0)


def test_gemv_strided_views_and_out():
    """Row-strided x and w (views of wider buffers, as the packed qkv + gate weight is) and a strided out."""
    g = torch.Generator(device="cuda").manual_seed(3)
    xb = torch.randn(2, 2048 + 64, device="cuda", generator=g).to(torch.bfloat16)
    wb = (torch.randn(4096, 2048 + 128, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x, w = xb[:, 64:], wb[:, :2048]
    ob = torch.full((2, 5000), 7.0, device="cuda", dtype=torch.bfloat16)
    out = ob[:, 100:4196]
    y = linear_small(x, w, out=out)
    assert y.data_ptr() == out.data_ptr()
    _close(out, linear_small_reference(x.contiguous(), w.contiguous()))
    assert (ob[:, :100] == 7).all() and (ob[:, 4196:] == 7).all()  # nothing written outside out


@pytest.mark.parametrize("N", [1, 3, 8])
def test_gemv_in_a_graph_reads_the_new_rows(N):
    g = torch.Generator(device="cuda").manual_seed(4)
    w = (torch.randn(2048, 2048, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x = torch.zeros(N, 2048, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(N, 2048, device="cuda", dtype=torch.bfloat16)
    linear_small(x, w, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linear_small(x, w, out=out)
    for seed in range(3):
        x.copy_(torch.randn(N, 2048, device="cuda", generator=g))
        graph.replay()
        _close(out, linear_small_reference(x, w))
