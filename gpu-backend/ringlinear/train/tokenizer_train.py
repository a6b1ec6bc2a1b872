"""Train the byte-level BPE tokenizer on the training split and write the HF tokenizer files.

Writes tokenizer.json, tokenizer_config.json (special tokens, Bailing role chat template) and
generation_config.json (eos ids) into a checkpoint directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..tools.make_tiny import CHAT_TEMPLATE
from .configs import BOS_ID, EOT_ID, ROLE_END_ID, SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    for name, want in zip(SPECIAL_TOKENS, (EOT_ID, BOS_ID, ROLE_END_ID)):
        if tok.token_to_id(name) != want:  # the config's eos/bos ids assume this order
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {want}")
    return tok


def write_tokenizer_files(tok, out: str | Path, model_max_length: int) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|role_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = {"eos_token_id": [EOT_ID, ROLE_END_ID], "pad_token_id": EOT_ID, "bos_token_id": BOS_ID}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")
