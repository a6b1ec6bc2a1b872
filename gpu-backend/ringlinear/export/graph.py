"""The step graph exported to ONNX: the reference model's forward over T new tokens with every piece of
per-sequence state passed in and out explicitly (no Python state, no data-dependent control flow).

    inputs : input_ids int64 [T], position int64 [1] (tokens already consumed),
             state_{l} f32 [H, d, d] for each linear layer l,
             past_key_{l}, past_value_{l} f32 [Hkv, P, d] for each softmax layer l (P may be 0)
    outputs: logits f32 [T, V], state_out_{l} [H, d, d], present_key_{l}, present_value_{l} [Hkv, P+T, d]

T = 1 is a decode step; T > 1 is a prefill (or one prefill chunk: the engine may feed a long prompt in
pieces, the state carries across). The weights are the reference model's own modules, read at fp32.

Where the math differs in form (not in value) from ringlinear.model, and why:
- Lightning attention over the T tokens is the one-chunk form of `ops.lightning_chunked` (decay-masked
  q k^T v plus the decayed incoming state); every decay factor is exp(-rate * n) with n >= 0, so nothing
  overflows however long T is, and T = 1 reduces to the recurrent step.
- RoPE reads cos/sin from a table computed in float64 at export time (as the reference does per call),
  so positions are limited to the exported context length; rotate-half is a fixed +-1 matrix product.
- RMSNorm is written x / sqrt(mean(x^2) + eps) * w, which onnxruntime fuses into one node.
- The MoE router uses TopK, which ONNX defines to break ties towards the lower index, the reference's
  stable-sort rule. moe="gather": the selected experts' weights are gathered (only k experts per token are
  computed; best for decode). moe="dense": every expert runs as two wide matmuls and a routing matrix zeroes the
  unselected ones (E/k times the work, but plain GEMMs; better for long prefills).
- Softmax attention always applies an explicit causal mask over [P + T] keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RingLinearConfig
from ..model import RingLinearForCausalLM
from ..ops import group_rms_norm


MOE_FORMS = ("gather", "dense")


def step_io_names(cfg: RingLinearConfig) -> tuple[list[str], list[str]]:
    """Input and output names of the step graph, in order (the engines bind tensors by these names)."""
    ins, outs = ["input_ids", "position"], ["logits"]
    for l in range(cfg.num_hidden_layers):
        if cfg.is_softmax_layer(l):
            ins += [f"past_key_{l}", f"past_value_{l}"]
            outs += [f"present_key_{l}", f"present_value_{l}"]
        else:
            ins.append(f"state_{l}")
            outs.append(f"state_out_{l}")
    return ins, outs


def rope_table(cfg: RingLinearConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial NeoX RoPE as x * cos + (x @ R) * sin over the whole head (no slicing in the graph).

    cos, sin [max_positions, d]: the rotated dims' values computed in float64 like ops.rope_cos_sin (halves
    duplicated), then 1 and 0 for the pass-through dims. R [d, d] is rotate_half on the first r dims (entries
    0 / +-1, so x @ R is exact).
    """
    r, d = cfg.rot_dim, cfg.d_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    ang = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    cos = torch.cat([ang.cos(), torch.ones(max_positions, d - r, dtype=torch.float64)], -1)
    sin = torch.cat([ang.sin(), torch.zeros(max_positions, d - r, dtype=torch.float64)], -1)
    half = r // 2
    rot = torch.zeros(d, d)
    for j in range(half):
        rot[j + half, j] = -1.0  # rotate_half(u)[j] = -u[j + r/2]
        rot[j, j + half] = 1.0  # rotate_half(u)[j + r/2] = u[j]
    return cos.float(), sin.float(), rot


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos/sin [T, d] from rope_table."""
    return x * cos[:, None, :] + (x @ rot) * sin[:, None, :]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ops.rms_norm at fp32, written as x / sqrt(mean(x^2) + eps) * w: the pattern onnxruntime fuses into one
    SimplifiedLayerNormalization node (the reference's rsqrt-multiply form is left as five nodes)."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def route_topk(logits: torch.Tensor, bias: torch.Tensor | None, cfg: RingLinearConfig):
    """ops.router.route written with TopK (lower index wins ties, as ONNX specifies). logits [N, E] fp32."""
    N, E = logits.shape
    scores = torch.sigmoid(logits)
    biased = scores + bias if bias is not None else scores
    per_group = E // cfg.n_group
    grouped = biased.reshape(N, cfg.n_group, per_group)
    group_score = torch.topk(grouped, min(2, per_group), dim=-1).values.sum(-1)  # [N, n_group]
    keep = torch.topk(group_score, cfg.topk_group, dim=-1).indices  # [N, topk_group]
    group_ids = torch.arange(cfg.n_group, device=logits.device)
    kept = (keep[:, :, None] == group_ids[None, None, :]).any(1)  # [N, n_group]
    kept = kept[:, :, None].expand(N, cfg.n_group, per_group).reshape(N, E)
    masked = torch.where(kept, biased, torch.full_like(biased, float("-inf")))
    ids = torch.topk(masked, cfg.num_experts_per_tok, dim=-1).indices  # [N, k]
    weights = torch.gather(scores, 1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * cfg.routed_scaling_factor


class StepGraph(nn.Module):
    """Wraps a loaded reference model (fp32) as the explicit-state step function described above."""

    def __init__(self, model: RingLinearForCausalLM, max_positions: int, moe: str = "gather"):
        super().__init__()
        if moe not in MOE_FORMS:
            raise ValueError(f"moe must be one of {MOE_FORMS}, got {moe!r}")
        self.model = model
        self.cfg = cfg = model.config
        self.moe = moe
        if moe == "dense":
            # All experts as two wide matrices: gate/up [E*I, D] and down [E*I, D] (row e*I+i = expert e's column i).
            for l, layer in enumerate(model.model.layers):
                if not cfg.is_dense_layer(l):
                    mlp = layer.mlp
                    E, I, D = mlp.experts_gate_proj.shape
                    self.register_buffer(f"moe_gate_{l}", mlp.experts_gate_proj.detach().reshape(E * I, D).clone(), persistent=False)
                    self.register_buffer(f"moe_up_{l}", mlp.experts_up_proj.detach().reshape(E * I, D).clone(), persistent=False)
                    self.register_buffer(f"moe_down_{l}", mlp.experts_down_proj.detach().transpose(1, 2).reshape(E * I, D).clone(), persistent=False)
        cos, sin, rot = rope_table(cfg, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_rot", rot, persistent=False)
        for l in cfg.linear_layers:
            self.register_buffer(f"decay_{l}", torch.tensor(cfg.decay_rates(l), dtype=torch.float32), persistent=False)

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *states: torch.Tensor):
        cfg, m = self.cfg, self.model.model
        T = input_ids.shape[0]
        pos = position.reshape(1) + torch.arange(T, device=input_ids.device)  # [T]
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = m.word_embeddings(input_ids)  # [T, D]
        it = iter(states)
        outs: list[torch.Tensor] = []
        for l, layer in enumerate(m.layers):
            h = rms_norm(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
            if layer.is_softmax:
                past_k, past_v = next(it), next(it)
                a, k, v = self._softmax(layer.attention, h, pos, cos, sin, past_k, past_v)
                outs += [k, v]
            else:
                a, s = self._lightning(layer.attention, h, cos, sin, next(it), getattr(self, f"decay_{l}"))
                outs.append(s)
            x = x + a
            h = rms_norm(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
            x = x + (self._dense_ffn(layer.mlp, h) if cfg.is_dense_layer(l) else self._moe(l, layer.mlp, h))
        x = rms_norm(x, m.norm.weight, cfg.rms_norm_eps)
        return (self.model.lm_head(x), *outs)

    # ---------------------------------------------------------------- layers

    def _qk_norm(self, attn, q, k):
        if self.cfg.use_qk_norm:
            q = rms_norm(q, attn.query_layernorm.weight, self.cfg.rms_norm_eps)
            k = rms_norm(k, attn.key_layernorm.weight, self.cfg.rms_norm_eps)
        return q, k

    def _lightning(self, attn, x, cos, sin, state, rate):
        cfg = self.cfg
        T = x.shape[0]
        H, d = cfg.num_attention_heads, cfg.d_head
        qkv = attn.query_key_value(x)
        if cfg.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.reshape(T, 3, H, d).unbind(1)  # [T, H, d] each
        q, k = self._qk_norm(attn, q, k)
        q, k = _rope(q, cos, sin, self.rope_rot), _rope(k, cos, sin, self.rope_rot)
        q = q.transpose(0, 1) * d ** -0.5  # [H, T, d]
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        i = torch.arange(T, device=x.device).to(torch.float32)
        diff = i[:, None] - i[None, :]  # [T, T]
        r = rate[:, None, None]  # [H, 1, 1]
        mask = torch.exp(-r * diff.clamp(min=0)) * (diff >= 0).to(torch.float32)  # [H, T, T]
        intra = ((q @ k.transpose(1, 2)) * mask) @ v
        inter = (q * torch.exp(-rate[:, None] * (i + 1))[..., None]) @ state
        o = (intra + inter).transpose(0, 1).reshape(T, H * d)
        k_decayed = k * torch.exp(-rate[:, None] * (T - 1 - i))[..., None]
        new_state = torch.exp(-rate * T)[:, None, None] * state + k_decayed.transpose(1, 2) @ v
        o = group_rms_norm(o, attn.g_norm.weight, cfg.group_norm_size, cfg.rms_norm_eps)
        o = o * torch.sigmoid(attn.g_proj(x))
        return attn.dense(o), new_state

    def _softmax(self, attn, x, pos, cos, sin, past_k, past_v):
        cfg = self.cfg
        T = x.shape[0]
        H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.d_head
        q, k, v = attn.query_key_value(x).reshape(T, H + 2 * Hkv, d).split([H, Hkv, Hkv], dim=1)
        q, k = self._qk_norm(attn, q, k)
        q, k = _rope(q, cos, sin, self.rope_rot).transpose(0, 1), _rope(k, cos, sin, self.rope_rot).transpose(0, 1)  # [H, T, d], [Hkv, T, d]
        k = torch.cat([past_k, k], 1)  # [Hkv, P+T, d]
        v = torch.cat([past_v, v.transpose(0, 1)], 1)
        rep = H // Hkv
        qg = q.reshape(Hkv, rep * T, d)  # query heads grouped by their kv head (GQA without copying K/V)
        scores = (qg @ k.transpose(1, 2)) * d ** -0.5  # [Hkv, rep*T, P+T]
        key_pos = torch.arange(k.shape[1], device=x.device)
        allowed = key_pos[None, :] <= pos[:, None]  # [T, P+T]: key j visible to query at absolute position pos_i
        allowed = allowed[None].expand(rep, T, k.shape[1]).reshape(rep * T, k.shape[1])
        scores = torch.where(allowed[None], scores, torch.full_like(scores, float("-inf")))
        o = torch.softmax(scores, -1) @ v  # [Hkv, rep*T, d]
        o = o.reshape(H, T, d).transpose(0, 1).reshape(T, H * d)
        return attn.dense(o), k, v

    def _dense_ffn(self, mlp, x):
        return _swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)

    def _moe(self, l, mlp, x):
        cfg = self.cfg
        bias = mlp.gate.expert_bias if cfg.moe_router_enable_expert_bias else None
        ids, w = route_topk(F.linear(x, mlp.gate.weight), bias, cfg)  # [N, k]
        if self.moe == "dense":
            # Every expert for every token, scaled by a routing matrix that is zero off the selected experts.
            N, E = x.shape[0], cfg.num_experts
            onehot = (ids[..., None] == torch.arange(E, device=x.device)).to(x.dtype)  # [N, k, E]
            route_w = (onehot * w[..., None]).sum(1)  # [N, E]
            h = F.silu(F.linear(x, getattr(self, f"moe_gate_{l}"))) * F.linear(x, getattr(self, f"moe_up_{l}"))  # [N, E*I]
            h = (h.reshape(N, E, -1) * route_w[..., None]).reshape(N, -1)
            out = h @ getattr(self, f"moe_down_{l}")  # [N, D]
        else:
            xe = x[:, None, :, None]  # [N, 1, D, 1]
            g = (mlp.experts_gate_proj[ids] @ xe).squeeze(-1)  # [N, k, I]
            u = (mlp.experts_up_proj[ids] @ xe).squeeze(-1)
            h = F.silu(g) * u * w[..., None]
            out = (mlp.experts_down_proj[ids] @ h[..., None]).squeeze(-1).sum(1)  # [N, D]
        if mlp.shared_experts is not None:
            s = mlp.shared_experts
            out = out + _swiglu(x, s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
        return out
