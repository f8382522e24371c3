"""Fixtures for the quantization tests: bitsandbytes (a test-only reference) and its quirks.

* bitsandbytes' pure-PyTorch fallbacks are wrapped in ``torch.compile``, which
  costs tens of seconds per new shape on CPU; the tests run them eagerly.
* One intra-op thread per test module: on a shared 2-core machine, OpenMP
  barriers with a descheduled worker turned a 0.3 s forward into 10 s
  (measured). Nothing here asserts on time; this only keeps the suite short.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bnbf():
    """``bitsandbytes.functional``: the reference every byte is compared with."""
    return pytest.importorskip("bitsandbytes.functional")
