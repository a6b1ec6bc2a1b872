"""Train the byte-level BPE tokenizer on the training split and write the HF tokenizer files.

Writes tokenizer.json, tokenizer_config.json (special tokens, Bailing role chat template) and
generation_config.json (eos ids) into a checkpoint directory.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..tokenizer_files import train_bpe, write_tokenizer_files

__all__ = ["train_tokenizer", "write_tokenizer_files"]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Merges seen at least twice: a single occurrence in 10M tokens of text is noise, not vocabulary."""
    return train_bpe(texts, vocab_size, min_frequency=2)
