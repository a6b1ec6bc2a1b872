"""Plain PyTorch operators of the Ring-linear model: the readable reference every fast kernel is tested against."""

from .norm import rms_norm, group_rms_norm
from .rope import apply_partial_rope, rope_cos_sin
from .lightning import lightning_naive, lightning_recurrent_step, lightning_chunked
from .router import route

__all__ = [
    "rms_norm", "group_rms_norm", "apply_partial_rope", "rope_cos_sin",
    "lightning_naive", "lightning_recurrent_step", "lightning_chunked", "route",
]


def accum_dtype(dtype):
    """fp64 stays fp64 (golden vectors); everything else accumulates in fp32."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32
