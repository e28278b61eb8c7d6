"""Two Ray nodes on 127.0.0.1 laid out as infra/ray/cluster.yaml and infra/kuberay lay them out: a
head with no CPUs (`ray start --head --num-cpus=0`, where the driver connects) and a 1-CPU worker
(`ray start --address=...`). Every job of the benchmark must then run on the worker, never beside the
driver; both nodes are stopped by PID at the end (tests.ray_cluster).

Ray's SPREAD strategy chooses among the nodes whose resources are free when a job is scheduled (Ray's
scheduling docs: feasible, then available nodes), so it promises no spread; a test that demanded
jobs on two 1-CPU nodes failed whenever a loaded machine let one node take them all; the
0-CPU head makes where the jobs may run a matter of the cluster's layout, not of timing."""

from __future__ import annotations

import pytest

from flows.benchmark import benchmark
from tests.pipeline_helpers import TINY_BENCHMARK
from tests.ray_cluster import RAY, local_cluster


@pytest.fixture
def head_and_worker(fresh_ray):
    with local_cluster(2, head_cpus=0) as cluster:
        yield cluster.gcs


@pytest.mark.slow
@pytest.mark.skipif(RAY is None, reason="ray CLI not on PATH")
def test_jobs_run_on_the_worker_node_not_on_the_zero_cpu_head(prefect_server, head_and_worker, tmp_path):
    config = TINY_BENCHMARK + f"execution: {{ray_address: '{head_and_worker}', num_cpus: 1}}\n"
    result = benchmark(config=config, store=str(tmp_path / "store"), run_dir=str(tmp_path),
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    head = {n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]}
    workers = {n["NodeID"] for n in alive} - head
    assert len(head) == 1 and len(workers) == 1
    assert set(result["nodes"]) == workers, f"jobs ran on {result['nodes']}, the worker is {workers}"
    assert result["computed"]["evaluate"] == 4


PLUGIN_PACKAGE = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "plugin"


@pytest.mark.slow
@pytest.mark.skipif(RAY is None, reason="ray CLI not on PATH")
def test_a_plugin_the_workers_do_not_have_travels_in_the_runtime_env(prefect_server, head_and_worker, tmp_path,
                                                                      monkeypatch):
    import subprocess
    import sys

    probe = ("import importlib.util, ray; ray.init(address=%r, log_to_driver=False); "
             "print(ray.get(ray.remote(lambda: importlib.util.find_spec('belladonna_example_plugin') is None)"
             ".options(num_cpus=1).remote()))" % head_and_worker)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    seen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert seen.stdout.strip().endswith("True"), seen.stderr  # the worker's Python cannot import the plug-in
    monkeypatch.syspath_prepend(str(PLUGIN_PACKAGE))  # the driver can (it validates the config)
    config = f"""
name: plugin-on-ray
dataset: {{name: digits, n_train: 300, n_test: 100, seed: 0}}
victim: {{model: {{name: mlp, width: 16}}, train: {{epochs: 1, batch_size: 64}}}}
threat: {{epsilon: 16, budget: 0.05, clean_label: true}}
attacks: [{{name: 'belladonna_example_plugin.attack:CheckerNoise', id: checker}}]
defenses: [{{name: 'belladonna_example_plugin.defense:MedianFilter', id: median}}]
seeds: [0]
execution:
  ray_address: '{head_and_worker}'
  num_cpus: 1
  runtime_env: {{py_modules: ['{PLUGIN_PACKAGE / "belladonna_example_plugin"}']}}
"""
    result = benchmark(config=config, store=str(tmp_path / "store"), run_dir=str(tmp_path),
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [(r["attack"], r["defense"]) for r in result["rows"]] == [("checker", "median")]
    assert result["computed"]["craft"] == 1 and result["computed"]["evaluate"] == 1
