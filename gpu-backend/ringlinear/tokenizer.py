"""The model's tokenizer (tokenizer.json through the `tokenizers` library) and its chat template."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .checkpoint import CheckpointError


class ChatTokenizer:
    def __init__(self, ckpt: str | Path):
        ckpt = Path(ckpt)
        path = ckpt / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"tokenizer.json not found in {ckpt}")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise CheckpointError(f"cannot read {path}: {e}") from None
        self.config = _read_json(ckpt / "tokenizer_config.json")
        gen = _read_json(ckpt / "generation_config.json")
        model_cfg = _read_json(ckpt / "config.json")
        eos = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        self.eos_ids: set[int] = set([eos] if isinstance(eos, int) else (eos or []))
        for key in ("eos_token",):
            tok = self.config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if tok and self.tok.token_to_id(tok) is not None:
                self.eos_ids.add(self.tok.token_to_id(tok))
        template = self.config.get("chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        self._template = env.from_string(template) if template else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat_template in tokenizer_config.json; use /v1/completions")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"bad JSON in {path}: {e}") from None
