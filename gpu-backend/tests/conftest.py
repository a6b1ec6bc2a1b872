"""Shared fixtures: the deterministic tiny checkpoints (made on demand into test/fixtures/, git-ignored)."""

import pytest

from ringlinear.tools.golden import FIXTURES_DIR, ensure_fixture


@pytest.fixture(scope="session")
def tiny_ckpt():
    return ensure_fixture("tiny", FIXTURES_DIR)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from ringlinear.checkpoint import load_model

    return load_model(tiny_ckpt)


@pytest.fixture
def one_thread():
    """Two CI cores, shared with the server's threads: one intra-op thread avoids oversubscription stalls."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_ckpt):
    from ringlinear.tokenizer import ChatTokenizer

    return ChatTokenizer(tiny_ckpt)
