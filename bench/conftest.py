"""Benchmarks write their results to bench/results/<device>/<name>.json at the end of the session."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import benchutil  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    for path in benchutil.write_all():
        print(f"\nbenchmark results written to {path}")


@pytest.fixture
def one_thread():
    """Per-worker / single-thread measurements: one intra-op thread for the test, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
