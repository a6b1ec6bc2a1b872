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
