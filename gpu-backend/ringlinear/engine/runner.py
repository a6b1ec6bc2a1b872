"""The model runner: one forward pass over a batch of requests at different positions.

A step is a list of `Segment`s (one per request): a decode segment is one token, a prefill segment a chunk of the
prompt. All tokens of the step are packed into one row [1, N, D], so every per-token operator (norms, projections,
router, experts, lm_head) runs once for the whole step with the reference model's own modules and weights. Only the
sequence-mixing parts are per request:

    lightning layers  decode segments: one batched recurrent step over the gathered slots of the state pool;
                      prefill segments: the reference chunked form from the request's slot, cut at the same
                      64-aligned positions as the reference prefill of the whole prompt, written back to the slot
    softmax layers    new K/V scattered into the paged cache; decode segments attend in one padded batch,
                      prefill segments one causal (lower-right aligned) attention each

Numerics follow `model.py` operator for operator, so a request's tokens do not depend on its batch mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..model import RingLinearForCausalLM
from ..ops import accum_dtype, apply_partial_rope, group_rms_norm, lightning_chunked, lightning_recurrent_step, rope_cos_sin
from .pools import LinearStatePool, PagedKVCache

LIGHTNING_CHUNK = 64  # the reference prefill's chunk; chunks start at multiples of it whatever the step split


@dataclass
class Segment:
    slot: int  # linear-state slot of the request
    block_table: list[int]  # its KV blocks
    start: int  # position of tokens[0]
    tokens: list[int]
    decode: bool  # one generated token (recurrent step) vs a prompt chunk (chunked form)
    want_logits: bool  # the last token's logits are needed (end of prompt, or decode)
    snapshot_at: int | None = None  # position in (start, end] after which the linear states are copied out

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class ModelRunner:
    def __init__(self, model: RingLinearForCausalLM, states: LinearStatePool, kv: PagedKVCache):
        self.model, self.states, self.kv = model, states, kv
        cfg = model.config
        self.cfg = cfg
        self.acc = accum_dtype(model.dtype)
        self.decay = {l: torch.tensor(cfg.decay_rates(l), dtype=self.acc, device=model.device) for l in cfg.linear_layers}
        self.scale = cfg.d_head ** -0.5
        # Swappable operators (a CUDA kernel may replace them; the reference ops are the default and the twin).
        self.lightning_decode = lightning_recurrent_step
        self.lightning_prefill = lightning_chunked

    @torch.inference_mode()
    def execute(self, segs: list[Segment]) -> tuple[torch.Tensor | None, dict[int, dict[int, torch.Tensor]]]:
        """Run one step. Returns (logits [n, V] fp32 for the segments with want_logits, in order, or None;
        snapshots {segment index: {linear layer: state [H, d, d]}} for segments with snapshot_at)."""
        model, cfg, dev = self.model, self.cfg, self.model.device
        lens = [len(s.tokens) for s in segs]
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        ids = torch.tensor([t for s in segs for t in s.tokens], dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(s.start, s.end) for s in segs]).to(dev)
        cos, sin = rope_cos_sin(pos[None], cfg.rot_dim, cfg.rope_theta, self.acc)
        kv_rows = torch.cat([self.kv.rows(s.block_table, s.start, s.end, dev) for s in segs])
        plan = _StepPlan(segs, offs, self._decode_gather(segs, offs, dev) if any(s.decode for s in segs) else None)
        snaps: dict[int, dict[int, torch.Tensor]] = {}

        x = model.model.word_embeddings(ids)[None]  # [1, N, D]
        for l, layer in enumerate(model.model.layers):
            h = layer.input_layernorm(x)
            if layer.is_softmax:
                a = self._softmax(layer.attention, l, h, cos, sin, kv_rows, plan)
            else:
                a = self._lightning(layer.attention, l, h, cos, sin, plan, snaps)
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = [offs[i + 1] - 1 for i, s in enumerate(segs) if s.want_logits]
        if not last:
            return None, snaps
        hs = model.model.norm(x[0, torch.tensor(last, device=dev)])
        return model.lm_head(hs).to(self.acc), snaps

    # ------------------------------------------------------------------------------------------ lightning layers

    def _lightning(self, att, l, h, cos, sin, plan: "_StepPlan", snaps):
        cfg = self.cfg
        N = h.shape[1]
        H, d = cfg.num_attention_heads, cfg.d_head
        qkv = att.query_key_value(h).to(self.acc)
        if cfg.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(1, N, 3, H, d).unbind(2)
        if cfg.use_qk_norm:
            q, k = att.query_layernorm(q), att.key_layernorm(k)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        pool, decay = self.states.states[l], self.decay[l]
        o = torch.empty(N, H, d, dtype=self.acc, device=h.device)
        if plan.dec is not None:
            rows, slots = plan.dec.rows, plan.dec.slots
            o_t, S = self.lightning_decode(q[0, rows], k[0, rows], v[0, rows], decay, self.scale, pool[slots])
            o[rows] = o_t
            pool[slots] = S
        for i in plan.prefill:
            s, a, b = plan.segs[i], plan.offs[i], plan.offs[i + 1]
            S = pool[s.slot][None]
            # Cut where the reference prefill would cut (64-aligned chunks) and at the snapshot position.
            cuts = {a, b}
            if s.start % LIGHTNING_CHUNK:
                cuts.add(min(b, a + LIGHTNING_CHUNK - s.start % LIGHTNING_CHUNK))
            if s.snapshot_at is not None and s.start < s.snapshot_at < s.end:
                cuts.add(a + s.snapshot_at - s.start)
            cuts = sorted(cuts)
            for c0, c1 in zip(cuts, cuts[1:]):
                o_c, S = self.lightning_prefill(q[:, c0:c1], k[:, c0:c1], v[:, c0:c1], decay, self.scale, S, LIGHTNING_CHUNK)
                o[c0:c1] = o_c[0]
                if s.snapshot_at is not None and c1 - a == s.snapshot_at - s.start:
                    snaps.setdefault(i, {})[l] = S[0].clone()
            pool[s.slot] = S[0]
        o = group_rms_norm(o.reshape(1, N, H * d), att.g_norm.weight, cfg.group_norm_size, cfg.rms_norm_eps)
        o = o * torch.sigmoid(att.g_proj(h).to(self.acc))
        return att.dense(o.to(h.dtype))

    # ------------------------------------------------------------------------------------------ softmax layers

    def _softmax(self, att, l, h, cos, sin, kv_rows, plan: "_StepPlan"):
        cfg = self.cfg
        N = h.shape[1]
        H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.d_head
        q, k, v = att.query_key_value(h).view(1, N, H + 2 * Hkv, d).split([H, Hkv, Hkv], dim=2)
        if cfg.use_qk_norm:
            q, k = att.query_layernorm(q), att.key_layernorm(k)
        q = apply_partial_rope(q.to(self.acc), cos, sin).to(h.dtype)[0]  # [N, H, d]
        k = apply_partial_rope(k.to(self.acc), cos, sin).to(h.dtype)[0]  # [N, Hkv, d]
        K, V = self.kv.k[l], self.kv.v[l]
        K[kv_rows] = k
        V[kv_rows] = v[0]
        rep, scale = H // Hkv, d ** -0.5
        out = torch.empty(N, H, d, dtype=h.dtype, device=h.device)
        if plan.dec is not None:
            g = plan.dec
            Kd = K[g.kv_index].transpose(1, 2).repeat_interleave(rep, 1)  # [B, H, Lmax, d]
            Vd = V[g.kv_index].transpose(1, 2).repeat_interleave(rep, 1)
            o = F.scaled_dot_product_attention(q[g.rows][:, :, None], Kd, Vd, attn_mask=g.mask, scale=scale)
            out[g.rows] = o[:, :, 0]
        for i in plan.prefill:
            s, a, b = plan.segs[i], plan.offs[i], plan.offs[i + 1]
            rows = self.kv.rows(s.block_table, 0, s.end, h.device)
            Ks = K[rows].transpose(0, 1)[None].repeat_interleave(rep, 1)  # [1, H, end, d]
            Vs = V[rows].transpose(0, 1)[None].repeat_interleave(rep, 1)
            qs = q[a:b].transpose(0, 1)[None]  # [1, H, T, d]
            if s.start == 0:
                o = F.scaled_dot_product_attention(qs, Ks, Vs, is_causal=True, scale=scale)
            else:  # the chunk's queries sit at start.. and see every earlier key
                o = F.scaled_dot_product_attention(qs, Ks, Vs, attn_mask=causal_lower_right(b - a, s.end), scale=scale)
            out[a:b] = o[0].transpose(0, 1)
        return att.dense(out.reshape(1, N, H * d))

    def _decode_gather(self, segs, offs, dev) -> "_DecodeGather":
        idx = [i for i, s in enumerate(segs) if s.decode]
        bs = self.kv.block_size
        lengths = torch.tensor([segs[i].end for i in idx])
        lmax = int(lengths.max())
        nblk = -(-lmax // bs)
        tables = torch.zeros(len(idx), nblk, dtype=torch.int64)
        for r, i in enumerate(idx):
            t = segs[i].block_table[:nblk]
            tables[r, :len(t)] = torch.tensor(t, dtype=torch.int64)
        p = torch.arange(lmax)
        kv_index = tables[:, p // bs] * bs + p % bs  # [B, Lmax]; padding rows read block 0 and are masked out
        mask = (p[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, Lmax]
        return _DecodeGather(rows=torch.tensor([offs[i] for i in idx], device=dev),
                             slots=torch.tensor([segs[i].slot for i in idx], device=dev),
                             kv_index=kv_index.to(dev), mask=mask.to(dev))


@dataclass
class _DecodeGather:
    rows: torch.Tensor  # [B] packed-row index of each decode token
    slots: torch.Tensor  # [B] state-pool slot
    kv_index: torch.Tensor  # [B, Lmax] KV cache rows
    mask: torch.Tensor  # [B, 1, 1, Lmax] valid keys


class _StepPlan:
    def __init__(self, segs: list[Segment], offs: list[int], dec: _DecodeGather | None):
        self.segs, self.offs, self.dec = segs, offs, dec
        self.prefill = [i for i, s in enumerate(segs) if not s.decode]
