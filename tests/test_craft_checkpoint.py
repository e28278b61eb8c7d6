"""Crafting checkpoints: Witches' Brew, MetaPoison, Sleeper Agent (whose checkpoint after step 2
holds the models it retrained at step 1) and error-minimising noise save their
state every N steps; a craft interrupted after a save and started again resumes there and ends
byte-identical to an undisturbed craft; a lost MetaPoison worker rebuilds the ensemble from the
last checkpoint; and a Ray worker SIGKILLed in the middle of a Witches' Brew restart is retried by
Ray, resumes from its checkpoint, and the PoisonSet is byte-identical."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from belladonna.lifecycle.reaper import descendants

from poison_core.attacks import CraftContext, LocalActorGroup, make_attack
from poison_core.checkpoint import Checkpointer, CraftState
from poison_core.config import DatasetConfig, ExecutionConfig, ModelConfig, TargetSelection, ThreatModel, TrainConfig
from poison_core.data import load_dataset
from poison_core.errors import WorkerLost
from poison_core.models import build_model
from poison_core.poisons import to_parquet_bytes
from poison_core.training import train_model

SPLITS = load_dataset(DatasetConfig(name="digits", n_train=200, n_test=60, seed=0))
TRAIN, TEST = SPLITS.train, SPLITS.test
CLEAN = ThreatModel(epsilon=16, budget=0.05, clean_label=True)
TARGETED = CLEAN.model_copy(update={"targets": TargetSelection(n_targets=1)})


class Interrupted(Exception):
    """Stands for the process dying right after a checkpoint was written."""


class DiesAfterSaves(Checkpointer):
    """A checkpointer whose process 'dies' once it has written `saves_before_death` checkpoints."""

    def __init__(self, uri: str, every: int, saves_before_death: int) -> None:
        super().__init__(uri, every)
        self.saves_before_death = saves_before_death

    def save(self, state: CraftState) -> None:
        super().save(state)
        if self.saves >= self.saves_before_death:
            raise Interrupted(f"died after step {state.step}")

    def child(self, *parts: object) -> Checkpointer:
        inner = super().child(*parts)
        return DiesAfterSaves(inner.uri, self.every, self.saves_before_death)


@pytest.fixture(scope="module")
def surrogate(one_thread):
    model = build_model(ModelConfig(name="convnet", width=8), TRAIN.image_shape, TRAIN.num_classes, seed=0)
    train_model(model, TRAIN, TrainConfig(epochs=4, batch_size=32), device="cpu", seed=0)
    return model.eval()


CASES = {
    "witches_brew": ({"steps": 8, "restarts": 2}, TARGETED),
    "metapoison": ({"steps": 6, "n_models": 2, "stagger_epochs": 2, "batch_size": 16, "epoch_batches": 2}, TARGETED),
    "sleeper_agent": ({"steps": 6, "retrain_every": 1, "retrain": {"epochs": 1, "batch_size": 64}}, CLEAN),
    "error_min": ({"width": 4, "max_rounds": 5, "train_steps": 2, "steps": 2, "stop_accuracy": 1.0}, CLEAN),
}


def craft(name: str, surrogate, checkpoint: Checkpointer | None = None, **ctx_extra):
    params, threat = CASES[name]
    ctx = CraftContext(train=TRAIN, test=TEST, threat=threat, seed=3, surrogates=[surrogate], checkpoint=checkpoint,
                       **ctx_extra)
    return make_attack(name, params).craft(ctx)


@pytest.mark.parametrize("name", sorted(CASES))
def test_interrupted_craft_resumes_from_its_checkpoint_byte_identical(name, surrogate, tmp_path):
    undisturbed = to_parquet_bytes(craft(name, surrogate))
    uri = str(tmp_path / "ckpt" / "craft.safetensors")
    with pytest.raises(Interrupted):
        craft(name, surrogate, DiesAfterSaves(uri, every=2, saves_before_death=1))
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved, "nothing was checkpointed before the interruption"
    resumed = Checkpointer(uri, every=2)
    assert to_parquet_bytes(craft(name, surrogate, resumed)) == undisturbed
    assert to_parquet_bytes(craft(name, surrogate, Checkpointer(str(tmp_path / "fresh.safetensors"), 2))) == undisturbed


def test_lost_metapoison_worker_rebuilds_the_ensemble_from_the_checkpoint(surrogate, tmp_path):
    undisturbed = to_parquet_bytes(craft("metapoison", surrogate))
    groups: list[LocalActorGroup] = []

    class DiesOnce(LocalActorGroup):
        calls = 0

        def call(self, method, args_per_worker):
            DiesOnce.calls += 1
            if DiesOnce.calls == 5:  # step 3's craft_step, after the step-2 checkpoint
                raise WorkerLost("a worker of 2 died during craft_step")
            return super().call(method, args_per_worker)

    def factory(cls, init_args):
        groups.append(DiesOnce(cls, init_args))
        return groups[-1]

    ckpt = Checkpointer(str(tmp_path / "craft.safetensors"), every=2)
    assert to_parquet_bytes(craft("metapoison", surrogate, ckpt, actors=factory)) == undisturbed
    assert len(groups) == 2
    with pytest.raises(WorkerLost):
        craft("metapoison", surrogate, None, actors=lambda cls, args: _always_dies(cls, args), retries=1)


def _always_dies(cls, init_args):
    class Dead(LocalActorGroup):
        def call(self, method, args_per_worker):
            raise WorkerLost("a worker of 2 died")

    return Dead(cls, init_args)


def _ray_task_pids() -> list[int]:
    """PIDs of the worker processes of the Ray instance this test started (descendants of this
    process, never another user's Ray) that now run a task of ours (Ray titles them ray::_in_worker)."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_in_worker"):
                pids.append(pid)
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_sigkilled_ray_worker_mid_witches_brew_resumes_byte_identical(surrogate, tmp_path, fresh_ray):
    """Restarts run as Ray tasks (ctx.map); once both restarts have checkpointed, one worker is SIGKILLed;
    Ray retries the task, which resumes from the checkpoint; the PoisonSet matches an undisturbed
    in-process craft byte for byte."""
    from infra.ray_runner import ensure_ray, job_map

    params = {"steps": 400, "restarts": 2}
    threat = TARGETED
    undisturbed = make_attack("witches_brew", params).craft(
        CraftContext(train=TRAIN, test=TEST, threat=threat, seed=3, surrogates=[surrogate]))
    execution = ExecutionConfig(num_cpus=1, max_retries=2)
    ensure_ray(execution)
    folder = tmp_path / "ckpt"
    killed: list[int] = []

    def saved() -> list[Path]:
        """The restarts' finished checkpoints; not a `.<name>.tmp-*` file that a write in flight (or one
        cut short by the kill) leaves beside them."""
        return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []

    def kill_mid_craft() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = _ray_task_pids()
            if pids and len(saved()) == params["restarts"]:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_mid_craft, daemon=True)
    killer.start()
    ckpt = Checkpointer(str(folder / "craft.safetensors"), every=20)
    ps = make_attack("witches_brew", params).craft(
        CraftContext(train=TRAIN, test=TEST, threat=threat, seed=3, surrogates=[surrogate], checkpoint=ckpt,
                     map=job_map(execution)))
    killer.join(timeout=5)
    assert killed, "no Ray worker was killed mid-craft"
    resumes = [Checkpointer(str(p)).load().extra["extra"]["resumes"] for p in saved()]
    assert max(resumes) >= 1, f"no restart resumed from a checkpoint: {resumes}"
    assert to_parquet_bytes(ps) == to_parquet_bytes(undisturbed)


