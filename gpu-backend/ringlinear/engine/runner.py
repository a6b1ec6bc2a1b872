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

Kernel path (`kernels=True`, the default on CUDA in bf16 when the extension builds): the same step with the CUDA
kernels of `ringlinear.kernels` - lightning decode updating the slot pool in place, varlen lightning prefill (all
prompt chunks of a step in one launch per cut round, reading and writing their slots in place), fused MoE (router,
decode expert kernels or grouped GEMMs) and a GQA decode attention without the head repeat. The reference path above
stays the CPU path and the oracle; forcing `kernels=True` on CPU runs the kernels' reference twins, which is how the
dispatch code is tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .. import kernels as cuda_kernels
from ..model import MoE, RingLinearForCausalLM
from ..ops import accum_dtype, apply_partial_rope, group_rms_norm, lightning_chunked, lightning_recurrent_step, rope_cos_sin
from .pools import LinearStatePool, PagedKVCache

_DECODE_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
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


def kernels_usable(model: RingLinearForCausalLM) -> bool:
    """The CUDA kernels apply: model on a CUDA device, bf16, head dim the kernels support, extension built."""
    return (model.device.type == "cuda" and model.dtype == torch.bfloat16
            and model.config.d_head in cuda_kernels.lightning.SUPPORTED_HEAD_DIMS and cuda_kernels.available())


