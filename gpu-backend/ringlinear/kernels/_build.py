"""Lazy JIT build of the CUDA extension (torch.utils.cpp_extension.load), so CPU installs never need nvcc."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "lightning_decode.cu", "lightning_prefill.cu", "moe.cu", "moe_stream.cu", "moe_wide.cu", "moe_tma.cu", "paged_attention.cu",
           "paged_attention_f32.cu", "paged_attention_bf16.cu", "paged_attention_f16.cu", "fused_elementwise.cu",
           "sampling.cu", "launch.cu", "gemv.cu")
# sm_90a: Hopper (H100/H200). The lightning prefill needs the a-suffixed target for wgmma; the other kernels use
# mma.sync/ldmatrix/cp.async (sm_80+). No --use_fast_math: decode/MoE want IEEE expf/sincosf (RoPE at large
# positions, router ties); the prefill's decay powers are a per-CTA table of exp2f values.
NVCC_FLAGS = ["-O3", "-gencode", "arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", "-lineinfo"]

_lock = threading.Lock()
_module = None
_error: Exception | None = None


class KernelUnavailable(RuntimeError):
    """The CUDA extension cannot be used here (no CUDA device, no nvcc, or the build failed)."""


def extension():
    """Build (first call only) and return the extension module; raise KernelUnavailable when impossible."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise KernelUnavailable(str(_error)) from _error
        if not torch.cuda.is_available():
            raise KernelUnavailable("no CUDA device")
        from torch.utils.cpp_extension import load

        try:
            _module = load(
                name="ringlinear_cuda",
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=["-O3"],
                extra_cuda_cflags=NVCC_FLAGS,
                extra_include_paths=[str(CSRC)],
                verbose=os.environ.get("RINGLINEAR_BUILD_VERBOSE") == "1",
            )
        except Exception as exc:  # noqa: BLE001 - any build failure makes the kernels unavailable
            _error = exc
            raise KernelUnavailable(f"building the CUDA extension failed: {exc}") from exc
        return _module


def available() -> bool:
    """True when the CUDA extension can be (or has been) built and a device is present."""
    try:
        extension()
        return True
    except KernelUnavailable:
        return False
