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
decode expert kernels or grouped GEMMs) and the paged-KV decode attention kernel, which reads each request's KV blocks
in place through a per-slot block table kept on the device (`slot_tables`, written once per request: the engine
allocates a request's blocks at admission and never changes them). The reference path above stays the CPU path and
the oracle; forcing `kernels=True` on CPU runs the kernels' reference twins, which is how the dispatch code is tested
without a GPU.

Decode steps (every segment one generated token) on the kernel path run `_decode_step`, a function of three device
tensors (token ids, positions, slots) that derives everything else on the device (KV rows, block tables, key counts).
On CUDA it is captured once per padded batch size (`kernels.DecodeGraphs`) and replayed: a step is a handful of copies
and one graph launch instead of ~1 000 kernel launches (a one-token step is still bound by their count: that is why
the MoE router is one launch and the shared expert rides in the routed experts' launches). Padding rows carry slot -1:
the lightning kernel leaves every state untouched for them, their K/V go to the cache's scratch row and the
attention sees zero keys.

Steps that carry prompt tokens cannot be one graph (their attention shapes change every step) and would be bound by
the host's launch rate, so the host does as little as it can: all the step's indices go to the device in one queued
copy (no host sync inside a step), and everything between two attention calls - the attention output's norm and
projection, the residual adds and norms, the MoE, the next layer's projection and prologue - is one *piece*, captured
for each of a ladder of row counts (`capture_step_graphs`, called by the engine's warm-up). A step pads its rows to
the smallest captured count that holds it and runs, per layer, one piece replay and its attention eagerly
(`_forward_pieces`); the pieces read and write fixed buffers (`StepIO`), the attention the first n rows of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels as cuda_kernels
from ..model import MoE, RingLinearForCausalLM, SwiGLU
from ..ops.attention import chunk_attention, chunk_attention_reference, cudnn_plan_shapes, cudnn_without_recompiles
from ..ops.transfer import to_device
from ..ops import accum_dtype, apply_partial_rope, group_rms_norm, lightning_chunked, lightning_recurrent_step, rope_cos_sin
from .pools import LinearStatePool, PagedKVCache, SnapshotArena
from .step_io import StepIO, step_graph_sizes

# Steps of at most this many rows take the projections through kernels.linear_small (a GEMV at one row, the mma
# kernel at two to eight), more through cuBLAS: on the H200 at Ring-mini's shapes ours win up to eight rows (their
# loads start under the previous kernel; docs/benchmarks.md "Small-batch decode", fifteenth session).
LINEAR_SMALL_ROWS = 8
# Prompt steps of at least this many rows read the lightning layers' v in place from the projection (ModelRunner.
# v_in_place). H200, one layer's prologue + prefill at Ring-mini's shape: 1.19-1.26x at 16k-128k in every run, at 4k
# 0.87x / 0.94x / 1.17x over three (the copy the prologue has just written may still be in L2; docs/benchmarks.md,
# twentieth session).
V_IN_PLACE_MIN_TOKENS = 8192

log = logging.getLogger(__name__)

LIGHTNING_CHUNK = 64  # the reference prefill's chunk; chunks start at multiples of it whatever the step split


@dataclass
class Segment:
    slot: int  # linear-state slot of the request
    block_table: list[int]  # its KV blocks
    start: int  # position of tokens[0]
    tokens: list[int]
    decode: bool  # one generated token (recurrent step) vs a prompt chunk (chunked form)
    want_logits: bool  # the last token's logits are needed (end of prompt, or decode)
    # a prefix-block boundary in (start, end]: the chunk is cut there, and with snapshot_slot the linear states after
    # it are copied into that slot of the snapshot arena (taken by the engine before the step is queued)
    snapshot_at: int | None = None
    snapshot_slot: int | None = None
    # decode only: the token is row `feed` of the previous step's sampled ids, still on the device (`execute`'s feed;
    # an overlapped engine schedules a step before the previous one's tokens reach the host); tokens[0] is ignored
    feed: int | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def kernels_usable(model: RingLinearForCausalLM) -> bool:
    """The CUDA kernels apply: model on a CUDA device, bf16, head dim the kernels support, extension built."""
    return (model.device.type == "cuda" and model.dtype == torch.bfloat16
            and model.config.d_head in cuda_kernels.lightning.SUPPORTED_HEAD_DIMS and cuda_kernels.available())


def _pack_moe_weights(model: RingLinearForCausalLM) -> None:
    """Store each MoE layer's experts in `moe.pack_moe`'s layout: gate and up (routed and shared) as the two halves of
    one buffer, so `fused_moe` runs them as one GEMM, and the shared expert as one more expert of the routed buffers,
    so decode steps compute it in the routed experts' launches. The parameters become views of the buffers (no extra
    memory, same values, the reference forward unchanged). Layer by layer: the transient extra memory is one layer's
    experts."""
    from torch import nn

    frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
    for layer in model.model.layers:
        mlp = layer.mlp
        if not isinstance(mlp, MoE):
            continue
        sh = mlp.shared_experts
        shared = None if sh is None else (sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
        if cuda_kernels.moe.packed_gate_up(mlp.experts_gate_proj, mlp.experts_up_proj) is not None and (
                shared is None or cuda_kernels.moe.shared_as_expert(mlp.experts_gate_proj, mlp.experts_up_proj,
                                                                    mlp.experts_down_proj, shared) is not None):
            continue
        g, u, d, packed_shared = cuda_kernels.moe.pack_moe(
            mlp.experts_gate_proj.data, mlp.experts_up_proj.data, mlp.experts_down_proj.data,
            None if shared is None else tuple(t.data for t in shared))
        mlp.experts_gate_proj, mlp.experts_up_proj, mlp.experts_down_proj = frozen(g), frozen(u), frozen(d)
        if sh is not None:
            sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight = (frozen(t) for t in packed_shared)


def _stacked_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """The [Ra + Rb, C] view of one buffer whose first rows are a and last rows b (contiguous [R, C] weights stored
    back to back), else None."""
    if not (a.dim() == b.dim() == 2 and a.shape[1] == b.shape[1] and a.dtype == b.dtype and a.device == b.device
            and a.is_contiguous() and b.is_contiguous() and a.numel() and b.numel()):
        return None
    if b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
        return None
    if b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr():
        return None
    return a.as_strided((a.shape[0] + b.shape[0], a.shape[1]), (a.shape[1], 1))


def _pack_qkv_gate_weights(model: RingLinearForCausalLM) -> dict[int, torch.Tensor]:
    """Store each lightning layer's qkv and output-gate projections (both read the layer's normed input) as one
    [4Hd, D] buffer, so the kernel path runs one GEMM where it ran two (a decode step is launch-bound); the two
    parameters become views of it (no extra memory, the reference forward unchanged). Returns {layer: the buffer}."""
    from torch import nn

    out = {}
    for l in model.config.linear_layers:
        att = model.model.layers[l].attention
        qkv, g = att.query_key_value.weight, att.g_proj.weight
        both = _stacked_rows(qkv, g)
        if both is None:
            both = torch.cat([qkv.data, g.data])
            att.query_key_value.weight = nn.Parameter(both[: qkv.shape[0]], requires_grad=False)
            att.g_proj.weight = nn.Parameter(both[qkv.shape[0]:], requires_grad=False)
        out[l] = both
    return out


class ModelRunner:
    def __init__(self, model: RingLinearForCausalLM, states: LinearStatePool, kv: PagedKVCache,
                 kernels: bool | None = None, max_context: int | None = None, cuda_graphs: bool | None = None,
                 snapshot_arena: SnapshotArena | None = None):
        self.model, self.states, self.kv = model, states, kv
        self.snapshot_arena = snapshot_arena  # where segments with a snapshot_slot copy their states to
        cfg = model.config
        self.cfg = cfg
        self.acc = accum_dtype(model.dtype)
        self.decay = {l: torch.tensor(cfg.decay_rates(l), dtype=self.acc, device=model.device) for l in cfg.linear_layers}
        self.scale = cfg.d_head ** -0.5
        # Swappable operators of the reference path (the reference ops are the default and the twin).
        self.lightning_decode = lightning_recurrent_step
        self.lightning_prefill = lightning_chunked
        # A prompt chunk's causal attention over its whole prefix. Kernel path: cuDNN, KV heads read in place (a chunk
        # after the first as two cuDNN calls merged by log-sum-exp, ops/attention.py); reference: repeat + masked SDPA.
        self.chunk_attention = chunk_attention_reference
        # None = auto: the kernels wherever they apply. True on CPU runs the kernel path through the twins.
        self.use_kernels = kernels_usable(model) if kernels is None else bool(kernels)
        # Prompt-only bf16 steps of at least V_IN_PLACE_MIN_TOKENS rows: the lightning prologue writes q and k only,
        # and the prefill kernel reads v in place from the projection (qkv_prologue's v_in_place). False copies v as
        # well: bitwise the same (an A/B switch for the benches).
        self.v_in_place = True
        self.v_in_place_min_tokens = V_IN_PLACE_MIN_TOKENS
        # Those steps also hand the prefill q and k raw from the projection, and the prefill kernel applies the QK-norm
        # and RoPE to each chunk as it loads it (kernels.QKPrologue): no prologue pass over q and k. Bitwise the same
        # (False: the A/B switch). On the GPU for the released models' head shape (d 128, rotary 64) only.
        self.qk_prologue_in_prefill = True
        # A MoE layer's combine kernel also adds the residual and applies the next layer's input norm (fused_moe's
        # add_norm): the MoE output is never written. Bitwise the same as the separate add_rms_norm (False: A/B).
        self.moe_add_norm = True
        # Steps run the last layer past its attention inputs only for the rows whose logits they return (the
        # last token of each prompt that ends in the step, and the decodes): its K/V still go to the cache for every
        # row, but its attention, output projection and MLP skip the rest, whose results nothing reads (the server
        # has no prompt logprobs). The released models' last layer is always softmax (the HF layer rule), so a 128k
        # prompt skips one causal attention over 128k queries. False: every row (the A/B switch for the benches).
        # Steps on the piece graphs run that last piece eagerly (~12 launches): on the H200 never slower than its
        # replay on every row, 2-4% faster a step at 512-2 048 rows (docs/benchmarks.md, twenty-third session).
        self.last_layer_logit_rows_only = True
        self.graphs: cuda_kernels.DecodeGraphs | None = None
        self.step_graphs: list[tuple[int, cuda_kernels.PieceGraphs]] = []  # (rows, pieces), ascending (capture_step_graphs)
        self._step_io: dict[int, StepIO] = {}  # rows -> the buffers its pieces were captured on (views of one set)
        if self.use_kernels:
            if model.device.type == "cuda":
                self.chunk_attention = chunk_attention
                cudnn_without_recompiles()
            self.gamma = {l: torch.exp(-r.float()) for l, r in self.decay.items()}  # per-step decay factor [H]
            self.router_cfg = cuda_kernels.RouterConfig(cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group,
                                                        cfg.topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob)
            self.qkv_gate: dict[int, torch.Tensor] = {}  # lightning layer -> its [qkv; gate] projection weights
            if model.device.type == "cuda":
                _pack_moe_weights(model)
                self.qkv_gate = _pack_qkv_gate_weights(model)
                cuda_kernels.moe.router_counter(model.device)  # made now: decode graphs capture the one-launch router
            # fp32 copies of the attention norms' weights, made once: the fused elementwise kernels read fp32 weights
            # (handing them bf16 would convert on every call, inside every decode graph too)
            f32 = lambda m: None if m is None else m.weight.detach().float()  # noqa: E731
            self.norm_f32 = [(f32(a.query_layernorm) if cfg.use_qk_norm else None,
                              f32(a.key_layernorm) if cfg.use_qk_norm else None, f32(getattr(a, "g_norm", None)))
                             for a in (layer.attention for layer in model.model.layers)]  # per layer: (q, k, gate)
            # Block table of the request in each state slot, [slots, max_blocks] int32 on the device.
            bs = kv.block_size
            self.max_blocks = -(-(max_context or cfg.max_position_embeddings) // bs)
            self.slot_tables = torch.zeros(states.slots.n, self.max_blocks, dtype=torch.int32, device=model.device)
            self._slot_blocks: dict[int, list[int]] = {}  # the list each slot's row was written from (held: `is` test)
            use_graphs = model.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
            if use_graphs:
                if model.device.type != "cuda":
                    raise ValueError("cuda_graphs=True needs the model on a CUDA device")
                # the standard padded sizes below the slot count, then the slot count itself
                standard = cuda_kernels.graphs.DEFAULT_BATCH_SIZES
                n = states.slots.n
                sizes = tuple(b for b in standard if b < n) + ((n,) if n <= standard[-1] else ())
                self.graphs = cuda_kernels.DecodeGraphs(self._decode_step, self._decode_inputs, sizes, pad={"slots": -1})
        elif cuda_graphs:
            raise ValueError("cuda_graphs=True needs the kernel path (CUDA device, bf16 model)")

    def capture_decode_graphs(self) -> int:
        """Capture every decode graph now (server start-up) instead of at each batch size's first step."""
        if self.graphs is None:
            return 0
        self.graphs.capture_all()
        return len(self.graphs.batch_sizes)

    @torch.inference_mode()
    def capture_step_graphs(self, max_tokens: int, eager: bool = False) -> int:
        """Capture the pieces of a step (`_piece`: what runs between two attention calls) for steps of max_tokens rows
        and of each `step_graph_sizes` below it (with decode graphs on only).

        A step that carries prompt tokens cannot be one graph: its attention changes shape every step. Run eagerly it
        is bound by the host's launch rate (~50 operator calls per layer; 32 streams beside a long prompt's 512-token
        chunks: 20-30 ms a step for 12.4 ms of GPU work). With these graphs a step of n <= max_tokens rows pads to the
        next captured size and runs, per layer, one replay and its attention. Returns the graphs captured (0: none,
        steps stay eager). eager=True keeps the functions uncaptured (no CUDA needed): the padded-buffer path of
        `execute` without the capture, for tests."""
        if (self.graphs is None and not eager) or not self.use_kernels or max_tokens < 1:
            return 0
        sizes = [max_tokens] + [n for n in step_graph_sizes(max_tokens) if n < max_tokens][::-1]
        if [n for n, _ in self.step_graphs] == sizes[::-1] and all(g.eager == eager for _, g in self.step_graphs):
            return sum(len(g) for _, g in self.step_graphs)
        self.drop_step_graphs()  # the old graphs (and their pool) go before new ones are captured
        buffers = StepIO.allocate(self, max_tokens)
        graphs, views, pool = [], {}, None
        try:
            for n in sizes:  # the largest first: the smaller ones reuse its pool's intermediates
                io = views[n] = buffers.rows(n)
                io.reset(self.kv.scratch_row)
                pieces = cuda_kernels.PieceGraphs([lambda k=k, io=io: self._piece(k, io)
                                                   for k in range(self.cfg.num_hidden_layers + 1)], pool, eager=eager)
                pool = pieces.pool
                graphs.append((n, pieces))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            log.warning("step graphs for steps of <= %d tokens not captured, those steps stay eager: %s", max_tokens,
                        str(exc).splitlines()[0])
            torch.cuda.synchronize()
            return 0
        self.step_graphs, self._step_io = graphs[::-1], views
        return sum(len(g) for _, g in self.step_graphs)

    def drop_step_graphs(self) -> None:
        """Forget the step graphs and their buffers: steps with prompt tokens run eagerly again."""
        self.step_graphs, self._step_io = [], {}

    @torch.inference_mode()
    def build_attention_plans(self, max_queries: int, max_context: int) -> int:
        """Run the kernel path's chunk attention once at each shape of `cudnn_plan_shapes` (chunks of <= max_queries
        tokens, requests of <= max_context), on zeros, so that torch builds its cuDNN plans now, on this thread,
        instead of in the first step that meets each size bucket. Returns the shapes run (0 where no cuDNN is used)."""
        cfg, dev = self.cfg, self.model.device
        if self.chunk_attention is not chunk_attention or dev.type != "cuda" or not cfg.softmax_layers:
            return 0
        shapes = cudnn_plan_shapes(max_queries, max_context, cfg.num_attention_heads, cfg.d_head)
        if not shapes:
            return 0
        q = torch.zeros(max(n for n, _ in shapes), cfg.num_attention_heads, cfg.d_head, dtype=self.model.dtype, device=dev)
        kv = torch.zeros(max(n + p for n, p in shapes), cfg.num_key_value_heads, cfg.d_head, dtype=q.dtype, device=dev)
        for n, prefix in shapes:  # laid out as _softmax hands them over: [tokens, heads, d] viewed as [1, heads, tokens, d]
            k = kv[: n + prefix].transpose(0, 1)[None]
            self.chunk_attention(q[:n].transpose(0, 1)[None], k, k, self.scale)
        torch.cuda.synchronize(dev)
        return len(shapes)

    @torch.inference_mode()
    def execute(self, segs: list[Segment], feed: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, set[int]]:
        """Run one step. Returns (logits [n, V] fp32 for the segments with want_logits, in order, or None; the
        indices of the segments with snapshot_slot whose states were copied into that arena slot).
        feed: [m] int64 token ids on the device, the ones decode segments with `feed` set take (by index)."""
        dev = self.model.device
        fed = [(i, s.feed) for i, s in enumerate(segs) if s.feed is not None]
        if fed and (feed is None or max(f for _, f in fed) >= feed.shape[0]):
            raise ValueError("a segment feeds from a token row that the step's feed does not have")
        if self.use_kernels:
            self._bind_tables(segs)
            if all(s.decode for s in segs):
                return self._decode(segs, feed, fed), {}
        offs = [0]
        for s in segs:
            offs.append(offs[-1] + len(s.tokens))
        n = offs[-1]
        pieces = next(((rows, g) for rows, g in self.step_graphs if rows >= n), None)
        pad = 0 if pieces is None else pieces[0] - n  # padding rows: token 0 at position 0, K/V to the scratch row
        dec_idx = [i for i, s in enumerate(segs) if s.decode]
        prompts = [i for i, s in enumerate(segs) if not s.decode] if self.cfg.softmax_layers else []
        last = [offs[i + 1] - 1 for i, s in enumerate(segs) if s.want_logits]
        # Every index the step needs, built on the host and sent in one queued copy: a copy from pageable memory
        # would stop the host mid-step until the GPU drained (mixed steps are bound by the host's launch rate).
        parts = [np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in segs] + [np.zeros(pad, np.int64)]),
                 np.concatenate([np.arange(s.start, s.end, dtype=np.int64) for s in segs] + [np.zeros(pad, np.int64)]),
                 np.concatenate([self.kv.rows(s.block_table, s.start, s.end) for s in segs]
                                + [np.full(pad, self.kv.scratch_row, np.int64)]),
                 np.array([[offs[i] for i in dec_idx], [segs[i].slot for i in dec_idx], [segs[i].end for i in dec_idx]],
                          dtype=np.int64).reshape(-1),
                 np.array(last, dtype=np.int64),
                 np.array([[offs[i] for i, _ in fed], [f for _, f in fed]], dtype=np.int64).reshape(-1)]
        parts += [self.kv.rows(segs[i].block_table, 0, segs[i].end) for i in prompts]  # softmax prompts' KV prefixes
        ids, pos, kv_rows, dec_meta, last_rows, fed_meta, *prefix_rows = to_device(
            torch.from_numpy(np.concatenate(parts)), dev).split([len(p) for p in parts])
        if fed:  # the fed decode rows' tokens, from the previous step's ids on the device
            fed_meta = fed_meta.view(2, len(fed))
            ids.index_copy_(0, fed_meta[0], feed.index_select(0, fed_meta[1]))
        dec = None
        if dec_idx and self.use_kernels:
            meta = dec_meta.view(3, len(dec_idx))  # packed rows, slots, key counts
            slots = meta[1]
            dec = _DecodeGather(rows=meta[0], slots=slots, tables=self.slot_tables[slots], lengths=meta[2].to(torch.int32),
                                max_len=max(segs[i].end for i in dec_idx))
        elif dec_idx:
            dec = self._decode_gather(segs, offs, dev)
        if dec is not None and dec_idx == list(range(len(dec_idx))):
            dec.rows = slice(0, len(dec_idx))  # the engine puts the decodes first: views, no gathers
        plan = _StepPlan(segs, offs, dec)
        plan.kv_prefix_rows = dict(zip(prompts, prefix_rows))
        L = self.cfg.num_hidden_layers
        # the last layer on the logit rows alone, where that skips rows
        plan.trim = self.last_layer_logit_rows_only and self.cfg.is_softmax_layer(L - 1) and len(last) < n
        plan.out_rows = last_rows
        # without linear layers a snapshot is its KV blocks alone: nothing to copy, so every reserved one is taken
        snaps: set[int] = set() if self.cfg.linear_layers else {i for i, s in enumerate(segs) if s.snapshot_slot is not None}
        if pieces is not None:
            x = self._forward_pieces(pieces[1], self._step_io[pieces[0]], ids, pos, kv_rows, plan, snaps)
        else:
            x = self._forward(ids, pos, kv_rows, plan, snaps)
        if not last:
            return None, snaps
        return self._logits(x[0] if plan.trim else x[0, last_rows]), snaps

    # A step is pieces and attention calls: piece 0, attention 0, piece 1, ..., attention L-1, piece L (`_piece`).

    def _forward(self, ids, pos, kv_rows, plan: "_StepPlan", snaps) -> torch.Tensor:
        """Embedding and every layer over the packed step: hidden states [1, N, D] (before the final norm)."""
        # Prompt-only steps take bf16 q/k/v in the lightning layers (what the prefill kernel's tensor cores read);
        # decode rows keep fp32.
        bf16 = plan.dec is None and self.model.dtype == torch.bfloat16
        io = StepIO(ids=ids, pos=pos, kv_rows=kv_rows, qkv_dtype=torch.bfloat16 if bf16 else self.acc)
        io.v_in_place = (bf16 and self.v_in_place and not self.cfg.linear_silu
                         and ids.shape[0] >= self.v_in_place_min_tokens)
        cfg = self.cfg
        io.qk_raw = (io.v_in_place and self.qk_prologue_in_prefill and self.use_kernels and cfg.use_qk_norm
                     and (ids.device.type != "cuda" or (cfg.d_head == 128 and cfg.rot_dim == 64)))
        self._piece(0, io)
        L = self.cfg.num_hidden_layers
        for l in range(L):
            if plan.trim and l == L - 1:
                return self._last_layer_logit_rows(io, plan)
            self._attention(l, io, plan, snaps)
            self._piece(l + 1, io)
        return io.x

    def _last_layer_logit_rows(self, io: StepIO, plan: "_StepPlan") -> torch.Tensor | None:
        """The last (softmax) layer from its attention on, for the step's logit rows only (plan.trim): hidden states
        [1, n_out, D] in plan.out_rows' order, or None when the step returns no logits. Its K/V are in the cache
        already (written by the layer's prologue for every row). io may be a step's padded buffers: the logit rows
        come before the padding."""
        if plan.out_rows.numel() == 0:
            return None
        l = self.cfg.num_hidden_layers - 1
        out = torch.empty_like(io.qs)  # only the logit rows get written
        self._softmax_core(l, io.qs, plan, out, logit_rows_only=True)
        rows = plan.out_rows
        sel = StepIO(x=io.x[:, rows], a=out[rows])
        self._piece(l + 1, sel)
        return sel.x

    def _forward_pieces(self, pieces, io: StepIO, ids, pos, kv_rows, plan: "_StepPlan", snaps) -> torch.Tensor:
        """_forward with the pieces replayed from `pieces` on the padded buffers `io` (ids, pos and kv_rows come
        padded to io's rows). The attention works on the first N rows; the rows past them stay zero in its outputs,
        so every padding row carries the same values (token 0 at position 0) and they all route to the same experts."""
        n = plan.offs[-1]
        io.ids.copy_(ids)
        io.pos.copy_(pos)
        io.kv_rows.copy_(kv_rows)
        io.clear_outputs(n)
        pieces(0)
        L = self.cfg.num_hidden_layers
        for l in range(L):
            if plan.trim and l == L - 1:
                return self._last_layer_logit_rows(io, plan)  # the last piece eagerly, on the logit rows
            self._attention(l, io, plan, snaps, n)
            pieces(l + 1)
        return io.x[:, :n]

    def _piece(self, k: int, io: StepIO) -> None:
        """Piece k of a step: the end of layer k-1 (its attention output through the gate / norm and the output
        projection, the residual add + norm, the MLP) and the start of layer k (residual add + input norm, the QKV
        projection and prologue); piece 0 starts with the embedding, piece L ends with the last residual add."""
        layers = self.model.model.layers
        if k == 0:
            x, h = self._add_norm(self.model.model.word_embeddings(io.ids)[None], None, layers[0].input_layernorm)
            cos, sin = rope_cos_sin(io.pos[None], self.cfg.rot_dim, self.cfg.rope_theta, self.acc)
            io.put("cos", cos)
            io.put("sin", sin)
        else:
            layer = layers[k - 1]
            x, h = self._add_norm(io.x, self._attention_out(k - 1, layer.attention, io), layer.post_attention_layernorm)
            if k == len(layers):
                io.put("x", x + self._mlp(layer.mlp, h))
                return
            x, h = self._mlp_and_norm(layer.mlp, x, h, layers[k].input_layernorm)
        layer = layers[k]
        io.put("x", x)
        if layer.is_softmax:
            self._softmax_in(k, layer.attention, h, io)
        else:
            self._lightning_in(k, layer.attention, h, io)

    def _attention(self, l: int, io: StepIO, plan: "_StepPlan", snaps, n: int | None = None) -> None:
        """Layer l's sequence mixing (eager: per request) on the first n rows of io (all without n)."""
        rows = slice(None) if n is None else slice(0, n)
        if self.model.model.layers[l].is_softmax:
            out = io.a[rows] if io.static else torch.empty_like(io.qs)
            self._softmax_core(l, io.qs[rows], plan, out)
            if not io.static:
                io.a = out
        elif self.use_kernels:
            o = self._lightning_kernels(l, io.q[rows], io.k[rows], io.v[rows], self.states.states[l], plan, snaps,
                                        out=io.o[rows] if io.static else None,
                                        pro=self._qk_prologue(l, io) if io.qk_raw else None)
            if not io.static:
                io.o = o
        else:
            io.o = self._lightning_reference(l, io.q, io.k, io.v, self.states.states[l], self.decay[l], plan, snaps)

    def _add_norm(self, x, delta, norm):
        """(x + delta, norm(x + delta)): the residual add and the next RMSNorm, one fused pass on the kernel path."""
        if self.use_kernels:
            s, h = cuda_kernels.add_rms_norm(x[0], None if delta is None else delta[0], norm.weight, norm.eps)
            return s[None], h[None]
        if delta is not None:
            x = x + delta
        return x, norm(x)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, D] (before the final norm) -> logits [n, V] in the accumulation dtype."""
        norm = self.model.model.norm
        if self.use_kernels:
            _, h = cuda_kernels.add_rms_norm(hidden, None, norm.weight, norm.eps)
            return self._proj(self.model.lm_head, h).to(self.acc)
        return self.model.lm_head(norm(hidden)).to(self.acc)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, K] @ w [M, K]^T: a decode step's few rows (<= LINEAR_SMALL_ROWS) through the GEMV kernel, whose
        weight loads start before the kernel ahead of it ends (kernels/gemv.py); more rows through a GEMM."""
        if self.use_kernels and x.shape[0] <= LINEAR_SMALL_ROWS:
            return cuda_kernels.linear_small(x, w, out=out)
        return torch.mm(x, w.t(), out=out)

    def _proj(self, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """A bias-free nn.Linear of the model on x [N, K] through _linear (with a bias: the module itself)."""
        return linear(x) if linear.bias is not None else self._linear(x, linear.weight)

    # ------------------------------------------------------------------------------------------ decode steps

    def _bind_tables(self, segs: list[Segment]) -> None:
        """Write the device block table of each decoding request's slot the first time it decodes."""
        for s in segs:
            if s.decode and self._slot_blocks.get(s.slot) is not s.block_table:
                if len(s.block_table) > self.max_blocks:
                    raise ValueError(f"request has {len(s.block_table)} KV blocks, the runner's tables hold {self.max_blocks}")
                row = torch.zeros(self.max_blocks, dtype=torch.int32)
                row[: len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
                self.slot_tables[s.slot].copy_(to_device(row, self.slot_tables.device))
                self._slot_blocks[s.slot] = s.block_table

    def _decode(self, segs: list[Segment], feed: torch.Tensor | None, fed: list[tuple[int, int]]) -> torch.Tensor:
        """A decode-only step on the kernel path: logits [B, V], through the captured graph when there is one."""
        B = len(segs)
        dev = to_device(torch.tensor([[s.tokens[0] for s in segs], [s.start for s in segs], [s.slot for s in segs],
                                      [-1 if s.feed is None else s.feed for s in segs]], dtype=torch.int64),
                        self.model.device)
        ids = dev[0]
        if len(fed) == B and feed.shape[0] == B and all(f == i for i, f in fed):
            ids = feed  # the steady state: every row takes the previous step's row of the same index
        elif fed:
            ids = torch.where(dev[3] >= 0, feed[dev[3].clamp_min(0)], dev[0])
        inputs = {"ids": ids, "pos": dev[1], "slots": dev[2]}
        if self.graphs is not None and len(segs) <= self.graphs.batch_sizes[-1]:
            return self.graphs(inputs)
        return self._decode_step(inputs)

    def _decode_inputs(self, batch: int) -> dict[str, torch.Tensor]:
        dev = self.model.device
        return {name: torch.zeros(batch, dtype=torch.int64, device=dev) for name in ("ids", "pos", "slots")}

    def _decode_step(self, inp: dict[str, torch.Tensor]) -> torch.Tensor:
        """Graph body: ids, pos, slots [B] int64 (slot -1 = padding row) -> logits [B, V]. Device work only."""
        ids, pos, slots = inp["ids"], inp["pos"], inp["slots"]
        bs = self.kv.block_size
        valid = slots >= 0
        tables = self.slot_tables[slots.clamp_min(0)]  # [B, max_blocks]
        block = tables.gather(1, (pos // bs)[:, None])[:, 0].to(torch.int64)
        kv_rows = torch.where(valid, block * bs + pos % bs, self.kv.scratch_row)
        lengths = torch.where(valid, pos + 1, 0).to(torch.int32)  # keys incl. this token's; 0: attend to nothing
        plan = _StepPlan.decode_only(ids.shape[0], _DecodeGather(rows=slice(None), slots=slots, tables=tables, lengths=lengths,
                                                      max_len=self.max_blocks * bs))
        x = self._forward(ids, pos, kv_rows, plan, {})
        return self._logits(x[0])

    def _mlp(self, mlp, x):
        if self.use_kernels and isinstance(mlp, MoE):
            return self._fused_moe(mlp, x[0])[None]
        if not (self.use_kernels and isinstance(mlp, SwiGLU)):
            return mlp(x)
        x = x[0]  # the dense SwiGLU of the first layers, its projections through _proj
        return self._proj(mlp.down_proj, F.silu(self._proj(mlp.gate_proj, x)) * self._proj(mlp.up_proj, x))[None]

    def _mlp_and_norm(self, mlp, x, h, norm):
        """The residual stream after the MLP of h and the next layer's input norm of it: (x + mlp(h), norm(that)). On the
        kernel path a MoE's combine kernel adds and normalises too (the MoE output is never written)."""
        if self.use_kernels and self.moe_add_norm and isinstance(mlp, MoE):
            s, y = self._fused_moe(mlp, h[0], add_norm=(x[0], norm))
            return s[None], y[None]
        return self._add_norm(x, self._mlp(mlp, h), norm)

    def _fused_moe(self, mlp, x, add_norm=None):
        """x [N, D] -> [N, D]: the MoE block through the fused kernels. add_norm = (residual [N, D], RMSNorm module):
        (residual + MoE(x), norm of that) instead, from the combine kernel (as _add_norm would give them)."""
        sh = mlp.shared_experts
        bias = mlp.gate.expert_bias if self.cfg.moe_router_enable_expert_bias else None
        return cuda_kernels.fused_moe(x, mlp.gate.weight, bias, mlp.experts_gate_proj, mlp.experts_up_proj,
                                      mlp.experts_down_proj,
                                      None if sh is None else (sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight),
                                      self.router_cfg,
                                      add_norm=None if add_norm is None else (add_norm[0], add_norm[1].weight,
                                                                             add_norm[1].eps))

    # ------------------------------------------------------------------------------------------ lightning layers

    def _lightning_in(self, l, att, h, io: StepIO) -> None:
        """Projection to q, k, v (silu, QK-norm, RoPE) and the gate projection: io.q, io.k, io.v, io.gate."""
        cfg = self.cfg
        N = h.shape[1]
        H, d = cfg.num_attention_heads, cfg.d_head
        if self.use_kernels:  # one pass from the projection to q, k, v: same arithmetic as below without fp32 round trips
            qw, kw, _ = self.norm_f32[l]
            both = self.qkv_gate.get(l)
            if both is not None:  # one GEMM for the projection and the gate, read as two column slices
                t = self._linear(h[0], both, out=io.t if io.static else None)
                qkv, gate = t[:, : 3 * H * d], t[:, 3 * H * d:]
            else:
                qkv, gate = self._proj(att.query_key_value, h[0]), self._proj(att.g_proj, h[0])
            if io.qk_raw:  # the prefill applies the QK-norm and RoPE as it loads q and k: the projection's columns
                io.q, io.k, io.v = qkv.unflatten(1, (3 * H, d)).split(H, 1)
                io.gate = gate
                return
            q, k, v = cuda_kernels.qkv_prologue(
                qkv, io.pos, H, H, d, silu=cfg.linear_silu,
                q_norm_weight=qw, k_norm_weight=kw, eps=att.query_layernorm.eps,
                rotary_dim=cfg.rot_dim, rope_theta=cfg.rope_theta, out_dtype=io.qkv_dtype, rope_cos_sin=(io.cos, io.sin),
                out=(io.q, io.k, io.v) if io.static else None, v_in_place=io.v_in_place)
            if io.static:
                if both is None:  # (with the packed weights the gate already is io.gate: a view of io.t)
                    io.gate.copy_(gate)
            else:
                io.q, io.k, io.v, io.gate = q, k, v, gate
            return
        qkv = att.query_key_value(h).to(self.acc)
        if cfg.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(1, N, 3, H, d).unbind(2)
        if cfg.use_qk_norm:
            q, k = att.query_layernorm(q), att.key_layernorm(k)
        io.q, io.k = apply_partial_rope(q, io.cos, io.sin), apply_partial_rope(k, io.cos, io.sin)
        io.v, io.gate = v, att.g_proj(h)

    def _attention_out(self, l, att, io: StepIO):
        """The attention output of layer l through the output projection: [1, N, D]."""
        cfg = self.cfg
        N = io.x.shape[1]
        H, d = cfg.num_attention_heads, cfg.d_head
        dtype = self.model.dtype
        if self.model.model.layers[l].is_softmax:
            return self._proj(att.dense, io.a.reshape(N, H * d))[None]
        if self.use_kernels:  # group RMSNorm * sigmoid gate in one pass (reads the prefill kernel's bf16 output as is)
            o = cuda_kernels.gated_group_rmsnorm(io.o.view(N, H * d), io.gate, self.norm_f32[l][2],
                                                 cfg.group_norm_size, cfg.rms_norm_eps, out_dtype=dtype)
            return self._proj(att.dense, o)[None]
        o = group_rms_norm(io.o.reshape(1, N, H * d), att.g_norm.weight, cfg.group_norm_size, cfg.rms_norm_eps)
        o = o * torch.sigmoid(io.gate.to(self.acc))
        return att.dense(o.to(dtype))

    def _qk_prologue(self, l, io: StepIO):
        """Layer l's QK-norm and RoPE for a prefill handed raw q and k (io.qk_raw)."""
        qw, kw, _ = self.norm_f32[l]
        eps = self.model.model.layers[l].attention.query_layernorm.eps
        return cuda_kernels.QKPrologue(qw, kw, eps, io.cos[0], io.sin[0], io.pos, self.cfg.rope_theta)

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
                if s.snapshot_slot is not None and c1 - a == s.snapshot_at - s.start:
                    self._snapshot(l, s.snapshot_slot, S[0])
                    snaps.add(i)
            pool[s.slot] = S[0]
        return o

    def _lightning_kernels(self, l, q, k, v, pool, plan: "_StepPlan", snaps, out=None, pro=None):
        """q, k, v [N, H, d]: decode rows in one in-place step over the pool; prompt chunks in varlen launches, one
        per cut round (round r runs every segment's r-th piece; a segment's pieces are sequential in its slot).
        Writes `out` (fp32 [N, H, d]) when given. Otherwise a prompt-only step in one round returns the prefill
        kernel's output itself (bf16 for bf16 q: the gated norm reads it directly), and other steps an fp32 buffer.
        pro: q and k are raw, the prefill applies this QKPrologue (prompt-only steps)."""
        assert pro is None or plan.dec is None, "raw q and k are for prompt-only steps"
        gamma = self.gamma[l]
        rounds = self._prefill_rounds(plan, q.device)
        if out is None and plan.dec is not None and not rounds and _all_rows(plan.dec.rows):  # decode only: as is
            return cuda_kernels.lightning_decode(q, k, v, pool, plan.dec.slots, gamma, scale=self.scale)
        whole = out is None and plan.dec is None and len(rounds) == 1 and _covers(rounds[0][0], q.shape[0])
        o = out if out is not None else None if whole else torch.empty(q.shape, dtype=torch.float32, device=q.device)
        if plan.dec is not None:
            rows = plan.dec.rows
            if isinstance(rows, slice):  # the decodes are a run of rows: the kernel reads and writes views
                cuda_kernels.lightning_decode(q[rows], k[rows], v[rows], pool, plan.dec.slots, gamma, scale=self.scale,
                                              out=o[rows])
            else:
                o[rows] = cuda_kernels.lightning_decode(q[rows], k[rows], v[rows], pool, plan.dec.slots, gamma,
                                                        scale=self.scale)
        for batch, cu, slots, prep in rounds:
            lo, hi = batch[0][1], batch[-1][2]
            if _covers(batch, hi, lo):  # the pieces are one run of rows: a view, no copy
                cat = lambda t: t[lo:hi]  # noqa: E731
            else:
                cat = lambda t: torch.cat([t[a:b] for _, a, b in batch])  # noqa: E731
            p = None if pro is None else pro.rows(slice(lo, hi) if _covers(batch, hi, lo) else [(a, b) for _, a, b in batch])
            if prep is not None:  # planned once per step, reused by every lightning layer
                o_r = cuda_kernels.run_prepared_prefill(prep, cat(q), cat(k), cat(v), pool, gamma, scale=self.scale,
                                                        qk_prologue=p)
            else:
                o_r = cuda_kernels.lightning_prefill(cat(q), cat(k), cat(v), pool, cu, slots, gamma, scale=self.scale,
                                                     qk_prologue=p)
            if whole:
                o = o_r
            elif _covers(batch, hi, lo):
                o[lo:hi] = o_r
            else:
                for (_, c0, c1), a in zip(batch, cu):
                    o[c0:c1] = o_r[a:a + c1 - c0]
            for i, c0, c1 in batch:
                s = plan.segs[i]
                if s.snapshot_slot is not None and c1 - plan.offs[i] == s.snapshot_at - s.start:
                    self._snapshot(l, s.snapshot_slot, pool[s.slot])
                    snaps.add(i)
        return o

    def _snapshot(self, l: int, slot: int, state: torch.Tensor) -> None:
        """Queue the copy of layer l's state into arena `slot` (preallocated: no allocation mid-step)."""
        self.snapshot_arena.states[l][slot].copy_(state)

    def _prefill_rounds(self, plan: "_StepPlan", device):
        """The step's varlen prefill launches, one per cut round: (pieces, cu_seqlens, slots, prepared plan or None).
        Computed by the first lightning layer of the step; the device plan (tables + workspace) is built once."""
        if plan.rounds is None:
            pieces = {i: plan.cuts(i) for i in plan.prefill}
            plan.rounds = []
            for r in range(max((len(p) - 1 for p in pieces.values()), default=0)):
                batch = [(i, p[r], p[r + 1]) for i, p in pieces.items() if r + 1 < len(p)]
                cu = [0]
                for _, c0, c1 in batch:
                    cu.append(cu[-1] + c1 - c0)
                slots = [plan.segs[i].slot for i, _, _ in batch]
                prep = None
                if device.type == "cuda" and cuda_kernels.available():
                    prep = cuda_kernels.prepare_prefill([b - a for a, b in zip(cu, cu[1:])], slots, [True] * len(slots),
                                                        self.cfg.num_attention_heads, self.cfg.d_head, device)
                plan.rounds.append((batch, cu, slots, prep))
        return plan.rounds

    # ------------------------------------------------------------------------------------------ softmax layers

    def _softmax_in(self, l, att, h, io: StepIO) -> None:
        """Projection to q (io.qs, [N, H, d]), k and v written into the KV cache at io.kv_rows; QK-norm and RoPE."""
        cfg = self.cfg
        N = h.shape[1]
        H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.d_head
        K, V = self.kv.k[l], self.kv.v[l]
        if self.use_kernels:  # the fused prologue, writing k and v into the cache rows; QK-norm in the projection's
            qw, kw, _ = self.norm_f32[l]  # dtype, as the modules below do
            q, _, _ = cuda_kernels.qkv_prologue(
                self._proj(att.query_key_value, h[0]), io.pos, H, Hkv, d, silu=False,
                q_norm_weight=qw, k_norm_weight=kw, eps=att.query_layernorm.eps,
                rotary_dim=cfg.rot_dim, rope_theta=cfg.rope_theta, out_dtype=h.dtype, norm_dtype=h.dtype,
                rope_cos_sin=(io.cos, io.sin), kv_cache=(K, V, io.kv_rows),
                out=(io.qs, None, None) if io.static else None)
            if not io.static:
                io.qs = q
            return
        q, k, v = att.query_key_value(h).view(1, N, H + 2 * Hkv, d).split([H, Hkv, Hkv], dim=2)
        if cfg.use_qk_norm:
            q, k = att.query_layernorm(q), att.key_layernorm(k)
        io.qs = apply_partial_rope(q.to(self.acc), io.cos, io.sin).to(h.dtype)[0]  # [N, H, d]
        K[io.kv_rows] = apply_partial_rope(k.to(self.acc), io.cos, io.sin).to(h.dtype)[0]  # [N, Hkv, d]
        V[io.kv_rows] = v[0]

    def _softmax_core(self, l, q, plan: "_StepPlan", out, logit_rows_only: bool = False) -> None:
        """Attention of the step's queries q [N, H, d] over the KV cache into out [N, H, d]: decode rows through the
        paged kernel (or the padded reference), each prompt chunk causally over its whole prefix. logit_rows_only:
        of a prompt chunk only its last row, where the prompt ends in the step (a one-query chunk: it sees every key
        of its prefix), and nothing of a chunk that does not end its prompt; those rows of out are left unwritten."""
        cfg = self.cfg
        H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.d_head
        K, V = self.kv.k[l], self.kv.v[l]
        rep, scale = H // Hkv, d ** -0.5
        g = plan.dec
        if g is not None and self.use_kernels:
            # Paged-KV decode: each request's blocks read in place through its table; the rep query heads of a KV
            # head share one read of each K/V row.
            if isinstance(g.rows, slice):  # every row (decode graphs) or a run of them: written in place
                cuda_kernels.paged_decode_attention(q[g.rows], K, V, g.tables, g.lengths, self.kv.block_size, scale,
                                                    max_len=g.max_len, out=out[g.rows])
            else:
                out[g.rows] = cuda_kernels.paged_decode_attention(q[g.rows], K, V, g.tables, g.lengths,
                                                                  self.kv.block_size, scale, max_len=g.max_len)
        elif g is not None:
            Kd = K[g.kv_index].transpose(1, 2).repeat_interleave(rep, 1)  # [B, H, Lmax, d]
            Vd = V[g.kv_index].transpose(1, 2).repeat_interleave(rep, 1)
            o = F.scaled_dot_product_attention(q[g.rows][:, :, None], Kd, Vd, attn_mask=g.mask, scale=scale)
            out[g.rows] = o[:, :, 0]
        for i in plan.prefill:
            a, b = plan.offs[i], plan.offs[i + 1]
            if logit_rows_only:
                if not plan.segs[i].want_logits:
                    continue
                a = b - 1
            rows = plan.kv_prefix_rows[i]  # KV cache rows 0..end, sent with the step's indices
            qs = q[a:b].transpose(0, 1)[None]  # [1, H, T, d]
            Ks, Vs = K[rows].transpose(0, 1)[None], V[rows].transpose(0, 1)[None]  # [1, Hkv, end, d]
            o = self.chunk_attention(qs, Ks, Vs, scale)
            out[a:b] = o[0].transpose(0, 1)

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


def _all_rows(rows) -> bool:
    """A decode gather's rows index is every row of the step (the decode graphs' `slice(None)`)."""
    return isinstance(rows, slice) and rows == slice(None)


def _covers(pieces, end: int, start: int = 0) -> bool:
    """True when the (segment, c0, c1) pieces are consecutive rows start..end."""
    at = start
    for _, c0, c1 in pieces:
        if c0 != at:
            return False
        at = c1
    return at == end


@dataclass
class _DecodeGather:
    rows: torch.Tensor | slice  # [B] packed-row index of each decode token (slice(None): every row)
    slots: torch.Tensor  # [B] state-pool slot (-1: padding row)
    kv_index: torch.Tensor | None = None  # reference path: [B, Lmax] KV cache rows
    mask: torch.Tensor | None = None  # reference path: [B, 1, 1, Lmax] valid keys
    tables: torch.Tensor | None = None  # kernel path: [B, max_blocks] int32 block tables
    lengths: torch.Tensor | None = None  # kernel path: [B] int32 keys to attend (0: padding row)
    max_len: int = 0  # kernel path: host bound on lengths (sizes the attention's key splits)


class _StepPlan:
    def __init__(self, segs: list[Segment], offs: list[int], dec: _DecodeGather | None):
        self.segs, self.offs, self.dec = segs, offs, dec
        self.prefill = [i for i, s in enumerate(segs) if not s.decode]
        self.rounds: list | None = None  # the kernel path's prefill launches (runner._prefill_rounds)
        self.kv_prefix_rows: dict[int, torch.Tensor] = {}  # prompt segment -> KV cache rows 0..end (softmax layers)
        self.trim = False  # the last layer runs past its attention inputs for out_rows only (last_layer_logit_rows_only)
        self.out_rows: torch.Tensor | None = None  # [n_out] the packed rows whose logits the step returns

    @classmethod
    def decode_only(cls, batch: int, dec: _DecodeGather) -> "_StepPlan":
        """A step of `batch` decode rows described by device tensors alone (no host segments: graph capture)."""
        return cls([], list(range(batch + 1)), dec)

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
