"""Ray fan-out helpers on a real local Ray instance: ordered results, nested jobs, actor groups,
and a worker process killed mid-job whose job is retried to the same result."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from infra.ray_runner import ActorFactory, RayActorGroup, ensure_ray, job_map, ray_map
from poison_core.errors import WorkerLost
from tests.ray_toys import CFG, Counter, die_once, square, sum_of_squares_nested


@pytest.mark.slow
def test_ray_map_orders_results_and_nests(fresh_ray):
    assert ray_map(square, [((i,), {}) for i in range(6)], CFG) == [i * i for i in range(6)]
    assert ray_map(sum_of_squares_nested, [((4,), {})], CFG) == [14]
    assert job_map(CFG)(square, [(3,), (4,)]) == [9, 16]  # driver process under Ray: Ray tasks too


@pytest.mark.slow
def test_killed_worker_job_is_retried(fresh_ray, tmp_path):
    assert ray_map(die_once, [((str(tmp_path / "marker"), 7), {})], CFG) == [70]
    assert (tmp_path / "marker").read_text() == "died"


@pytest.mark.slow
def test_actor_group_more_workers_than_cpus_keeps_state(fresh_ray):
    ensure_ray(CFG)
    factory = ActorFactory(CFG)
    group = factory(Counter, [(i,) for i in range(5)])
    assert isinstance(group, RayActorGroup)
    assert group.call("add", [(1,)] * 5) == [1, 2, 3, 4, 5]
    assert group.call("add", [(10,)] * 5) == [11, 12, 13, 14, 15]
    factory.close()
    assert group.actors == []


@pytest.mark.slow
def test_dead_actor_raises_worker_lost_instead_of_answering_from_a_fresh_state(fresh_ray):
    ensure_ray(CFG)
    group = ActorFactory(CFG)(Counter, [(0,), (5,)])
    assert group.call("add", [(1,), (1,)]) == [1, 6]
    pid = group.call("pid", [(), ()])[1]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(WorkerLost, match="a worker of 2 died during add"):
        group.call("add", [(1,), (1,)])
    group.close()


def test_outside_ray_everything_runs_in_process():
    import ray

    ray.shutdown()
    assert job_map(CFG)(square, [(2,)]) == [4]
    group = ActorFactory(CFG)(Counter, [(0,), (5,)])
    assert group.call("add", [(1,), (1,)]) == [1, 6]
