"""Tokenizer training (special-token ids, chat template, eos ids) and the corpus cleaners, on inline text."""

import importlib.util
import json
from pathlib import Path

from ringlinear.tokenizer import ChatTokenizer
from ringlinear.train.tokenizer_train import train_tokenizer, write_tokenizer_files

REPO = Path(__file__).resolve().parents[3]


def _corpus_module():
    spec = importlib.util.spec_from_file_location("corpus", REPO / "tools" / "data" / "corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tokenizer_files_roundtrip(tmp_path):
    texts = ["In the beginning God created the heaven and the earth."] * 50 + ["A horse! A horse! My kingdom for a horse!"] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    write_tokenizer_files(tok, tmp_path, 4096)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    ct = ChatTokenizer(tmp_path)
    assert [ct.tok.token_to_id(t) for t in ("<|endoftext|>", "<|startoftext|>", "<|role_end|>")] == [0, 1, 2]
    assert ct.eos_ids == {0, 2}
    text = "My kingdom for a horse!"
    assert ct.decode(ct.encode(text)) == text
    chat = ct.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert chat == "<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"
    assert 2 in ct.tok.encode(chat, add_special_tokens=False).ids  # <|role_end|> is one special token


def test_gcide_cleaning():
    c = _corpus_module()
    raw = 'Metonic \\Me*ton"ic\\, a. [Cf. F. m[\'e]tonique.] Zo["o]l.\n   Pertaining to {Meton}.\n   [1913 Webster]'
    assert c.clean_gcide(raw) == "Metonic, a. [Cf. F. métonique.] Zoöl. Pertaining to Meton."


def test_unwrap_keeps_verse_lines():
    c = _corpus_module()
    assert c.unwrap("a b\nc d\n\n    one\n    two\n") == "a b c d\none\ntwo"


def test_split_is_by_key_and_stable():
    c = _corpus_module()
    keys = [f"w{i}" for i in range(2000)]
    held = [k for k in keys if c.is_heldout("gcide", k)]
    assert 0 < len(held) < 100  # ~2 %
    assert held == [k for k in reversed(keys) if c.is_heldout("gcide", k)][::-1]
