"""Crafting checkpoints: a long attack saves its state every `every` steps and resumes from it.

The state is tensors (perturbations, optimizer moments, model weights, torch RNG state) in one
safetensors file with JSON metadata (step, scheduler position, scalars): no pickle, written
atomically, so a crash mid-save leaves the previous checkpoint intact. A restarted job that finds a
checkpoint continues from its step and, because every random draw is restored, ends byte-identical
to an undisturbed run. :class:`LoopState` names the pieces of an optimisation loop that
:func:`save_loop` writes and :func:`resume_loop` restores in place; Witches' Brew, MetaPoison and
error-minimising noise all checkpoint through it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from poison_core.io import atomic_write_bytes, exists, filesystem, read_bytes

log = logging.getLogger(__name__)


@dataclass
class CraftState:
    """What an attack needs to resume: its step, tensors and JSON-able extras."""

    step: int
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any]


class Checkpointer:
    """Saves/loads one CraftState at `uri` (any fsspec URI). `due(step)` says when to save."""

    def __init__(self, uri: str, every: int = 10, storage_options: dict[str, Any] | None = None) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1, got {every}")
        self.uri, self.every, self.storage_options = uri, every, storage_options
        self.saves = 0

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def save(self, state: CraftState) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.tensors.items()}
        meta = {"step": str(state.step), "extra": json.dumps(state.extra, sort_keys=True)}
        atomic_write_bytes(self.uri, st_save(tensors, metadata=meta), self.storage_options)
        self.saves += 1
        log.debug("checkpoint at step %d -> %s", state.step, self.uri)

    def load(self) -> CraftState | None:
        if not exists(self.uri, self.storage_options):
            return None
        data = read_bytes(self.uri, self.storage_options)
        from poison_core.models.io import read_metadata

        meta = read_metadata(data)
        return CraftState(int(meta["step"]), dict(st_load(data)), json.loads(meta.get("extra", "{}")))

    def child(self, *parts: object) -> Checkpointer:
        """The checkpoint of one independent piece of the craft (a restart, a poison key), beside this one."""
        suffix = "-".join(str(p) for p in parts)
        stem, dot, ext = self.uri.rpartition(".")
        uri = f"{stem}.{suffix}.{ext}" if dot and "/" not in ext else f"{self.uri}.{suffix}"
        return Checkpointer(uri, self.every, self.storage_options)

    def clear(self) -> None:
        fs, path = filesystem(self.uri, self.storage_options)
        if fs.exists(path):
            fs.rm(path)


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """JSON-able state of a numpy Generator (PCG64 ints are arbitrary-precision: stored as strings)."""
    state = rng.bit_generator.state
    return json.loads(json.dumps(state, default=str))


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    fixed = dict(state)
    inner = dict(fixed["state"])
    fixed["state"] = {k: int(v) for k, v in inner.items()}
    fixed["has_uint32"], fixed["uinteger"] = int(fixed["has_uint32"]), int(fixed["uinteger"])
    rng.bit_generator.state = fixed


@dataclass
class LoopState:
    """The resumable pieces of an optimisation loop, restored in place by :func:`resume_loop`:
    tensors (perturbations, noise), optimizers and their schedulers, a torch generator, models; and
    `payload`, tensors saved as they are and handed back on resume (remote workers' weights)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)
    payload: dict[str, torch.Tensor] = field(default_factory=dict)


def _scheduler_position(scheduler: Any) -> dict[str, Any]:
    """The JSON-able part of an LR scheduler's state (its step count and current rates); the rest
    (milestones, gamma) comes from its constructor."""
    state = scheduler.state_dict()
    return {k: state[k] for k in ("last_epoch", "_step_count", "_last_lr") if k in state}


def save_loop(checkpoint: Checkpointer, step: int, loop: LoopState, extra: dict[str, Any] | None = None) -> None:
    """Write `loop` as it stands after `step` completed steps."""
    tensors = {f"tensor.{k}": v for k, v in loop.tensors.items()}
    meta: dict[str, Any] = {"extra": extra or {}, "optimizers": {}, "schedulers": {}}
    for name, optimizer in loop.optimizers.items():
        state = optimizer.state_dict()
        for index, slots in state["state"].items():
            for slot, value in slots.items():
                tensors[f"optimizer.{name}.{index}.{slot}"] = torch.as_tensor(value)
        meta["optimizers"][name] = state["param_groups"]
    for name, scheduler in loop.schedulers.items():
        meta["schedulers"][name] = _scheduler_position(scheduler)
    for name, module in loop.modules.items():
        tensors.update({f"module.{name}.{k}": v for k, v in module.state_dict().items()})
    if loop.generator is not None:
        tensors["generator"] = loop.generator.get_state()
    tensors.update({f"payload.{k}": v for k, v in loop.payload.items()})
    checkpoint.save(CraftState(step, tensors, meta))


def resume_loop(checkpoint: Checkpointer | None, loop: LoopState,
                state: CraftState | None = None) -> tuple[int, dict[str, Any]]:
    """Restore `loop` from `state` or else the checkpoint, if there is one: returns (steps done, extra);
    (0, {}) if there is none."""
    if state is None and checkpoint is not None:
        state = checkpoint.load()
    if state is None:
        return 0, {}
    tensors, meta = state.tensors, state.extra
    with torch.no_grad():
        for name, tensor in loop.tensors.items():
            tensor.copy_(tensors[f"tensor.{name}"])
    for name, optimizer in loop.optimizers.items():
        prefix, slots = f"optimizer.{name}.", dict[int, dict[str, torch.Tensor]]()
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, slot = key[len(prefix):].split(".", 1)
                slots.setdefault(int(index), {})[slot] = value
        optimizer.load_state_dict({"state": slots, "param_groups": meta["optimizers"][name]})
    for name, scheduler in loop.schedulers.items():
        scheduler.load_state_dict({**scheduler.state_dict(), **meta["schedulers"][name]})
    for name, module in loop.modules.items():
        prefix = f"module.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if loop.generator is not None:
        loop.generator.set_state(tensors["generator"])
    loop.payload = {k[len("payload."):]: v for k, v in tensors.items() if k.startswith("payload.")}
    log.info("resumed from checkpoint %s at step %d", checkpoint.uri if checkpoint else "(given)", state.step)
    return state.step, meta["extra"]
