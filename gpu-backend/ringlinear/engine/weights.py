"""Random weights made directly on the device, for benchmarking a config without its checkpoint.

The model is built on the meta device in the target dtype, then materialised once on the device and filled in place:
projections and embeddings ~ N(0, 0.02), norm weights 1, router bias 0 (fp32, like checkpoints). No host copy of the
weights is ever made (Ring-mini-linear-2.0 in bf16 is ~33 GB).
"""

from __future__ import annotations

import torch

from ..config import RingLinearConfig
from ..model import RingLinearForCausalLM


def random_model(cfg: RingLinearConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> RingLinearForCausalLM:
    device = torch.device(device)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = RingLinearForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():
            b.zero_()
    return model.eval()
