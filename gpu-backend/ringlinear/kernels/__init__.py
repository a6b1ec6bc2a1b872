"""CUDA kernels of the GPU pod, each beside a plain PyTorch reference twin.

| kernel | wrapper | twin |
|---|---|---|
| lightning decode (in-place slot state, fused QK-norm + RoPE) | `lightning.lightning_decode` | `lightning_reference.lightning_decode_reference` |
| lightning varlen prefill (tensor cores, split across SMs; optionally the QK-norm + RoPE of raw q, k as it loads them) | `lightning.lightning_prefill` (`lightning.QKPrologue`) | `lightning_reference.lightning_prefill_reference` (after `qkv_prologue`) |
| MoE router / experts (optionally the residual add + next RMSNorm in the combine: `add_norm`) | `moe.route`, `moe.fused_moe` | `moe_reference.route_reference`, `moe_reference.moe_reference` (then `add_rms_norm`) |
| paged-KV GQA decode attention (block tables read in place, split-K) | `paged_attention.paged_decode_attention` | `paged_attention_reference.paged_decode_attention_reference` |
| fused attention elementwise (qkv split + silu + QK-norm + RoPE; group RMSNorm * sigmoid gate) | `elementwise.qkv_prologue`, `elementwise.gated_group_rmsnorm` | `elementwise_reference.qkv_prologue_reference`, `elementwise_reference.gated_group_rmsnorm_reference` |
| fused residual add + RMSNorm (s = x + delta; rms_norm(s)) | `elementwise.add_rms_norm` | `elementwise_reference.add_rms_norm_reference` |
| a step's token draws (temperature, top-k, top-p, inverse transform; no sort, no host sync) | `sampling.sample_rows` | `sampling_reference.sample_rows_reference` |
| a decode step's dense projections, a few rows (weights streamed from before the previous kernel ends) | `gemv.linear_small` | `gemv_reference.linear_small_reference` |
| programmatic dependent launch of the decode path's kernels (on by default; contract in csrc/common.cuh) | `launch.set_programmatic_launch` | plain launches (`False`) |
| decode CUDA graphs; a step's pieces between its attention calls, per row count (steps with prompt tokens) | `graphs.DecodeGraphs`, `graphs.PieceGraphs` | eager calls |

The extension is compiled on first use (torch.utils.cpp_extension.load, sm_90a); without CUDA every wrapper runs its
twin. `available()` says whether the compiled path is in use.
"""

from ._build import KernelUnavailable, available
from .elementwise import add_rms_norm, gated_group_rmsnorm, qkv_prologue
from .gemv import linear_small
from .graphs import DecodeGraphs, PieceGraphs
from .launch import plain_launches, programmatic_launch, set_programmatic_launch
from .lightning import (QKPrologue, lightning_decode, lightning_prefill, plan_prefill, prepare_prefill,
                        run_prepared_prefill)
from .moe import fused_moe, pack_experts, route
from .moe_reference import RING_MINI_ROUTER, RouterConfig
from .paged_attention import paged_decode_attention
from .paged_attention_reference import paged_decode_attention_reference
from .sampling import sample_rows
from .sampling_reference import sample_rows_reference

__all__ = [
    "qkv_prologue",
    "gated_group_rmsnorm",
    "add_rms_norm",
    "KernelUnavailable",
    "available",
    "DecodeGraphs",
    "PieceGraphs",
    "linear_small",
    "programmatic_launch",
    "plain_launches",
    "set_programmatic_launch",
    "lightning_decode",
    "QKPrologue",
    "lightning_prefill",
    "plan_prefill",
    "prepare_prefill",
    "run_prepared_prefill",
    "fused_moe",
    "pack_experts",
    "route",
    "RouterConfig",
    "RING_MINI_ROUTER",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "sample_rows",
    "sample_rows_reference",
]
