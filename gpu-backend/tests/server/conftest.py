"""Server test fixtures; helpers live in pod_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "engine")]  # pod_helpers, engine_helpers (--import-mode=importlib)

@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every engine/server test runs with one intra-op thread (tests/conftest.py says why)."""
