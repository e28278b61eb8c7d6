"""prefect.yaml, the constraints and the shipped configs stay in step with the code: entrypoints
import, parameters exist and their config loads on any install (a preset), Prefect's own models accept
the file (schedules, concurrency limit, triggers, pull steps), nothing is frozen at deploy time, the
SQLAlchemy pin is one Prefect's scheduler works with, every config validates, and the Ray cluster
file names GPU workers. tests/test_nightly.py runs the deployments for real."""

from __future__ import annotations

import importlib
import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from prefect.flows import Flow

from flows.benchmark import _config
from poison_core import presets
from poison_core.config import load_benchmark
from poison_core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _spec() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _deployments() -> list[dict]:
    return _spec()["deployments"]


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_deployment_entrypoint_and_parameters(deployment, tmp_path, monkeypatch):
    module_path, name = deployment["entrypoint"].split(":")
    flow = getattr(importlib.import_module(module_path.removesuffix(".py").replace("/", ".")), name)
    assert isinstance(flow, Flow)
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(deployment["parameters"]) <= accepted
    monkeypatch.chdir(tmp_path)  # a worker's directory without this checkout's configs/: a preset still loads
    assert _config(deployment["parameters"]["config"]).dataset.name == "digits"


def test_prefect_accepts_the_file_and_nightly_runs_one_at_a_time_with_a_rerun_on_crash():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    model = PrefectYamlModel.model_validate(_spec())
    nightly = next(d for d in model.deployments if d.name == "nightly")
    assert nightly.concurrency_limit.limit == 1 and nightly.concurrency_limit.collision_strategy == "ENQUEUE"
    (trigger,) = _initialize_deployment_triggers("nightly", next(
        d for d in _deployments() if d["name"] == "nightly")["triggers"])
    assert trigger.expect == {"prefect.flow-run.Crashed"}
    related = {k: v for spec in trigger.match_related for k, v in spec.items()}  # only scheduled runs rerun
    assert related["prefect.resource.id"] == ["prefect.tag.auto-scheduled"]


def test_nothing_is_frozen_at_deploy_time():
    """`prefect deploy` resolves `{{ $VAR }}` outside pull steps from its own environment: an unset
    variable became "" and overrode the worker's RAY_ADDRESS / BELLADONNA_STORE / MLFLOW_TRACKING_URI."""
    spec = _spec()
    for deployment in spec["deployments"]:
        outside_pull = {k: v for k, v in deployment.items() if k != "pull"}
        assert "{{ $" not in yaml.safe_dump(outside_pull), deployment["name"]
        assert not deployment["work_pool"]["job_variables"].get("env"), deployment["name"]


@pytest.mark.parametrize("option", ["local", "pinned"])
def test_pull_steps_call_prefect_steps_with_their_arguments(option):
    steps = _spec()["definitions"]["pull"][option]
    for step in steps:
        ((qualified, inputs),) = step.items()
        module, _, name = qualified.rpartition(".")
        func = getattr(importlib.import_module(module), name)
        inspect.signature(func).bind(**{k: v for k, v in inputs.items() if k not in ("id", "requires")})
    if option == "pinned":  # pins the code: one commit, installed with the known-good versions
        assert steps[0]["prefect.deployments.steps.git_clone"]["commit_sha"]
        assert "-c constraints.txt" in steps[1]["prefect.deployments.steps.run_shell_script"]["script"]
    assert _spec()["pull"] == _spec()["definitions"]["pull"]["local"]


def test_sqlalchemy_is_pinned_below_2_1_for_prefects_scheduler():
    """Prefect 3.8's scheduler fails on SQLAlchemy 2.1 ("Can't evaluate bulk DML statement") and never
    creates a scheduled run; the pin, the package's own bound and the installed version agree."""
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert re.fullmatch(r"2\.0\.\d+", pins["SQLAlchemy"])
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("SQLAlchemy") and "<2.1" in d for d in deps)
    assert version("sqlalchemy").startswith("2.0.")


def test_presets_load_by_name_and_an_unknown_name_lists_them():
    assert set(presets.names()) >= {"quickstart", "nightly"}
    assert _config("nightly").name == "nightly"
    assert load_benchmark(presets.resolve("quickstart")).name == "quickstart"
    assert presets.resolve("configs/fashion-mnist.yaml") == "configs/fashion-mnist.yaml"  # a path stays a path
    with pytest.raises(ConfigError, match="config 'nigthly' is neither a file nor a preset \\(presets: .*nightly"):
        _config("nigthly")


def test_nightly_schedule_is_a_valid_cron():
    from prefect.client.schemas.schedules import CronSchedule

    nightly = next(d for d in _deployments() if d["name"] == "nightly")
    CronSchedule(cron=nightly["schedules"][0]["cron"], timezone="UTC")


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(config):
    assert load_benchmark(config).name
