"""Fan stage calls out on Ray: a local instance by default, a cluster when RAY_ADDRESS names one.

Ray workers run the plain stage functions of `tasks.stages` (no Prefect inside a worker, so no
worker ever starts its own Prefect server). Each job asks for the CPUs/GPUs the config gives and
limits torch to its CPU share. On a cluster every job gets the store, the MLflow tracking URI, the S3
endpoint and the AWS credential chain's variables through the runtime_env the driver connects with
(:func:`job_runtime_env`): a cluster's nodes do not share the driver's environment.
"""

from __future__ import annotations

import contextlib
import logging
import importlib
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Sequence

from infra.settings import Settings, job_env
from poison_core.config import ExecutionConfig
from poison_core.errors import BelladonnaError, WorkerLost

log = logging.getLogger(__name__)
START_ATTEMPTS = 2
"""Tries to start a local Ray instance: its raylet has a fixed 30 s to register, which a heavily
loaded machine can miss once."""


def ensure_ray(resources: ExecutionConfig, local_head: str | None = None) -> None:
    """Connect to the cluster (or a local instance) once per process. The workers of every node that
    can run a job start importing the stage code at once (:func:`_warm_workers`), while the driver
    goes on with the flow.

    `local_head`: the address of a Ray head this command started on this machine (``ray start --head
    --node-ip-address 127.0.0.1``: belladonna.lifecycle.services); its workers inherit the command's
    environment, as a local instance's do. Otherwise execution.ray_address or RAY_ADDRESS names a
    cluster, whose nodes get the driver's settings as the job's runtime_env (:func:`job_runtime_env`),
    or, with neither, ``ray.init`` starts a local instance with its documented defaults."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = local_head or resources.ray_address or os.environ.get("RAY_ADDRESS") or None
    cluster = address is not None and local_head is None
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False, "logging_level": logging.WARNING}
    user_env = resources.runtime_env.as_ray()
    if cluster:
        forwarded = job_runtime_env()
        env_vars = {**forwarded.get("env_vars", {}), **user_env.get("env_vars", {})}
        kwargs["runtime_env"] = {**user_env, **({"env_vars": env_vars} if env_vars else {})}
        # a submitted job (ray job submit --runtime-env-json) has the same variables: Ray's documented
        # switch lets the driver's (equal) values stand instead of refusing the repeated keys
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    elif user_env:
        kwargs["runtime_env"] = user_env
    if address is None:
        kwargs["include_dashboard"] = False
    settings = Settings.from_env()
    if cluster:
        _probe(address, settings.ray_connect_timeout)
    for attempt in range(START_ATTEMPTS):
        try:
            # "local": a new local instance, never a `ray start` cluster that happens to be recorded in
            # /tmp/ray/ray_current_cluster (another user's, or a dead one); RAY_ADDRESS=auto joins that.
            with _keep_signal_handlers():
                ray.init(address=address or "local", **kwargs)
            break
        except Exception as exc:  # Ray raises a bare Exception when its raylet misses a fixed 30 s start-up
            if address is not None or "timed out during startup" not in str(exc) or attempt == START_ATTEMPTS - 1:
                raise
            log.warning("ray: the local instance did not start in time (a loaded machine?); starting it again")
            ray.shutdown()
    log.info("ray: %s", ray.cluster_resources())
    check_cluster_resources(resources, settings.ray_resource_wait if cluster else 0.0)
    _warm_workers(resources)


def job_runtime_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env a driver connects to a cluster with: ``env_vars`` of :func:`infra.settings.job_env`
    (``BELLADONNA_*``, the MLflow tracking URI, the S3 endpoint, the AWS credential chain's variables).
    Inside a submitted job (``ray job submit --runtime-env-json``) the driver's environment holds the
    job's variables, so it repeats them with the same values; :func:`ensure_ray` sets Ray's documented
    ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1`` so that Ray merges the two instead of refusing the repeated keys.
    Holds credentials: never log it."""
    env_vars = job_env(os.environ if environ is None else environ)
    log.info("ray: jobs get %s from this driver's environment", ", ".join(sorted(env_vars)) or "no variables")
    return {"env_vars": env_vars} if env_vars else {}


class ClusterError(BelladonnaError):
    """The Ray cluster cannot be reached, or none of its nodes can ever run a job as configured."""


@contextlib.contextmanager
def _keep_signal_handlers():
    """Keep the driver's own SIGTERM / SIGHUP handlers across ray.init, which replaces SIGTERM's with
    ``sys.exit``: raised inside ``ray.get`` that SystemExit surfaces as "SystemError: ... returned a result
    with an exception set" instead of the command's clean stop (exit 130, "rerun to resume")."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if callable(handler) or handler in (signal.SIG_IGN,):  # a handler the process chose, not the default
                signal.signal(sig, handler)


def _probe(address: str, timeout: float) -> None:
    """ClusterError within `timeout` seconds unless the GCS (or Ray Client) port of `address` accepts a
    TCP connection: ray.init on an unreachable address would otherwise retry for minutes. 'auto' and
    'local' are resolved by Ray itself (they fail at once when no cluster runs here)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"execution.ray_address: {address!r} is not host:port (or ray://host:port, auto)")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ClusterError(f"cannot reach the Ray cluster at {address!r} within {timeout:g} s "
                                   f"({type(exc).__name__}: {exc})") from None
            time.sleep(0.5)


