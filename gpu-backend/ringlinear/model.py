"""BailingMoeLinearV2ForCausalLM (Ring-linear-2.0), the reference model, top to bottom.

    x = word_embeddings[ids]
    for each layer l:   x += Attn_l(RMSNorm(x))        lightning (linear) or GQA softmax, by the layer schedule
                        x += FFN_l(RMSNorm(x))         dense SwiGLU for l < first_k_dense_replace, else MoE
    logits = lm_head(RMSNorm(x))

Parameter names are the checkpoint's names (architecture doc §6), except that routed experts are held
stacked ([E, I, D]); `checkpoint.py` maps `experts.{e}.*` onto them. The step API is `prefill` and `decode`
over a `ModelState` (per linear layer an fp32 state [B, H, d, d]; per softmax layer a KV cache).
All rows of a batch share positions here; the serving engine batches requests of different lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import RingLinearConfig
from .ops import accum_dtype, apply_partial_rope, group_rms_norm, lightning_chunked, lightning_recurrent_step, rms_norm, route, rope_cos_sin


# ------------------------------------------------------------------------------------------------ state

@dataclass
class ModelState:
    """Everything a sequence carries between steps: fixed-size linear states plus the softmax layers' KV."""

    pos: int = 0  # tokens consumed so far
    linear: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, d, d] fp32 (fp64 in golden runs)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (k, v) [B, Hkv, pos, d]

    def clone(self) -> "ModelState":
        return ModelState(self.pos, {l: s.clone() for l, s in self.linear.items()},
                          {l: (k.clone(), v.clone()) for l, (k, v) in self.kv.items()})


# ------------------------------------------------------------------------------------------------ blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the dense FFN of layer 0 and the shared expert."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        # fp32 in checkpoints; used only to pick experts (aux-loss-free balancing), never to weight them.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.cfg = cfg

    def forward(self, x):  # x: [N, D] -> ids [N, k], weights [N, k]
        acc = accum_dtype(x.dtype)
        logits = x.to(acc) @ self.weight.to(acc).T
        bias = self.expert_bias if self.cfg.moe_router_enable_expert_bias else None
        c = self.cfg
        return route(logits, bias, c.n_group, c.topk_group, c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor)


class MoE(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = Router(cfg)
        self.experts_gate_proj = nn.Parameter(torch.zeros(E, I, D))  # checkpoint: experts.{e}.gate_proj.weight
        self.experts_up_proj = nn.Parameter(torch.zeros(E, I, D))  # checkpoint: experts.{e}.up_proj.weight
        self.experts_down_proj = nn.Parameter(torch.zeros(E, D, I))  # checkpoint: experts.{e}.down_proj.weight
        self.shared_experts = SwiGLU(D, cfg.shared_intermediate) if cfg.shared_intermediate else None

    def forward(self, x):  # x: [B, T, D]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.gate(x)
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():  # only the selected experts are computed
            rows, slot = (ids == e).nonzero(as_tuple=True)
            xe = x[rows]
            h = F.silu(xe @ self.experts_gate_proj[e].T) * (xe @ self.experts_up_proj[e].T)
            out.index_add_(0, rows, (h @ self.experts_down_proj[e].T) * weights[rows, slot, None].to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class LightningAttention(nn.Module):
    """Linear attention layer: fused QKV (K, V with all H heads), QK-norm, partial RoPE, decayed state,
    group RMSNorm, sigmoid output gate from the layer input, output projection."""

    def __init__(self, cfg: RingLinearConfig, layer: int):
        super().__init__()
        H, d, D = cfg.num_attention_heads, cfg.d_head, cfg.hidden_size
        self.cfg, self.layer = cfg, layer
        self.query_key_value = nn.Linear(D, 3 * H * d, bias=False)
        self.query_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.g_proj = nn.Linear(D, H * d, bias=False)
        self.g_norm = RMSNorm(H * d, cfg.rms_norm_eps)  # applied per group of H*d/group_norm_size
        self.dense = nn.Linear(H * d, D, bias=False)
        self.decay_rates = cfg.decay_rates(layer)  # [H] positive; fixed by the config, nothing in the checkpoint

    def forward(self, x, pos0: int, state: torch.Tensor | None, chunked: bool = True):
        cfg = self.cfg
        B, T, _ = x.shape
        H, d = cfg.num_attention_heads, cfg.d_head
        acc = accum_dtype(x.dtype)
        qkv = self.query_key_value(x).to(acc)
        if cfg.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(B, T, 3, H, d).unbind(2)
        if cfg.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        cos, sin = rope_cos_sin(torch.arange(pos0, pos0 + T, device=x.device)[None], cfg.rot_dim, cfg.rope_theta, acc)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if state is None:
            state = torch.zeros(B, H, d, d, dtype=acc, device=x.device)
        scale = d ** -0.5
        decay = torch.tensor(self.decay_rates, dtype=acc, device=x.device)
        if chunked:
            o, state = lightning_chunked(q, k, v, decay, scale, state)
        else:  # token by token, as decode does
            outs = []
            for t in range(T):
                o_t, state = lightning_recurrent_step(q[:, t], k[:, t], v[:, t], decay, scale, state)
                outs.append(o_t)
            o = torch.stack(outs, 1)
        o = group_rms_norm(o.reshape(B, T, H * d), self.g_norm.weight, cfg.group_norm_size, cfg.rms_norm_eps)
        o = o * torch.sigmoid(self.g_proj(x).to(acc))
        return self.dense(o.to(x.dtype)), state


class SoftmaxAttention(nn.Module):
    """GQA softmax attention with QK-norm and the same partial RoPE; full causal context, KV cache."""

    def __init__(self, cfg: RingLinearConfig, layer: int):
        super().__init__()
        H, Hkv, d, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.d_head, cfg.hidden_size
        self.cfg, self.layer = cfg, layer
        self.query_key_value = nn.Linear(D, (H + 2 * Hkv) * d, bias=False)
        self.query_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.dense = nn.Linear(H * d, D, bias=False)

    def forward(self, x, pos0: int, cache: tuple[torch.Tensor, torch.Tensor] | None):
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.d_head
        q, k, v = self.query_key_value(x).view(B, T, H + 2 * Hkv, d).split([H, Hkv, Hkv], dim=2)
        if cfg.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        acc = accum_dtype(x.dtype)
        cos, sin = rope_cos_sin(torch.arange(pos0, pos0 + T, device=x.device)[None], cfg.rot_dim, cfg.rope_theta, acc)
        q = apply_partial_rope(q.to(acc), cos, sin).to(x.dtype).transpose(1, 2)  # [B, H, T, d]
        k = apply_partial_rope(k.to(acc), cos, sin).to(x.dtype).transpose(1, 2)  # [B, Hkv, T, d]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        rep = H // Hkv
        kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if pos0 == 0:
            o = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=d ** -0.5)
        else:  # new queries sit at positions pos0.. and see every cached key
            allowed = torch.arange(pos0 + T, device=x.device)[None, :] <= torch.arange(pos0, pos0 + T, device=x.device)[:, None]
            o = F.scaled_dot_product_attention(q, kr, vr, attn_mask=allowed, scale=d ** -0.5)
        return self.dense(o.transpose(1, 2).reshape(B, T, H * d)), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RingLinearConfig, layer: int):
        super().__init__()
        self.is_softmax = cfg.is_softmax_layer(layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = SoftmaxAttention(cfg, layer) if self.is_softmax else LightningAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size) if cfg.is_dense_layer(layer) else MoE(cfg)


