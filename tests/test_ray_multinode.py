"""Two Ray nodes on 127.0.0.1 (`ray start --head` and a second `ray start --address=...`): the
benchmark's jobs run on both, and both are stopped by PID at the end (tests.ray_cluster)."""

from __future__ import annotations

import pytest

from flows.benchmark import benchmark
from tests.pipeline_helpers import TINY_BENCHMARK
from tests.ray_cluster import RAY, local_cluster


@pytest.fixture
def two_node_cluster(fresh_ray):
    with local_cluster(2) as cluster:
        yield cluster.gcs


@pytest.mark.slow
@pytest.mark.skipif(RAY is None, reason="ray CLI not on PATH")
def test_cells_run_on_both_nodes(prefect_server, two_node_cluster, tmp_path):
    config = TINY_BENCHMARK + f"execution: {{ray_address: '{two_node_cluster}', num_cpus: 1}}\n"
    result = benchmark(config=config, store=str(tmp_path / "store"), run_dir=str(tmp_path),
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    import ray

    assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
    assert len(result["nodes"]) == 2, f"jobs ran on {result['nodes']}"
    assert result["computed"]["evaluate"] == 4