STAGE_BENCHMARK = """
name: checkpointed
dataset: {name: digits, n_train: 200, n_test: 60, seed: 0}
victim: {model: {name: mlp, width: 16}, train: {epochs: 1}}
threat: {epsilon: 16, budget: 0.1, clean_label: true}
attacks:
  - {name: error_min, params: {width: 4, max_rounds: 4, train_steps: 2, steps: 2, stop_accuracy: 1.0}}
execution: {checkpoint_every: 1}
"""


def test_craft_stage_checkpoints_to_the_store_resumes_and_cleans_up(tmp_path, monkeypatch):
    from infra.storage import Store
    from poison_core.config import load_benchmark
    from tasks import stages

    cfg = load_benchmark(STAGE_BENCHMARK)
    reference = Store(str(tmp_path / "reference"))
    prefix = stages.ingest(reference, cfg.dataset).key
    expected = reference.read_bytes(stages.craft(reference, cfg, prefix, cfg.attacks[0], 0).key)
    assert reference.list("checkpoints") == []

    store = Store(str(tmp_path / "store"))
    stages.ingest(store, cfg.dataset)
    monkeypatch.setattr(stages, "Checkpointer", lambda uri, every, options: DiesAfterSaves(uri, every, 2))
    with pytest.raises(Interrupted):
        stages.craft(store, cfg, prefix, cfg.attacks[0], 0)
    key = stages.poison_key(cfg, prefix, cfg.attacks[0], 0)
    assert not store.exists(key) and store.list(stages.checkpoint_prefix(key))
    monkeypatch.undo()
    out = stages.craft(store, cfg, prefix, cfg.attacks[0], 0)
    assert out.computed and store.read_bytes(out.key) == expected
    assert store.list("checkpoints") == []