class RingLinearModel(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, l) for l in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ------------------------------------------------------------------------------------------------ the model

class RingLinearForCausalLM(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        self.config = cfg
        self.model = RingLinearModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, input_ids: torch.Tensor, state: ModelState | None = None, chunked: bool = True):
        """input_ids [B, T] continuing `state` (new if None). Returns (logits [B, T, V] in >= fp32, new state).

        The given state is not modified; a fresh one is returned.
        """
        state = ModelState() if state is None else state
        new = ModelState(pos=state.pos + input_ids.shape[1])
        x = self.model.word_embeddings(input_ids)
        for l, layer in enumerate(self.model.layers):
            h = layer.input_layernorm(x)
            if layer.is_softmax:
                a, new.kv[l] = layer.attention(h, state.pos, state.kv.get(l))
            else:
                a, new.linear[l] = layer.attention(h, state.pos, state.linear.get(l), chunked=chunked)
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.model.norm(x)
        return self.lm_head(x).to(accum_dtype(x.dtype)), new

    # Step API used by engines and the server.

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, state: ModelState | None = None, chunked: bool = True):
        """tokens [B, T] (or [T]) -> logits [B, T, V], state."""
        if tokens.dim() == 1:
            tokens = tokens[None]
        return self(tokens.to(self.device), state, chunked=chunked)

    @torch.inference_mode()
    def decode(self, token: torch.Tensor | int, state: ModelState):
        """One token per row ([B] or int) -> logits [B, V], state."""
        t = torch.as_tensor(token, device=self.device).reshape(-1, 1)
        logits, state = self(t, state, chunked=False)
        return logits[:, -1], state

    @torch.inference_mode()
    def generate_greedy(self, prompt: list[int], n: int):
        """Greedy continuation of `n` tokens; returns (ids, prompt logits [T, V], decode logits [n, V], state after prompt)."""
        logits, state = self.prefill(torch.tensor(prompt))
        prompt_state = state
        ids, dec = [], []
        nxt = int(logits[0, -1].argmax())
        for _ in range(n):
            ids.append(nxt)
            step, state = self.decode(nxt, state)
            dec.append(step[0])
            nxt = int(step[0].argmax())
        return ids, logits[0], torch.stack(dec) if dec else logits.new_zeros(0, logits.shape[-1]), prompt_state
