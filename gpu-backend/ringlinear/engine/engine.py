"""The continuous-batching engine: requests in, tokens out, one `step()` at a time.

    Request (waiting)  --admit-->  Request (running: a state slot + KV blocks)  --step()-->  RequestOutput events
                                   \\-- prefix cache lookup: may start from a snapshot, skipping that prefill

Each step: every running request whose prompt is done decodes one token (so streams keep flowing), and the
remaining token budget (`max_step_tokens`) goes to prompt chunks, oldest request first (a chunk that does not
finish its prompt preferably ends on a multiple of the prefix block); the linear states at the last prefix-block
boundary inside each chunk are snapshotted into the prefix cache. A step with no decode in it (nobody is streaming)
may carry up to `max_prefill_step_tokens` of prompt instead: large chunks amortise the per-step weight reads.

On CUDA steps overlap (`EngineConfig.overlap`): a `step()` call launches the next step before the previous one's
tokens reach the host, its decodes reading those tokens on the device, and then emits the previous step's tokens.

Memory never runs out mid-stream: a request is admitted only when a slot is free and the KV blocks for its whole
prompt + max_tokens can be allocated (evicting prefix snapshots if needed); otherwise it waits in the queue, and
`add_request` refuses (QueueFull) once `max_queue` are waiting. All sizes come from one explicit `MemoryPlan`.

Single-threaded by design: `step`, `add_request` and `abort` must be called from one thread (`AsyncEngine` does).
"""

from __future__ import annotations

import itertools
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..config import RingLinearConfig
from ..model import RingLinearForCausalLM
from .detokenizer import IncrementalDetokenizer
from .pools import LinearStatePool, PagedKVCache, SnapshotArena
from .prefix_cache import PrefixCache
from .runner import ModelRunner, Segment
from .sampling import SampledBatch, Sampler, SamplingParams, TokenLogprobs, launch_sampling


class EngineConfigError(ValueError):
    """The engine options cannot be satisfied (e.g. the memory budget cannot hold one max-context request)."""


