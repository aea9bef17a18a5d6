"""Shared test settings: float64 references, hypothesis profiles, the data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"

settings.register_profile("default", deadline=None, max_examples=10,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Under pytest-xdist (`-n auto`) the workers share the cores: each takes its share of torch's
# threads, so two workers on two cores run two threads, not four. On the 2-core Intel Xeon
# (2026-12-06) the suite took 10:54 alone, 7:52 with two workers of two threads each, 5:52 so.
# Tests of code that splits work across threads ask for two themselves (`at_least_two_threads`).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def at_least_two_threads():
    """torch on two threads or more for one test: the C++ kernels' at::parallel_for then splits
    their lanes between threads, as in use, even in a `pytest -n auto` worker holding one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA
