"""Writing a model's tokenizer files: a byte-level BPE trained with the `tokenizers` library, the special tokens at
ids 0, 1, 2, the Bailing role chat template, and generation_config.json's eos ids. Shared by the tiny test
checkpoints (tools/make_tiny.py) and the trained default model (train/tokenizer_train.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|startoftext|>", "<|role_end|>"]  # the trainer gives them ids 0, 1, 2
EOT_ID, BOS_ID, ROLE_END_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<role>SYSTEM</role>{{ m['content'] }}<|role_end|>"
    "{% elif m['role'] == 'user' %}<role>HUMAN</role>{{ m['content'] }}<|role_end|>"
    "{% elif m['role'] == 'assistant' %}<role>ASSISTANT</role>{{ m['content'] }}<|role_end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=min_frequency)
    tok.train_from_iterator(texts, trainer=trainer)
    for name, want in zip(SPECIAL_TOKENS, (EOT_ID, BOS_ID, ROLE_END_ID)):
        if tok.token_to_id(name) != want:  # configs' eos/bos ids assume this order
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
