"""A local two-node Ray cluster (dashboard on 127.0.0.1) that runs the quick-start from `ray job submit`.

The cluster's processes, the `ray job submit` call and the MLflow server start from an environment
without the store, the tracking URI or any AWS variable: the job gets them only from
``--runtime-env-json``, and the driver hands them on to its own Ray jobs. The store is a moto S3 server
in this process; MLflow is a real ``mlflow server``. Every process is started here and stopped by its
PID (``ray start --block`` stops the node it started; anything of its tree left is killed by PID).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request

import pytest

from infra.settings import Settings
from infra.storage import Store
from poison_core import presets
from poison_core.config import ExecutionConfig, load_benchmark
from poison_core.data import load_dataset
from tests.ray_cluster import START_S, clean_env, free_port, launch, local_cluster, stop, wait_for
from tests.s3server import bucket_env, start_moto

RAY, MLFLOW = shutil.which("ray"), shutil.which("mlflow")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(RAY is None or MLFLOW is None, reason="ray / mlflow CLI missing")]
JOB_S = 240
SECRET = "Zq9-job-secret-4711"


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2) as running:
        yield running


def test_driver_hands_its_settings_to_jobs_and_warms_every_node(cluster, monkeypatch):
    """A driver outside any submitted job (the Prefect worker's case, RAY_ADDRESS of a cluster): its
    jobs on both nodes see its store, tracking URI and credentials, and nothing else of its environment;
    both nodes' workers import the stage code before the first job."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray.util.state import list_tasks

    from infra.ray_runner import ensure_ray

    given = {"BELLADONNA_STORE": "s3://bd-bucket/store", "MLFLOW_TRACKING_URI": "http://127.0.0.1:1",
             "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "Zq9-driver-secret"}
    for name, value in {**given, "BD_UNRELATED": "1"}.items():
        monkeypatch.setenv(name, value)
    ray.shutdown()
    try:
        ensure_ray(ExecutionConfig(ray_address=cluster.gcs, num_cpus=1))
        node_ids = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        assert len(node_ids) == 2

        def warmed() -> bool:
            done = list_tasks(address=cluster.dashboard, filters=[("func_or_class_name", "=", "_import_stages"),
                                                                   ("state", "=", "FINISHED")])
            return sorted({t.node_id for t in done}) == node_ids

        wait_for("the warm-up of both nodes", warmed, 90, [], cluster.logs)
        getenv = ray.remote(num_cpus=1)(os.getenv)  # pinned to each node in turn
        names = (*given, "BD_UNRELATED")
        seen = {n: ray.get([getenv.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n, soft=False))
                            .remote(name) for name in names], timeout=120) for n in node_ids}
    finally:
        ray.shutdown()
    assert seen == {n: [*given.values(), None] for n in node_ids}


def test_ray_job_submit_runs_the_quickstart_on_both_nodes(cluster, tmp_path):
    moto = start_moto()
    mlflow_log, out = tmp_path / "mlflow.log", tmp_path / "out"
    mlflow_port = free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    server = launch([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                     "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--artifacts-destination", str(tmp_path / "mlartifacts")], mlflow_log, clean_env())
    try:
        bucket = moto.create_bucket()
        s3 = {**bucket_env(moto.endpoint, bucket), "AWS_SECRET_ACCESS_KEY": SECRET}  # moto takes any secret
        runtime_env = {"env_vars": {**s3, "MLFLOW_TRACKING_URI": tracking, "PREFECT_HOME": str(tmp_path / "prefect")}}
        wait_for("mlflow server", lambda: urllib.request.urlopen(f"{tracking}/health", timeout=5).status == 200,
                 START_S, [server], [mlflow_log])
        job_id = f"bd-{mlflow_port}"
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
             "--runtime-env-json", json.dumps(runtime_env), "--", "belladonna", "run", "quickstart",
             "--out", str(out)],
            capture_output=True, text=True, timeout=JOB_S, env=clean_env())
        from ray.job_submission import JobStatus, JobSubmissionClient

        jobs = JobSubmissionClient(cluster.dashboard)
        wait_for("the job's end", lambda: jobs.get_job_status(job_id).is_terminal(), 30, [], [])
        logs = f"rc {submit.returncode}\n{jobs.get_job_logs(job_id)[-6000:]}\n{submit.stderr[-2000:]}"
        assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, logs
        result = json.loads((out / "quickstart" / "results.json").read_text())

        # Jobs ran on both nodes.
        assert len(result["nodes"]) == 2, (result["nodes"], logs)

        # The PoisonSets in S3 pass their audit (read with settings of this test, not of the job).
        cfg = load_benchmark(presets.preset_text("quickstart"))
        store = Store(f"s3://{bucket}/store", Settings.from_env(s3))
        train = load_dataset(cfg.dataset).train
        for attack in cfg.attacks:
            for seed in cfg.seeds:
                key = result["poisons"][f"{attack.key}/seed{seed}"]
                poison_set = store.read_poison_set(key, train, cfg.threat_for(attack))
                assert len(poison_set.ids) > 0

        # The MLflow server holds the parent run and one run per cell.
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking)
        runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and result["mlflow"]["run_id"] == parents[0].info.run_id
        assert result["mlflow"]["tracking_uri"] == tracking
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert len(children) == len(cfg.attacks) * len(cfg.defenses) * len(cfg.seeds)
        written = "".join(f.read_text(errors="replace") for f in (out / "logs").rglob("*") if f.is_file())
        assert SECRET not in submit.stdout + submit.stderr + jobs.get_job_logs(job_id) + written
    finally:
        stop(server)
        moto.stop()
