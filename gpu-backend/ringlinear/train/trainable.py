"""The reference model made trainable: initialisation, a batched MoE for speed, expert-bias balancing, export.

`BatchedMoE` computes every routed expert on every token and weights the outputs by the router's (sparse)
weights: unselected experts get weight 0, so the sum equals the reference `MoE` (which computes only the selected
experts in a Python loop), while running as three large matrix products. With 16 experts of width 64 the dense
product is as wide as one 1024-wide FFN, cheap on a GPU. `tests/train/test_trainable.py` checks the equality.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from ..checkpoint import expected_tensors
from ..config import RingLinearConfig
from ..model import MoE, RingLinearForCausalLM


class BatchedMoE(MoE):
    """Same parameters and names as `MoE`; dense-over-experts forward; records the expert load of the last call."""

    last_load: torch.Tensor | None = None

    def forward(self, x):  # x: [B, T, D]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        E, I, D = self.experts_gate_proj.shape
        with torch.autocast(device_type=x.device.type, enabled=False):  # router_dtype fp32, as at inference
            ids, weights = self.gate(x.float())
        # scatter_add rather than bincount: no host sync on CUDA
        self.last_load = torch.zeros(E, device=x.device).scatter_add_(0, ids.reshape(-1), torch.ones(ids.numel(), device=x.device))
        dense_w = torch.zeros(x.shape[0], E, dtype=weights.dtype, device=x.device).scatter(1, ids, weights)
        g = x @ self.experts_gate_proj.reshape(E * I, D).to(x.dtype).T  # [N, E*I]
        u = x @ self.experts_up_proj.reshape(E * I, D).to(x.dtype).T
        h = (F.silu(g) * u).view(-1, E, I) * dense_w.to(g.dtype)[..., None]
        down = self.experts_down_proj.permute(0, 2, 1).reshape(E * I, D)  # [E*I, D]: row e*I+i = down_e[:, i]
        out = h.reshape(-1, E * I) @ down.to(h.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)

    @classmethod
    def from_moe(cls, moe: MoE) -> "BatchedMoE":
        new = cls.__new__(cls)
        new.__dict__.update(moe.__dict__)  # shares the very same parameter, buffer and submodule dicts
        return new


def moe_layers(model: RingLinearForCausalLM) -> list[MoE]:
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]


def use_batched_moe(model: RingLinearForCausalLM) -> RingLinearForCausalLM:
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE) and not isinstance(layer.mlp, BatchedMoE):
            layer.mlp = BatchedMoE.from_moe(layer.mlp)
    return model


def init_model(cfg: RingLinearConfig, seed: int) -> RingLinearForCausalLM:
    """Normal(0, 0.02) projections and embeddings, output projections scaled by 1/sqrt(2L), norms 1, bias 0."""
    torch.manual_seed(seed)
    model = RingLinearForCausalLM(cfg)
    out_scale = 1 / math.sqrt(2 * cfg.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("dense.weight") or "down_proj" in name:
                p.normal_(0.0, 0.02 * out_scale)
            else:
                p.normal_(0.0, 0.02)
        for moe in moe_layers(model):
            moe.gate.expert_bias.zero_()
    return model


@torch.no_grad()
def update_expert_bias(model: RingLinearForCausalLM, rate: float) -> torch.Tensor | None:
    """Aux-loss-free balancing (architecture doc §4): bias += rate * sign(mean_load - load), then re-centred.

    Uses each MoE's load from its last forward; returns each layer's max/mean load ratio before the update
    (a device tensor, so the loop need not wait for the GPU), or None when no MoE has run since the last update.
    """
    imbalance = []
    for moe in moe_layers(model):
        load = getattr(moe, "last_load", None)
        if load is None:
            continue
        load = load.to(torch.float32)
        bias = moe.gate.expert_bias
        bias += rate * torch.sign(load.mean() - load).to(bias.device)
        bias -= bias.mean()
        imbalance.append(load.max() / load.mean().clamp(min=1e-9))
        moe.last_load = None
    return torch.stack(imbalance) if imbalance else None


_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts_(gate_proj|up_proj|down_proj)$")


def checkpoint_tensors(model: RingLinearForCausalLM, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names (one tensor per expert), `dtype` except the fp32 expert bias."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        m = _STACKED.match(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.experts.{e}.{m.group(2)}.weight"] = t[e].to(dtype).clone()
        elif name.endswith("expert_bias"):
            out[name] = t.to(torch.float32).clone()
        else:
            out[name] = t.to(dtype).clone()
    expected = expected_tensors(model.config)
    if set(out) != set(expected):
        raise RuntimeError(f"export names differ from the checkpoint table: {sorted(set(out) ^ set(expected))[:5]}")
    return out
