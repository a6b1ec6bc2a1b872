"""Engine test helpers; the tiny checkpoint and fp32 model come from tests/conftest.py (tiny_ckpt, tiny_model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers (pytest runs with --import-mode=importlib)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every engine/server test runs with one intra-op thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def golden():
    return json.loads((ROOT / "test" / "golden" / "tiny.json").read_text())
