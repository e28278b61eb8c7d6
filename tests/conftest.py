"""Shared fixtures: a Prefect test server and Ray teardown (pipeline_helpers), a moto S3 server
(s3server), one torch/BLAS thread per test module, and the torch devices to test on (tests/devices.py)."""

import pytest
import torch
from threadpoolctl import threadpool_limits

from tests.devices import DEVICES

pytest_plugins = ["tests.pipeline_helpers", "tests.s3server"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test module runs torch and BLAS on one thread: the small models of the tests run
    fastest so, and two threads on a shared 2-core machine were up to ~6x slower (oversubscribed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> torch.device:
    """Each available torch device in turn: cpu, and cuda (marked `cuda`, skipped without CUDA). Module
    scope, so a module's fixtures that train a model can train it once per device."""
    return request.param
