import pytest

from ringlinear.checkpoint import CheckpointError
from ringlinear.tokenizer import ChatTokenizer


def test_round_trip_and_eos(tiny_ckpt):
    tok = ChatTokenizer(tiny_ckpt)
    text = "Hello, world! How are you today?"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 4096
    assert tok.eos_ids == {0, 2}


def test_chat_template(tiny_ckpt):
    tok = ChatTokenizer(tiny_ckpt)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"
    assert 2 in tok.tok.encode(text, add_special_tokens=False).ids  # <|role_end|> is one special token


def test_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        ChatTokenizer(tmp_path)
