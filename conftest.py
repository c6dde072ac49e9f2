"""Fixtures shared by tests/ and benchmarks/ (pytest loads this conftest for both: it sits in
the rootdir). Each folder's own conftest.py holds what only that folder needs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests: on the shared 2-core CI machine, two
    threads fighting the other tenants' load run several times slower than one."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
