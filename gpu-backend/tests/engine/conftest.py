"""Engine test helpers; the tiny checkpoint and fp32 model come from tests/conftest.py (tiny_ckpt, tiny_model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers (pytest runs with --import-mode=importlib)


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


@pytest.fixture(scope="session")
def golden():
    return json.loads((ROOT / "test" / "golden" / "tiny.json").read_text())
