"""Shared by the report tests: one torch thread (the reference model's matmuls are tiny, and on a busy
2-core machine OpenMP hand-offs cost more than they gain) and the reference assets."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs tiny models (tests/conftest.py).  Module scope, so that it is in force before each
    module's own module-scoped fixtures run (pytest sets up wider scopes first, whatever asks for them)."""


@pytest.fixture(scope="session")
def reference_paths():
    from lmcompress import reference

    return reference.REFERENCE_MODEL_DIR, reference.REFERENCE_HELDOUT, reference.REFERENCE_CALIB