def check_cluster_resources(resources: ExecutionConfig, wait: float) -> None:
    """ClusterError unless some alive node can hold one job (its CPUs and GPUs). A cluster that
    autoscales may add such a node: wait up to `wait` seconds for one before giving up, instead of
    leaving the jobs pending forever."""
    import ray

    deadline = time.monotonic() + wait
    while True:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(n.get("CPU", 0) >= resources.num_cpus and n.get("GPU", 0) >= resources.num_gpus for n in nodes):
            return
        if time.monotonic() >= deadline:
            most_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
            most_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
            raise ClusterError(f"execution.num_cpus / num_gpus: a job asks for {resources.num_cpus:g} CPUs and "
                               f"{resources.num_gpus:g} GPUs, but no node of the Ray cluster has that (largest: "
                               f"{most_cpu:g} CPUs, {most_gpu:g} GPUs; waited {wait:g} s for autoscaling)")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


WARM_IMPORT = "tasks.stages"
"""The module every Ray worker imports ahead of its first job (torch, the attacks, defenses and the
store: ~2-3 s cold). Named, not imported: infra sits below tasks in the layers (pyproject.toml)."""


def _import_stages(module: str = WARM_IMPORT) -> int:
    importlib.import_module(module)
    return os.getpid()


def _warm_workers(resources: ExecutionConfig | None = None) -> None:
    """On every alive node that can run a job, one import job per job that fits there at once, pinned to
    that node and not awaited: the first real jobs then find workers that have already imported torch
    and Belladonna, and that cost overlaps the flow's start (the Prefect server, ingest) instead of
    adding to the first stage (benchmarks/orchestration.py). Ray starts a job's workers afresh on each
    node, so a cluster's nodes are as cold as a new local instance's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = resources or ExecutionConfig()
    warm = ray.remote(num_cpus=1, max_retries=0)(_import_stages)
    for node in ray.nodes():
        have = node.get("Resources", {})
        if not node.get("Alive") or have.get("CPU", 0) < max(1.0, resources.num_cpus) \
                or have.get("GPU", 0) < resources.num_gpus:
            continue
        strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=True)
        for _ in range(int(have["CPU"] // max(1.0, resources.num_cpus))):
            warm.options(scheduling_strategy=strategy).remote()


def _in_worker(fn: Callable[..., Any], num_cpus: float, args: tuple, kwargs: dict) -> Any:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))
    return fn(*args, **kwargs)


def ray_map(fn: Callable[..., Any], calls: Sequence[tuple[tuple, dict]], resources: ExecutionConfig) -> list[Any]:
    """Run fn(*args, **kwargs) for every call on Ray workers; results in call order."""
    if not calls:
        return []
    import ray

    ensure_ray(resources)
    remote = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                        max_retries=resources.max_retries, scheduling_strategy=resources.scheduling)(_in_worker)
    refs = [remote.remote(fn, resources.num_cpus, args, kwargs) for args, kwargs in calls]
    return ray.get(refs)


def job_map(resources: ExecutionConfig) -> Callable[[Callable[..., Any], Sequence[tuple]], list[Any]]:
    """A `DefenseContext.map` for code already running under Ray (a retrain job): its independent
    sub-jobs (DPA's base models) become Ray tasks of their own; outside Ray they run in order."""

    def run(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        import sys

        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            return ray_map(fn, [(tuple(args), {}) for args in calls], resources)
        return [fn(*args) for args in calls]

    return run


class _Hosted:
    """A worker object inside a Ray actor, built after torch is limited to the actor's CPU share."""

    def __init__(self, factory: Callable[..., Any], threads: int, *args: Any) -> None:
        import torch

        torch.set_num_threads(threads)
        self.worker = factory(*args)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)


class RayActorGroup:
    """CraftContext.actors on Ray: one actor per worker, each holding its own model (MetaPoison).

    Each actor gets an equal share of the cluster's CPUs (and of the GPUs asked for), so a group
    larger than the CPU count still starts instead of waiting forever. Actors are not restarted by
    Ray: a restarted actor would have lost its model's state and silently answer from its initial
    one. A dead actor raises :class:`WorkerLost`, and the attack rebuilds its group from its last
    checkpoint."""

    def __init__(self, factory: Callable[..., Any], init_args: Sequence[tuple], resources: ExecutionConfig) -> None:
        import ray

        ensure_ray(resources)
        share = max(0.01, min(resources.num_cpus, ray.cluster_resources().get("CPU", 1.0) / max(1, len(init_args))))
        remote_cls = ray.remote(num_cpus=share, num_gpus=resources.num_gpus / max(1, len(init_args)),
                                max_restarts=0, max_task_retries=0,
                                scheduling_strategy=resources.scheduling)(_Hosted)
        threads = max(1, int(share))
        self.actors = [remote_cls.remote(factory, threads, *args) for args in init_args]

    def call(self, method: str, args_per_worker: Sequence[tuple]) -> list[Any]:
        import ray

        if len(args_per_worker) != len(self.actors):
            raise ValueError(f"{len(args_per_worker)} argument tuples for {len(self.actors)} actors")
        try:
            return ray.get([a.call.remote(method, *args) for a, args in zip(self.actors, args_per_worker)])
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(f"a worker of {len(self.actors)} died during {method}: {type(exc).__name__}") from exc

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class ActorFactory:
    """CraftContext.actors: Ray actor groups under Ray, in-process groups elsewhere; remembers every
    group it made so the stage can release them when the attack is done."""

    def __init__(self, resources: ExecutionConfig) -> None:
        self.resources = resources
        self.groups: list[Any] = []

    def __call__(self, factory: Callable[..., Any], init_args: Sequence[tuple]) -> Any:
        import sys

        from poison_core.attacks.base import LocalActorGroup

        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            group: Any = RayActorGroup(factory, init_args, self.resources)
        else:
            group = LocalActorGroup(factory, init_args)
        self.groups.append(group)
        return group

    def close(self) -> None:
        for group in self.groups:
            if hasattr(group, "close"):
                group.close()
        self.groups = []


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
