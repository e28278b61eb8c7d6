"""Where and with what each job runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from poison_core.config.base import StrictModel


class RuntimeEnvConfig(StrictModel):
    """The part of a Ray ``runtime_env`` every job of a run gets (Ray's runtime environments docs): code that
    the cluster's image does not have, e.g. a plug-in: ``py_modules`` (local package folders or wheels,
    uploaded by Ray), ``pip`` (requirements installed per job), ``working_dir`` (a folder uploaded and made
    the jobs' working directory), ``env_vars`` (added to those the driver forwards)."""

    py_modules: tuple[str, ...] = Field((), max_length=64)
    pip: tuple[str, ...] = Field((), max_length=256)
    working_dir: str | None = None
    env_vars: dict[str, str] = Field(default_factory=dict)

    def as_ray(self) -> dict[str, Any]:
        """The ``runtime_env`` mapping Ray takes (empty fields left out)."""
        out: dict[str, Any] = {"py_modules": list(self.py_modules), "pip": list(self.pip),
                               "working_dir": self.working_dir, "env_vars": dict(self.env_vars)}
        return {k: v for k, v in out.items() if v}


class ExecutionConfig(StrictModel):
    """Where and with what each job runs: Ray address (None: RAY_ADDRESS, else a local instance),
    CPUs and GPUs per job, retries of a failed job, Ray's scheduling strategy (SPREAD puts jobs on
    every node rather than packing the first), the torch device inside a job, how often (in
    steps or rounds) long attacks checkpoint their crafting state to the store, and the Ray
    `runtime_env` every job gets (plug-ins the cluster's image does not have)."""

    ray_address: str | None = None
    num_cpus: float = Field(1.0, gt=0, le=256)
    num_gpus: float = Field(0.0, ge=0, le=16)
    max_retries: int = Field(2, ge=0, le=10)
    checkpoint_every: int = Field(10, ge=1, le=100_000)
    scheduling: Literal["SPREAD", "DEFAULT"] = "SPREAD"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$")
    runtime_env: RuntimeEnvConfig = RuntimeEnvConfig()
