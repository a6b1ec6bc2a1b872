"""The fixed buffers a step's pieces and attention calls hand each other when the pieces replay from CUDA graphs
(`ModelRunner.capture_step_graphs`), and the ladder of padded row counts they are captured at."""

from __future__ import annotations

import torch

STEP_GRAPH_MIN_TOKENS = 64  # the smallest padded row count whose pieces are captured


def step_graph_sizes(max_tokens: int) -> list[int]:
    """The padded row counts of the step graphs: 64, 96, 128, 192, 256, 384, ... (steps of 1.5x and 4/3x, so a step
    pads by less than half its rows: the pieces' GPU work grows with the padded count) up to max_tokens."""
    sizes, n = [], STEP_GRAPH_MIN_TOKENS
    while n < max_tokens:
        sizes.append(n)
        n = n * 3 // 2 if len(sizes) % 2 else n * 4 // 3
    return sizes + [max_tokens]


class StepIO:
    """The tensors a step's pieces and attention calls hand each other (`ModelRunner._piece`, `_attention`).

    An eager step rebinds each field to the new result. A step replayed from PieceGraphs (static) keeps every field
    at a fixed buffer, written in place: `put` copies, the projections and prologues write into them directly."""

    ROW_FIELDS = ("ids", "pos", "kv_rows", "q", "k", "v", "gate", "t", "qs", "o", "a")  # [N, ...]
    SEQ_FIELDS = ("x", "cos", "sin")  # [1, N, ...]

    def __init__(self, static: bool = False, **fields):
        self.static = static
        self.ids = self.pos = self.kv_rows = None  # [N] token ids, positions, KV cache rows (softmax layers)
        self.x = self.cos = self.sin = None  # residual stream [1, N, D]; RoPE tables [1, N, rot]
        self.q = self.k = self.v = self.gate = None  # a lightning layer's attention inputs [N, H, d], gate [N, H d]
        self.t = None  # static only: the packed [qkv | gate] projection [N, 4 H d] (gate is a view of it)
        self.qs = None  # a softmax layer's queries [N, H, d] (its k and v go to the KV cache)
        self.o = self.a = None  # attention outputs [N, H, d]: lightning (fp32 when static), softmax
        self.qkv_dtype = None  # the lightning q/k/v dtype
        self.v_in_place = False  # eager prompt-only bf16 steps: io.v is a view of the projection (ModelRunner.v_in_place)
        self.qk_raw = False  # ... and io.q, io.k too, raw: the prefill applies the QK prologue (qk_prologue_in_prefill)
        for name, value in fields.items():
            setattr(self, name, value)

    def put(self, name: str, value: torch.Tensor) -> None:
        if self.static:
            getattr(self, name).copy_(value)
        else:
            setattr(self, name, value)

    @classmethod
    def allocate(cls, runner, rows: int) -> "StepIO":
        """Buffers for steps of up to `rows` rows of `runner`'s model (its config, device, dtypes); smaller steps use
        views of their first rows (`rows`)."""
        cfg, dev, dtype, acc = runner.cfg, runner.model.device, runner.model.dtype, runner.acc
        H, d = cfg.num_attention_heads, cfg.d_head

        def z(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=dev)

        io = cls(static=True, qkv_dtype=acc, ids=z(rows, dt=torch.int64), pos=z(rows, dt=torch.int64),
                 kv_rows=z(rows, dt=torch.int64), x=z(1, rows, cfg.hidden_size), cos=z(1, rows, cfg.rot_dim, dt=acc),
                 sin=z(1, rows, cfg.rot_dim, dt=acc))
        if cfg.linear_layers:
            io.q, io.k, io.v, io.o = (z(rows, H, d, dt=acc) for _ in range(4))
            io.t = z(rows, 4 * H * d)
            io.gate = io.t[:, 3 * H * d:]
        if cfg.softmax_layers:
            io.qs, io.a = z(rows, H, d), z(rows, H, d)
        return io

    def rows(self, n: int) -> "StepIO":
        """Views of the first n rows of every buffer (a smaller captured size shares the largest one's buffers)."""
        io = StepIO(static=True, qkv_dtype=self.qkv_dtype)
        for name in self.ROW_FIELDS + self.SEQ_FIELDS:
            t = getattr(self, name)
            if t is not None:
                setattr(io, name, t[:, :n] if name in self.SEQ_FIELDS else t[:n])
        return io

    def reset(self, scratch_row: int) -> None:
        """Every row a padding row: token 0 at position 0, K/V to the cache's scratch row, zero attention output."""
        for t in (self.ids, self.pos, self.o, self.a):
            if t is not None:
                t.zero_()
        self.kv_rows.fill_(scratch_row)

    def clear_outputs(self, n: int) -> None:
        """Zero the attention outputs past row n: the attention writes rows < n only."""
        for t in (self.o, self.a):
            if t is not None and n < t.shape[0]:
                t[n:].zero_()
