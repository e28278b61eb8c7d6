"""Shared fixtures: a Prefect test server and Ray teardown (pipeline_helpers), a moto S3 server
(s3server), and one torch/BLAS thread per test module."""

import pytest
import torch
from threadpoolctl import threadpool_limits

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
