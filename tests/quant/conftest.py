"""Fixtures for the quantization tests: bitsandbytes (a test-only reference) and its quirks.

bitsandbytes' pure-PyTorch fallbacks are wrapped in ``torch.compile``, which
costs tens of seconds per new shape on CPU; the tests run them eagerly.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="session")
def bnbf():
    """``bitsandbytes.functional``: the reference every byte is compared with."""
    return pytest.importorskip("bitsandbytes.functional")