class ModelRunner:
    def __init__(self, model: RingLinearForCausalLM, states: LinearStatePool, kv: PagedKVCache,
                 kernels: bool | None = None):
        self.model, self.states, self.kv = model, states, kv
        cfg = model.config
        self.cfg = cfg
        self.acc = accum_dtype(model.dtype)
        self.decay = {l: torch.tensor(cfg.decay_rates(l), dtype=self.acc, device=model.device) for l in cfg.linear_layers}
        self.scale = cfg.d_head ** -0.5
        # Swappable operators of the reference path (the reference ops are the default and the twin).
        self.lightning_decode = lightning_recurrent_step
        self.lightning_prefill = lightning_chunked
        # None = auto: the kernels wherever they apply. True on CPU runs the kernel path through the twins.
        self.use_kernels = kernels_usable(model) if kernels is None else bool(kernels)
        if self.use_kernels:
            self.gamma = {l: torch.exp(-r.float()) for l, r in self.decay.items()}  # per-step decay factor [H]
            self.router_cfg = cuda_kernels.RouterConfig(cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group,
                                                        cfg.topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob)

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
        kv_rows = torch.cat([self.kv.rows(s.block_table, s.start, s.end, torch.device("cpu")) for s in segs]).to(dev)
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
            x = x + self._mlp(layer.mlp, layer.post_attention_layernorm(x))
        last = [offs[i + 1] - 1 for i, s in enumerate(segs) if s.want_logits]
        if not last:
            return None, snaps
        hs = model.model.norm(x[0, torch.tensor(last, device=dev)])
        return model.lm_head(hs).to(self.acc), snaps

    def _mlp(self, mlp, x):
        if not (self.use_kernels and isinstance(mlp, MoE)):
            return mlp(x)
        sh = mlp.shared_experts
        bias = mlp.gate.expert_bias if self.cfg.moe_router_enable_expert_bias else None
        y = cuda_kernels.fused_moe(x[0], mlp.gate.weight, bias, mlp.experts_gate_proj, mlp.experts_up_proj,
                                   mlp.experts_down_proj,
                                   None if sh is None else (sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight),
                                   self.router_cfg)
        return y[None]

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
        if self.use_kernels:
            o = self._lightning_kernels(l, q[0], k[0], v[0], pool, plan, snaps)
        else:
            o = self._lightning_reference(l, q, k, v, pool, decay, plan, snaps)
        o = group_rms_norm(o.reshape(1, N, H * d), att.g_norm.weight, cfg.group_norm_size, cfg.rms_norm_eps)
        o = o * torch.sigmoid(att.g_proj(h).to(self.acc))
        return att.dense(o.to(h.dtype))

    def _lightning_reference(self, l, q, k, v, pool, decay, plan: "_StepPlan", snaps):
        N, H, d = q.shape[1:]
        o = torch.empty(N, H, d, dtype=self.acc, device=q.device)
        if plan.dec is not None:
            rows, slots = plan.dec.rows, plan.dec.slots
            o_t, S = self.lightning_decode(q[0, rows], k[0, rows], v[0, rows], decay, self.scale, pool[slots])
            o[rows] = o_t
            pool[slots] = S
        for i in plan.prefill:
            s, a = plan.segs[i], plan.offs[i]
            S = pool[s.slot][None]
            cuts = plan.cuts(i)
            for c0, c1 in zip(cuts, cuts[1:]):
                o_c, S = self.lightning_prefill(q[:, c0:c1], k[:, c0:c1], v[:, c0:c1], decay, self.scale, S, LIGHTNING_CHUNK)
                o[c0:c1] = o_c[0]
                if s.snapshot_at is not None and c1 - a == s.snapshot_at - s.start:
                    snaps.setdefault(i, {})[l] = S[0].clone()
            pool[s.slot] = S[0]
        return o

    def _lightning_kernels(self, l, q, k, v, pool, plan: "_StepPlan", snaps):
        """q, k, v [N, H, d]: decode rows in one in-place step over the pool; prompt chunks in varlen launches, one
        per cut round (round r runs every segment's r-th piece; a segment's pieces are sequential in its slot)."""
        gamma = self.gamma[l]
        o = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        if plan.dec is not None:
            rows = plan.dec.rows
            o[rows] = cuda_kernels.lightning_decode(q[rows], k[rows], v[rows], pool, plan.dec.slots, gamma,
                                                    scale=self.scale)
        pieces = {i: plan.cuts(i) for i in plan.prefill}
        for r in range(max((len(p) - 1 for p in pieces.values()), default=0)):
            batch = [(i, p[r], p[r + 1]) for i, p in pieces.items() if r + 1 < len(p)]
            cu = [0]
            for _, c0, c1 in batch:
                cu.append(cu[-1] + c1 - c0)
            cat = (lambda t: t[batch[0][1]:batch[0][2]]) if len(batch) == 1 else \
                (lambda t: torch.cat([t[c0:c1] for _, c0, c1 in batch]))
            slots = [plan.segs[i].slot for i, _, _ in batch]
            o_r = cuda_kernels.lightning_prefill(cat(q), cat(k), cat(v), pool, cu, slots, gamma, scale=self.scale)
            for (i, c0, c1), a in zip(batch, cu):
                o[c0:c1] = o_r[a:a + c1 - c0]
                s = plan.segs[i]
                if s.snapshot_at is not None and c1 - plan.offs[i] == s.snapshot_at - s.start:
                    snaps.setdefault(i, {})[l] = pool[s.slot].clone()
        return o

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
        if plan.dec is not None and self.use_kernels:
            # Grouped queries: the rep query heads of a KV head ride as rep query rows of one SDPA head, so the
            # gathered K/V are read once per KV head instead of being repeated rep times.
            g = plan.dec
            B = g.rows.numel()
            qg = q[g.rows].view(B, Hkv, rep, d)
            # Not cuDNN: its plan is rebuilt for every new key length, i.e. every decode step (~13 ms of host time).
            with sdpa_kernel(_DECODE_SDPA):
                o = F.scaled_dot_product_attention(qg, K[g.kv_index].transpose(1, 2), V[g.kv_index].transpose(1, 2),
                                                   attn_mask=g.mask, scale=scale)  # [B, Hkv, rep, d]
            out[g.rows] = o.reshape(B, H, d)
        elif plan.dec is not None:
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
        ends = [segs[i].end for i in idx]
        lmax = max(ends)
        nblk = -(-lmax // bs)
        tables = torch.zeros(len(idx), nblk, dtype=torch.int64)
        for r, i in enumerate(idx):
            t = segs[i].block_table[:nblk]
            tables[r, :len(t)] = torch.tensor(t, dtype=torch.int64)
        # Small tables go to the device; the [B, Lmax] index and mask are expanded there (no host-sized copies).
        tables, lengths = tables.to(dev), torch.tensor(ends, device=dev)
        p = torch.arange(lmax, device=dev)
        kv_index = tables[:, p // bs] * bs + p % bs  # [B, Lmax]; padding rows read block 0 and are masked out
        mask = (p[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, Lmax]
        return _DecodeGather(rows=torch.tensor([offs[i] for i in idx], device=dev),
                             slots=torch.tensor([segs[i].slot for i in idx], device=dev),
                             kv_index=kv_index, mask=mask)


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

    def cuts(self, i: int) -> list[int]:
        """Packed-row cut points of prompt segment i: where the reference prefill of the whole prompt would cut
        (64-aligned chunks) and at the snapshot position."""
        s, a, b = self.segs[i], self.offs[i], self.offs[i + 1]
        cuts = {a, b}
        if s.start % LIGHTNING_CHUNK:
            cuts.add(min(b, a + LIGHTNING_CHUNK - s.start % LIGHTNING_CHUNK))
        if s.snapshot_at is not None and s.start < s.snapshot_at < s.end:
            cuts.add(a + s.snapshot_at - s.start)
        return sorted(cuts)
