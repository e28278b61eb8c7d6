"""`execution.device` preflight: a CUDA or MPS device this machine cannot give is refused before
anything starts, with one line naming what is missing (CLI exit 2); with a Ray cluster the driver's
own hardware is not held against the run.

The refusals of this machine's real state run through the real CLI; the states this machine does not
have (a CPU-only torch, GPUs hidden or too few) replace the one torch query each depends on."""

from __future__ import annotations

import sys

import pytest
import torch

from belladonna.cli import main
from poison_core.config import BenchmarkConfig, ExecutionConfig, parse_config
from poison_core.errors import ConfigError
from poison_core.preflight import check_local_resources, device_problem
from tasks.preflight import preflight

BASE = "name: t\ndataset: {name: digits, n_train: 200, n_test: 50}\nattacks: [{name: badnets}]\n"
NO_CUDA = not torch.cuda.is_available()
NO_MPS = not torch.backends.mps.is_available()


@pytest.fixture(autouse=True)
def local(monkeypatch):
    """No cluster unless a test names one, and Ray's default renumbering of each job's GPUs."""
    for name in ("RAY_ADDRESS", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


def refusal(**execution) -> str:
    with pytest.raises(ConfigError) as err:
        check_local_resources(ExecutionConfig(**execution))
    message = str(err.value)
    assert "\n" not in message and message.startswith("execution.")
    return message


def run_cli(tmp_path, monkeypatch, capfd, execution: str) -> tuple[int, list[str]]:
    config = tmp_path / "bench.yaml"
    config.write_text(BASE + f"execution: {execution}\n")
    monkeypatch.setattr(sys, "argv", ["belladonna", "run", str(config), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        main()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert not (tmp_path / "out").exists()
    return info.value.code, lines


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_cli_refuses_cuda_on_this_machine_naming_what_is_missing(tmp_path, monkeypatch, capfd):
    code, lines = run_cli(tmp_path, monkeypatch, capfd, "{device: cuda, num_gpus: 1}")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: execution.device: 'cuda', but ")
    if torch.version.cuda is None:
        assert "built without CUDA (torch.version.cuda is None)" in lines[0]
    else:
        assert "sees no CUDA device" in lines[0] and "CUDA_VISIBLE_DEVICES" in lines[0]


@pytest.mark.skipif(not NO_MPS, reason="this machine has MPS")
def test_cli_refuses_mps_on_this_machine(tmp_path, monkeypatch, capfd):
    code, lines = run_cli(tmp_path, monkeypatch, capfd, "{device: mps}")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: execution.device: 'mps', but ")
    assert "torch.backends.mps.is_built() is False" in lines[0] or "is_available() is False" in lines[0]


def test_torch_without_cuda_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    message = refusal(device="cuda", num_gpus=1)
    assert "is built without CUDA (torch.version.cuda is None)" in message and "use device: cpu" in message


@pytest.mark.parametrize("visible", [None, "", "7"])
def test_no_visible_cuda_device_names_cuda_visible_devices(monkeypatch, visible):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    message = refusal(device="cuda:0", num_gpus=0.5)
    assert "sees no CUDA device" in message
    assert ("CUDA_VISIBLE_DEVICES is unset" if visible is None else f"CUDA_VISIBLE_DEVICES={visible!r}") in message


def test_cuda_index_beyond_this_machines_devices(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = refusal(device="cuda:2", num_gpus=3)
    assert message == ("execution.device: 'cuda:2', but torch sees 2 CUDA device(s) on this machine "
                       "(allowed: cuda, cuda:0 .. cuda:1)")
    assert device_problem("cuda:1") is None and device_problem("cuda") is None


def test_cuda_index_beyond_the_jobs_own_gpus_is_refused_even_on_a_cluster(monkeypatch):
    """Ray sets each job's CUDA_VISIBLE_DEVICES to the GPUs it was given: cuda:1 of a 1-GPU job never exists."""
    for extra in ({}, {"ray_address": "10.0.0.1:6379"}):
        message = refusal(device="cuda:1", num_gpus=1, **extra)
        assert "a job asks for 1 GPU(s)" in message and "(allowed: cuda, cuda:0;" in message
    assert "allowed: cuda, cuda:0 .. cuda:1;" in refusal(device="cuda:2", num_gpus=1.5)
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    check_local_resources(ExecutionConfig(device="cuda:1", num_gpus=1, ray_address="10.0.0.1:6379"))


def test_cuda_without_gpus_per_job_is_refused_everywhere():
    for extra in ({}, {"ray_address": "10.0.0.1:6379"}):
        assert "needs execution.num_gpus > 0" in refusal(device="cuda", num_gpus=0, **extra)


def test_mps_not_available_is_named(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    message = refusal(device="mps")
    assert "torch.backends.mps.is_available() is False" in message


@pytest.mark.parametrize("how", ["ray_address", "RAY_ADDRESS"])
@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_a_cluster_driver_without_the_device_passes_through(monkeypatch, how, name):
    """A CPU-only driver in front of GPU workers: the driver's torch is not asked; the full preflight
    (dataset, config, resources) passes and nothing is written."""
    monkeypatch.setattr(torch.version, "cuda", None)  # the worst driver: not even a CUDA build
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    execution = {"device": name, "num_gpus": 2 if name.startswith("cuda") else 0}
    if how == "ray_address":
        execution["ray_address"] = "10.0.0.1:6379"
    else:
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    cfg = parse_config(BenchmarkConfig, {"name": "t", "dataset": {"name": "digits", "n_train": 200, "n_test": 50},
                                         "attacks": [{"name": "badnets"}], "execution": execution})
    splits = preflight(cfg)
    assert len(splits.train) == 200
    without = {k: v for k, v in execution.items() if k != "ray_address"}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert refusal(**without).startswith(f"execution.device: {name!r}, but torch")


def test_cpu_is_never_refused(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert device_problem("cpu") is None
    check_local_resources(ExecutionConfig(device="cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(NO_CUDA, reason="CUDA not available: torch.cuda.is_available() is False")
def test_a_visible_gpu_passes_and_the_next_index_is_refused():
    count = torch.cuda.device_count()
    check_local_resources(ExecutionConfig(device="cuda", num_gpus=1))
    assert device_problem(f"cuda:{count - 1}") is None
    assert f"torch sees {count} CUDA device(s)" in device_problem(f"cuda:{count}")