class RequestRejected(ValueError):
    """The request can never run (too long for the context); `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param, self.code = param, code


class WarmUp(NamedTuple):
    """What `Engine.warm_up` ran: prompt tokens through the model, chunk attention shapes run to build cuDNN plans,
    graphs of the steps' pieces captured for steps of up to max_step_tokens rows."""
    tokens: int
    attention_shapes: int
    step_graphs: int = 0


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; retry later (HTTP 503 + Retry-After)."""


@dataclass
class EngineConfig:
    max_batch: int = 8  # state slots = requests running at once
    max_context: int | None = None  # prompt + generated tokens; None = the model's max_position_embeddings
    memory_budget: int = 1 << 30  # bytes for linear-state slots + paged KV + prefix snapshots (weights excluded)
    prefix_cache_bytes: int | None = None  # of the budget; None = a quarter of it; 0 disables the prefix cache
    max_queue: int = 64
    block_size: int = 16  # KV block (tokens)
    prefix_block: int = 64  # snapshot granularity (tokens); a multiple of block_size and of the lightning chunk (64)
    max_step_tokens: int = 512  # tokens per step (decodes + prompt chunks): bounds the time between a stream's tokens
    # tokens of a step that carries no decode (prompt chunks only: no stream is waiting on it); None = max_step_tokens.
    # Each step re-reads every weight the step touches (all experts, once a chunk is a few hundred tokens), so long
    # prompts go several times faster in large chunks when nothing else is generating (docs/benchmarks.md)
    max_prefill_step_tokens: int | None = None
    kernels: bool | None = None  # CUDA kernels in the runner; None = wherever they apply (CUDA, bf16)
    cuda_graphs: bool | None = None  # decode steps as CUDA graph replays; None = whenever the kernel path runs on CUDA
    # launch step t+1 before step t's tokens reach the host (its decodes read them on the device), so the GPU does not
    # idle through the host's work between steps; None = on CUDA (`Engine.step`)
    overlap: bool | None = None
    # snapshot replies too (at each prefix-block boundary a decode reaches; each request keeps its latest), so a chat's
    # next turn resumes after the reply. Copied into the preallocated snapshot arena: on the H200 B=256 decode steps
    # cost the same with them as without, but for the one step where a request first reaches a boundary (docs/pod.md)
    reply_snapshots: bool = True


@dataclass
class MemoryPlan:
    slot_bytes: int
    block_bytes: int
    slots: int
    kv_blocks: int
    prefix_bytes: int

    @property
    def total(self) -> int:
        return self.slots * self.slot_bytes + (self.kv_blocks + 1) * self.block_bytes + self.prefix_bytes  # + scratch

    @classmethod
    def make(cls, cfg: RingLinearConfig, ec: EngineConfig, dtype: torch.dtype, max_context: int) -> "MemoryPlan":
        slot_b = LinearStatePool.bytes_per_slot(cfg)
        block_b = max(1, PagedKVCache.bytes_per_block(cfg, ec.block_size, dtype))
        prefix = ec.memory_budget // 4 if ec.prefix_cache_bytes is None else ec.prefix_cache_bytes
        if slot_b == 0:  # no linear layers: a snapshot is KV blocks of the paged pool alone, the budget holds nothing
            prefix = 0
        kv_bytes = ec.memory_budget - ec.max_batch * slot_b - prefix
        blocks = kv_bytes // block_b - 1 if kv_bytes > 0 else 0  # - the KV cache's scratch block
        need = -(-max_context // ec.block_size)
        if blocks < need:
            floor = ec.max_batch * slot_b + prefix + (need + 1) * block_b
            raise EngineConfigError(
                f"memory budget {ec.memory_budget} B cannot hold {ec.max_batch} state slots ({slot_b} B each), the prefix "
                f"cache ({prefix} B) and one {max_context}-token context ({need} KV blocks of {block_b} B): "
                f"need at least {floor} B; raise --memory-budget or lower --max-batch / --max-context")
        return cls(slot_b, block_b, ec.max_batch, int(blocks), prefix)


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # new tokens of this step
    text: str  # new final text
    logprobs: list[TokenLogprobs | None]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class _Launched(NamedTuple):
    """A step queued on the device: the requests whose logits it computes (row order) and those logits; the
    generation snapshots it took (request, length, the arena slot its states are copied into, the KV blocks held for
    it)."""
    want: list["Request"]
    logits: torch.Tensor | None
    prompt_tokens: int
    snapshots: list[tuple["Request", int, int, list[int]]]


class _Tokens:
    """prompt + output as one sequence for slicing (the prefix cache hashes blocks of it), without concatenating."""

    def __init__(self, prompt, output: list[int]):
        self.prompt, self.output = prompt, output

    def __getitem__(self, s: slice) -> list[int]:
        n = len(self.prompt)
        return list(self.prompt[s.start: min(s.stop, n)]) + self.output[max(s.start - n, 0): max(s.stop - n, 0)]


@dataclass(eq=False)  # identity: `req in self.running` must not compare prompts field by field
class Request:
    id: str
    prompt: array  # int64 token ids: unlike a list, the garbage collector does not visit each token (a full
    # collection over 200 lists of 64k ints costs tens of ms, paid by whichever step triggers it)
    params: SamplingParams
    sampler: Sampler
    detok: IncrementalDetokenizer | None
    arrival: float = field(default_factory=time.monotonic)
    slot: int | None = None
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose effect is in the slot / KV (prompt, then fed outputs)
    output: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    finish_reason: str | None = None
    prefix_chain: bytearray = field(default_factory=bytearray, repr=False)  # the prompt's block hashes so far
    pending: int = 0  # tokens sampled on the device, not yet on the host (overlapped steps: 0 or 1)
    sampled_row: int = 0  # the row of its latest pending token in that step's samples
    gen_snapshot: bytes | None = None  # the prefix-cache key of its latest snapshot taken while generating

    @property
    def prefill_done(self) -> bool:
        return self.computed >= len(self.prompt)


class Engine:
    def __init__(self, model: RingLinearForCausalLM, config: EngineConfig | None = None, tokenizer=None,
                 eos_ids: set[int] | None = None):
        self.model = model.eval()
        self.cfg: RingLinearConfig = model.config
        ec = self.config = config or EngineConfig()
        self.max_context = ec.max_context or self.cfg.max_position_embeddings
        if ec.prefix_block % ec.block_size or ec.prefix_block % 64:
            raise EngineConfigError(f"prefix_block ({ec.prefix_block}) must be a multiple of block_size ({ec.block_size}) and of 64")
        if ec.max_step_tokens < ec.prefix_block:
            raise EngineConfigError(f"max_step_tokens ({ec.max_step_tokens}) must be >= prefix_block ({ec.prefix_block})")
        if ec.max_prefill_step_tokens is not None and ec.max_prefill_step_tokens < ec.max_step_tokens:
            raise EngineConfigError(f"max_prefill_step_tokens ({ec.max_prefill_step_tokens}) must be >= max_step_tokens "
                                    f"({ec.max_step_tokens})")
        self.plan = MemoryPlan.make(self.cfg, ec, model.dtype, self.max_context)
        dev = model.device
        self.states = LinearStatePool(self.cfg, self.plan.slots, dev)
        self.kv = PagedKVCache(self.cfg, self.plan.kv_blocks, ec.block_size, model.dtype, dev)
        # the snapshots' memory, once: as many state slots as the prefix budget holds (its capacity is the budget). A
        # model without linear layers (an all-softmax config) snapshots KV blocks only: its arena slots hold nothing,
        # one per KV block bounds the entries (each pins at least one), and the cache is on unless turned off.
        if self.plan.slot_bytes:
            snapshots = self.plan.prefix_bytes // self.plan.slot_bytes
        else:
            snapshots = self.plan.kv_blocks if ec.prefix_cache_bytes != 0 else 0
        arena = SnapshotArena(self.cfg, snapshots, dev)
        self.prefix = PrefixCache(ec.prefix_block, arena, self.kv.blocks)
        self.runner = ModelRunner(model, self.states, self.kv, ec.kernels, self.max_context, ec.cuda_graphs, arena)
        self.overlap = ec.overlap if ec.overlap is not None else dev.type == "cuda"
        self._inflight: _Launched | None = None  # the overlapped step launched, its tokens not yet on the host
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids if eos_ids is not None else (tokenizer.eos_ids if tokenizer is not None else self.cfg.eos_ids))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        # counters for /metrics
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefill_tokens_computed = 0
        self.steps = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, generated tokens) of recent steps

    # ------------------------------------------------------------------------------------------ requests

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        params.validate()
        if not prompt:
            raise RequestRejected("the prompt is empty", "prompt")
        V = self.cfg.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= V for t in prompt):
            raise RequestRejected(f"prompt token ids must be integers in [0, {V})", "prompt")
        if len(prompt) + params.max_tokens > self.max_context:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_context} tokens; the prompt has {len(prompt)} and "
                f"max_tokens asks for {params.max_tokens}", "max_tokens" if len(prompt) < self.max_context else "prompt",
                "context_length_exceeded")
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestRejected(f"duplicate request id {rid}")
        detok = IncrementalDetokenizer(self.tokenizer.decode, params.stop) if self.tokenizer is not None else None
        req = Request(rid, array("q", prompt), params, Sampler(params), detok)
        self.requests[rid] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Drop a request now (client gone); its slot and KV blocks are free on return."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        req.finish_reason = req.finish_reason or "abort"
        self._free(req)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight is not None)

    def warm_up(self, tokens: int | None = None) -> WarmUp:
        """Run one prompt of the largest step (default: the prefill step budget) on a free slot and discard it: one
        step of all but its last 64 tokens, then a step of those 64 (the form of every chunk after a prompt's first).
        Then build the cuDNN attention plans of every chunk shape bucket a step can meet (kernel path on CUDA:
        `ModelRunner.build_attention_plans`), so a long prompt never waits for one (~50-150 ms each) mid-stream, and
        capture the pieces of a step between its attention calls as graphs for steps of up to max_step_tokens rows
        (`ModelRunner.capture_step_graphs`: the steps that carry prompt tokens beside the streams, which the host's
        launch rate bounds when they run eagerly).

        Done before serving, **on the thread that will run `step`** (torch keeps cuDNN plans per thread; the server
        calls it through `AsyncEngine.call`): cuDNN and cuBLAS build their plans and the allocator grows its pools at
        the largest step shape, and a step whose activations do not fit in the device's memory fails at start-up
        (torch.OutOfMemoryError) instead of under a user's request."""
        if self.has_work():
            raise RuntimeError("warm_up runs before any request is queued")
        ec, bs = self.config, self.kv.block_size
        n = min(tokens or ec.max_prefill_step_tokens or ec.max_step_tokens, self.max_context, self.kv.blocks.num_free * bs)
        if n <= 0 or not self.states.slots.free:
            return WarmUp(0, 0)
        slot, blocks = self.states.alloc(), self.kv.blocks.alloc(-(-n // bs))
        try:
            ids = [(7919 * i) % self.cfg.vocab_size for i in range(n)]  # any ids: the work does not depend on them
            cut = n - 64 if n > 128 else n
            self.runner.execute([Segment(slot, blocks, 0, ids[:cut], False, cut == n)])
            if cut < n:
                self.runner.execute([Segment(slot, blocks, cut, ids[cut:], False, True)])
        finally:
            self.kv.blocks.release(blocks)
            self.states.release(slot)
        plans = self.runner.build_attention_plans(max(ec.max_step_tokens, ec.max_prefill_step_tokens or 0),
                                                  self.max_context)
        return WarmUp(n, plans, self.runner.capture_step_graphs(ec.max_step_tokens))

    # ------------------------------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step whose tokens came back.

        Synchronous (`overlap` off): the step launched here, sampled and resolved before returning. Overlapped: this
        call samples the step launched by the previous call (on the device), schedules and launches the next one -
        its decodes take their tokens from those samples on the device - and only then waits for the previous step's
        tokens to reach the host and emits them. The GPU goes from one step to the next without waiting for the host's
        bookkeeping; a request that stops on a token (EOS, stop string) has one more step computed for it, discarded."""
        prev, self._inflight = self._inflight, None
        sampled = self._sample(prev) if prev is not None else None
        self._release_finishing()
        self._admit()
        segs, reqs = self._schedule()
        launched = self._launch(segs, reqs, sampled) if segs else None
        outs = self._resolve(prev, sampled) if prev is not None else []
        if launched is not None:
            if self.overlap:
                self._inflight = launched
            else:
                outs += self._resolve(launched, self._sample(launched))
            self._keep_generation_snapshots(launched.snapshots)
        return outs

    def _launch(self, segs: list[Segment], reqs: list[Request], feed: "SampledBatch | None") -> "_Launched":
        """Queue a step on the device: its forward pass and the prefix snapshots it takes."""
        logits, snaps = self.runner.execute(segs, feed.tokens if feed is not None else None)
        self.steps += 1
        prompt_tokens = 0
        for i, (seg, req) in enumerate(zip(segs, reqs)):
            req.computed = seg.end
            if not seg.decode:
                prompt_tokens += len(seg.tokens)
            if seg.snapshot_slot is not None:  # the runner copied the states into it; insert keeps it or frees it
                assert i in snaps, "a reserved snapshot slot was not written"
                self.prefix.insert(req.prompt, seg.snapshot_at, seg.snapshot_slot,
                                   req.blocks[: seg.snapshot_at // self.kv.block_size], req.prefix_chain)
        self.prefill_tokens_computed += prompt_tokens
        want = [req for seg, req in zip(segs, reqs) if seg.want_logits]
        for row, req in enumerate(want):
            req.sampled_row = row  # its token will be this row of the step's samples
            req.pending += 1
        return _Launched(want, logits, prompt_tokens, self._generation_snapshots(segs, reqs))

    def _generation_snapshots(self, segs: list[Segment], reqs: list[Request]) -> list:
        """Copy the states of the requests whose decode just reached a prefix-block boundary (queued behind the step),
        holding the KV blocks before it: a reply is then a cached prefix of the next turn's prompt. Stored once the
        boundary's tokens are on the host (`_keep_generation_snapshots`, at the end of the same call)."""
        if not (self.prefix.enabled and self.config.reply_snapshots):
            return []
        pb, bs, out = self.config.prefix_block, self.kv.block_size, []
        for seg, req in zip(segs, reqs):
            if seg.decode and (seg.start + 1) % pb == 0:
                slot = self.prefix.alloc_slot()
                if slot is None:  # every arena slot holds a snapshot of this step, not yet stored
                    continue
                self.prefix.arena.copy_from(slot, self.states, req.slot)
                blocks = req.blocks[: (seg.start + 1) // bs]
                self.kv.blocks.incref(blocks)  # the request may free its own blocks before the snapshot is stored
                out.append((req, seg.start + 1, slot, blocks))
        return out

    def _keep_generation_snapshots(self, snaps: list) -> None:
        """Store the generation snapshots whose tokens are all known (a token dropped after its request stopped is
        not), each request keeping only its latest, so a long reply holds one snapshot, not one per block."""
        for req, length, slot, blocks in snaps:
            if len(req.prompt) + len(req.output) >= length:  # insert keeps the slot or frees it
                key = self.prefix.insert(_Tokens(req.prompt, req.output), length, slot, blocks, req.prefix_chain)
                if key is not None:
                    self.prefix.discard(req.gen_snapshot)
                    req.gen_snapshot = key
            else:
                self.prefix.arena.free(slot)
            self.kv.blocks.release(blocks)

    def _sample(self, step: "_Launched") -> "SampledBatch | None":
        return launch_sampling(step.logits, [req.sampler for req in step.want]) if step.want else None

    def _resolve(self, step: "_Launched", sampled: "SampledBatch | None") -> list[RequestOutput]:
        """The step's tokens on the host: append each to its request and emit it (requests that finished or were
        aborted since the step was launched drop theirs)."""
        outs = []
        generated = 0
        for req, (token, lp) in zip(step.want, sampled.results() if sampled is not None else []):
            req.pending -= 1
            if req.finish_reason is not None:
                continue
            req.output.append(token)
            generated += 1
            outs.append(self._emit(req, token, lp))
        self.generation_tokens_total += generated
        now = time.monotonic()
        self._recent.append((now, generated + step.prompt_tokens))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()
        return outs

    def _emit(self, req: Request, token: int, lp: TokenLogprobs | None) -> RequestOutput:
        p = req.params
        text, reason = "", None
        is_eos = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        if is_eos:
            reason = "stop"
        elif req.detok is not None:
            text, stopped = req.detok.add(token)
            if stopped:
                reason = "stop"
        if reason is None and len(req.output) >= p.max_tokens:
            reason = "length"
        if reason is not None:
            if req.detok is not None and not (reason == "stop" and not is_eos):
                text += req.detok.flush()
            req.finish_reason = reason
            self.running.remove(req)
            self.requests.pop(req.id, None)
            self._free(req)
        return RequestOutput(req.id, [token], text, [lp], reason is not None, reason, len(req.prompt), len(req.output),
                             req.cached_tokens)

    def _release_finishing(self) -> None:
        """Free now the slot and KV blocks of each request whose last token (max_tokens) is in flight: only the step
        already queued uses them, and whatever a request admitted into them runs is queued after it on the stream.
        (A slot freed when its request's tokens come back would reach the queue a step later than without overlap.)"""
        for req in self.running:
            if req.pending and len(req.output) + req.pending >= req.params.max_tokens:
                self._free(req)

    def _free(self, req: Request) -> None:
        if req.slot is not None:
            self.states.release(req.slot)
            req.slot = None
        if req.blocks:
            self.kv.blocks.release(req.blocks)
            req.blocks = []

    # ------------------------------------------------------------------------------------------ scheduling

    def _admit(self) -> None:
        bs = self.kv.block_size
        while self.waiting and self.states.slots.free:
            req = self.waiting[0]
            total = -(-(len(req.prompt) + req.params.max_tokens) // bs)
            snap = self.prefix.match(req.prompt, req.prefix_chain) if self.prefix.enabled else None
            shared = snap.kv_blocks if snap is not None else []
            self.kv.blocks.incref(shared)  # hold them before any eviction below
            need = total - len(shared)
            if self.kv.blocks.num_free < need:
                self.prefix.evict_for_blocks(need)
            if self.kv.blocks.num_free < need:  # wait for running requests to finish (first come, first served)
                self.kv.blocks.release(shared)
                if self.prefix.enabled:  # the lookup is repeated on the next try; count it once
                    self.prefix.lookups -= 1
                if snap is not None:
                    self.prefix.hits -= 1
                    self.prefix.tokens_saved -= snap.length
                return
            self.waiting.popleft()
            req.blocks = shared + self.kv.blocks.alloc(need)
            req.slot = self.states.alloc()
            if snap is not None:
                self.states.restore(req.slot, snap.states)
                req.computed = req.cached_tokens = snap.length
            self.prompt_tokens_total += len(req.prompt)
            self.running.append(req)

    def _schedule(self) -> tuple[list[Segment], list[Request]]:
        segs, reqs = [], []
        ec = self.config
        pb = ec.prefix_block
        # Decodes in slot order: the lightning decode kernel walks the state pool in row order, and ascending slots
        # keep its reads and writes in ascending addresses (2.5% faster at 256 rows than a shuffled order on the
        # H200; docs/kernels.md). Slots are recycled, so admission order is not slot order after the first requests.
        decoding = [r for r in self.running if r.prefill_done and len(r.output) + r.pending < r.params.max_tokens]
        for req in sorted(decoding, key=lambda r: r.slot):
            if req.pending:  # its last token is still on the device: row sampled_row of the in-flight samples
                segs.append(Segment(req.slot, req.blocks, req.computed, [0], True, True, feed=req.sampled_row))
            else:
                segs.append(Segment(req.slot, req.blocks, req.computed, [req.output[-1]], True, True))
            reqs.append(req)
        # a step that carries decodes is bounded for the streams' sake; one of prompt chunks alone may be larger
        budget = (ec.max_step_tokens if segs else ec.max_prefill_step_tokens or ec.max_step_tokens) - len(segs)
        for req in self.running:
            if req.prefill_done:
                continue
            start, remaining = req.computed, len(req.prompt) - req.computed
            n = min(remaining, budget)
            aligned = (start + n) // pb * pb - start
            if n < remaining and aligned >= n // 2 and aligned > 0:  # prefer ending on a snapshot boundary
                n = aligned
            if n <= 0:
                if any(not s.decode for s in segs):
                    break
                n = min(remaining, pb)  # decodes took the whole budget: still move one prompt forward
            end = start + n
            # The last boundary inside the chunk; for the prompt's final chunk the last one before its last token,
            # so that the same prompt sent again (which must recompute >= 1 token) still hits.
            last = end - 1 if end == len(req.prompt) else end
            snap_at = last // pb * pb if self.prefix.enabled else 0
            # its arena slot is taken now, before the step that copies into it is queued (none if already cached)
            snap_slot = self.prefix.reserve(req.prompt, snap_at, req.prefix_chain) if snap_at > start else None
            segs.append(Segment(req.slot, req.blocks, start, req.prompt[start:end], False, end == len(req.prompt),
                                snap_at if snap_at > start else None, snap_slot))
            reqs.append(req)
            budget -= n
            if budget <= 0:
                break
        return segs, reqs

    # ------------------------------------------------------------------------------------------ stats

    def stats(self) -> dict:
        now = time.monotonic()
        window = [(t, n) for t, n in self._recent if now - t <= 10.0]
        span = (now - window[0][0]) if len(window) > 1 else 0.0
        used = (self.states.slots.used * self.plan.slot_bytes + self.kv.blocks.used * self.plan.block_bytes
                + self.prefix.bytes)
        return {
            "queue_depth": len(self.waiting),
            "running": len(self.running),
            "slots_total": self.plan.slots,
            "slots_used": self.states.slots.used,
            "kv_blocks_total": self.plan.kv_blocks,
            "kv_blocks_used": self.kv.blocks.used,
            "memory_budget_bytes": self.config.memory_budget,
            "memory_reserved_bytes": self.plan.total,
            "memory_in_use_bytes": used,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "prefill_tokens_computed_total": self.prefill_tokens_computed,
            "tokens_per_second": (sum(n for _, n in window[1:]) / span) if span > 0 else 0.0,
            "prefix_cache_lookups": self.prefix.lookups,
            "prefix_cache_hits": self.prefix.hits,
            "prefix_cache_hit_rate": self.prefix.hit_rate,
            "prefix_cache_tokens_saved": self.prefix.tokens_saved,
            "prefix_cache_entries": len(self.prefix.entries),
            "prefix_cache_bytes": self.prefix.bytes,
            "steps_total": self.steps,
        }
