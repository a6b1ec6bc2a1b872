"""Server test fixtures; helpers live in pod_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "engine")]  # pod_helpers, engine_helpers (--import-mode=importlib)

@pytest.fixture(autouse=True)
def one_thread():
    """Two CI cores, shared with the server's threads: one intra-op thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_ckpt):
    from ringlinear.tokenizer import ChatTokenizer

    return ChatTokenizer(tiny_ckpt)
