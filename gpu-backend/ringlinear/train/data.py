"""Token streams for training: documents -> ids joined by <|endoftext|>, stored as uint16 .npy; window samplers.

Each document is encoded without special tokens and followed by <|endoftext|> (id 0), so the model learns where a
text ends and the held-out stream is one long sequence that engines can cut into windows identically.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .configs import EOT_ID


def read_jsonl_texts(path: str | Path) -> Iterator[str]:
    with Path(path).open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{i + 1}: not a JSON object with a 'text' field ({e})") from None


def encode_documents(tok, texts: Iterator[str], batch: int = 4096) -> np.ndarray:
    """All documents as one uint16 stream, each followed by EOT."""
    if tok.get_vocab_size() > 65535:
        raise ValueError("uint16 token streams need a vocabulary of at most 65535 tokens")
    parts: list[np.ndarray] = []
    buf: list[str] = []

    def flush():
        for enc in tok.encode_batch(buf, add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [EOT_ID], dtype=np.uint16))
        buf.clear()

    for t in texts:
        buf.append(t)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def load_tokens(path: str | Path) -> np.ndarray:
    a = np.load(path, mmap_mode=None)
    if a.dtype != np.uint16 or a.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D uint16 token array, got {a.dtype} {a.shape}")
    return a


class WindowSampler:
    """Random training windows [B, T+1] drawn uniformly from a token stream held on the training device."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, device: torch.device, seed: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"token stream of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
        self.tokens = torch.from_numpy(tokens.astype(np.int64)).to(device)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.offsets = torch.arange(seq_len + 1, device=device)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        return self.tokens[starts.to(self.tokens.device)[:, None] + self.offsets]


def heldout_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows [N, seq_len] from the start of the held-out stream."""
    n = len(tokens) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"held-out stream of {len(tokens)} tokens is shorter than one window of {seq_len}")
    return torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)
