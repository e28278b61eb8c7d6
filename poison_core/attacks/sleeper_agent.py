"""Sleeper Agent: Souri, Fowl, Chellappa, Goldblum & Goldstein, 'Sleeper Agent: Scalable Hidden Trigger
Backdoors for Neural Networks Trained from Scratch', NeurIPS 2022.

A clean-label, hidden-trigger backdoor by gradient matching. The poisons are training images of the
TARGET class, labels kept, perturbed within eps; the trigger never appears in the training data. At
test time a SOURCE-class image with the patch pasted anywhere is to be classified as the target class.
The perturbations Delta minimise Witches' Brew's alignment loss (Eq. 3 there; Eq. 2-3 here) with the
source gradient of the *patched* source-class training images s~ labelled with the target class:

    A(Delta, theta) = 1 - < g_s, g_p > / ( ||g_s|| * ||g_p|| ),
    g_s = grad_theta (1/S) sum_j L(F(s~_j, theta), y_target),   g_p = grad_theta sum_i L(F(x_i + Delta_i, theta), y_i).

Two additions over Witches' Brew (Sec. 3.2, Algorithm 1):

* *data selection*: the poisons are the target-class training images with the largest parameter-gradient
  norm ||grad_theta L(F(x_i, theta), y_i)|| under the clean surrogate (`selection: max_gradient`; the
  reference's `select_poisons`); `random` draws them uniformly;
* *model retraining*: every `retrain_every` steps (the reference's `retrain_iter` 50, at steps 50, 100,
  150 and 200 of 250: not at step 0 nor at the last) each surrogate is re-initialised and trained from
  scratch with `retrain` on the training set carrying the current (uint8) poisons, and the source gradient
  is recomputed on the new model (`retrain_scenario: from-scratch`).

As the reference (hsouri/Sleeper-Agent: forest/options.py, witchcoven/witch_base.py, witch_matching.py,
data/kettle_base.py): eps 16, budget 1 %, 250 signAdam steps at forest's Rule 2 step size with its lr
schedule, differentiable shift/flip augmentation, one restart; the patch's side is a quarter of the
image's (8 pixels on 32x32), pasted opaque at a random location of every patched source image
(`random_patch`), once before crafting. The optimiser, projection and uint8 storage are those of
:mod:`poison_core.attacks.witches_brew` (`Brew`). The source set is every source-class training image
(`n_sources` caps it: the reference's `sources_train`).

The patch: the reference's default run LOADS a fixed image, ``patches/trigger_10.png`` (forest/options.py
``--load_patch``, read in data/kettle_base.py); a Bernoulli(1/2) pattern per pixel and channel
(`_create_patch`) is only its fallback when no patch file is given. That image is not shipped here, so
`pattern: bernoulli` is the reference's fallback, not its default trigger.

Retraining: the reference retrains each model from scratch with the victim's full recipe
(``retrain_max_epoch`` None: all of the recipe's epochs, its schedule and augmentation). `retrain: None`
(the default) does the same with ctx.surrogate_recipe, the recipe the surrogates were trained with (the
benchmark's surrogate, else victim, recipe); a TrainConfig given here overrides it (a cheaper retrain).

Given ctx.checkpoint, the restart saves its perturbation, Adam state, generator and its (retrained)
models every `checkpoint.every` steps and resumes there.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call, grad, vmap

from poison_core.attacks._craft_view import crafting_view
from poison_core.attacks._metapoison_worker import fresh_model
from poison_core.attacks.base import Attack, CraftContext, Crafted, register_attack
from poison_core.attacks.witches_brew import Brew, WitchesBrewParams, channel_std, parameter_gradient
from poison_core.checkpoint import Checkpointer, resume_loop, save_loop
from poison_core.config import TrainConfig
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError
from poison_core.seeding import derive_seed
from poison_core.training import batch_slices, to_tensor, train_model
from poison_core.triggers.random_patch import check_source_target, paste_at_random

log = logging.getLogger(__name__)


class SleeperAgentParams(WitchesBrewParams):
    """The reference's defaults (forest/options.py of hsouri/Sleeper-Agent): 250 steps, one restart,
    retraining every 50 steps with the surrogates' full recipe (`retrain` None), max-gradient poison
    selection, a patch a quarter of the image side (`patch_size` None) at random locations; the Bernoulli
    pattern is the reference's fallback (its default loads patches/trigger_10.png). location_seed: the
    test-time locations."""

    restarts: int = Field(1, ge=1, le=1000)
    target_class: int = Field(0, ge=0)
    source_class: int = Field(1, ge=0)
    patch_size: int | None = Field(None, ge=1, le=64)
    pattern: Literal["bernoulli", "noise", "checkerboard", "white"] = "bernoulli"
    pattern_seed: int = Field(0, ge=0, le=2**32 - 1)
    location_seed: int = Field(1, ge=0, le=2**32 - 1)
    selection: Literal["max_gradient", "random"] = "max_gradient"
    n_sources: int | None = Field(None, ge=1, le=10_000_000)
    source_batch: int = Field(512, ge=1, le=65_536)
    retrain_every: int | None = Field(50, ge=1, le=100_000)
    retrain: TrainConfig | None = None


def patch_side(params: SleeperAgentParams, height: int, width: int) -> int:
    """The patch's side: `patch_size`, or a quarter of the shorter image side (the paper's 8 on 32)."""
    return params.patch_size if params.patch_size is not None else max(1, min(height, width) // 4)


def gradient_norms(models: Sequence[nn.Module], images: np.ndarray, labels: np.ndarray,
                   batch_size: int = 256) -> np.ndarray:
    """||grad_theta L(F(x_i, theta), y_i)||_2 of every sample, averaged over the eval-mode `models` (the
    reference's `max_gradient` selection), by per-sample gradients (torch.func.vmap)."""
    norms = np.zeros(len(images))
    for model in models:
        model.eval()
        device = next(model.parameters()).device
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, model: nn.Module = model,
                 buffers: dict[str, torch.Tensor] = buffers) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, (p, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
        for s in batch_slices(len(images), batch_size):
            y = torch.as_tensor(np.asarray(labels[s], dtype=np.int64), device=device)
            grads = per_sample(params, to_tensor(images[s], device), y)
            norms[s] += torch.stack([g.pow(2).flatten(1).sum(1) for g in grads.values()]).sum(0).sqrt().cpu().numpy()
    return norms / len(models)


def source_gradient(view: nn.Module, sources: torch.Tensor, target_class: int, batch_size: int) -> list[torch.Tensor]:
    """g_s: the gradient of the mean cross-entropy of the patched sources labelled `target_class`."""
    total: list[torch.Tensor] | None = None
    for s in batch_slices(len(sources), batch_size):
        x = sources[s]
        y = torch.full((len(x),), int(target_class), dtype=torch.long, device=x.device)
        part = [g.detach() * (len(x) / len(sources)) for g in parameter_gradient(view, x, y, create_graph=False)]
        total = part if total is None else [t + p for t, p in zip(total, part)]
    assert total is not None
    return total


def retrain_recipe(params: SleeperAgentParams, surrogate_recipe: TrainConfig | None) -> TrainConfig:
    """The recipe models are retrained with while crafting: `params.retrain`, else the surrogates' recipe
    (the reference: the victim's full recipe), else the TrainConfig default."""
    if params.retrain is not None:
        return params.retrain
    return surrogate_recipe if surrogate_recipe is not None else TrainConfig()


def run_sleeper(surrogates: Sequence[nn.Module], train: ImageDataset, positions: np.ndarray, sources: np.ndarray,
                params: SleeperAgentParams, epsilon: int, seed: int, checkpoint: Checkpointer | None = None,
                data_std: Sequence[float] | None = None,
                surrogate_recipe: TrainConfig | None = None) -> tuple[float, np.ndarray, int]:
    """One restart: returns (final alignment loss, uint8 poisoned train.images[positions], retrains done).
    Module-level and free of shared state, so orchestration can run it as a remote task."""
    device = next(surrogates[0].parameters()).device
    recipe = retrain_recipe(params, surrogate_recipe)
    models = [copy.deepcopy(m).eval() for m in surrogates]
    gen = torch.Generator(device=device).manual_seed(seed)
    bases, labels = train.images[positions], train.labels[positions]
    patched = to_tensor(sources, device)
    brew = Brew.start(bases, labels, params, epsilon, len(models), gen, data_std)
    loop = brew.loop_state(gen, {f"model{i}": m for i, m in enumerate(models)})
    done, extra = resume_loop(checkpoint, loop)
    retrains = int(extra.get("retrains", 0))

    def matching_target() -> tuple[list[nn.Module], list[list[torch.Tensor]]]:
        views = [crafting_view(m.eval()) for m in models]
        return views, [source_gradient(v, patched, params.target_class, params.source_batch) for v in views]

    views, source_grads = matching_target()
    for step in range(done, params.steps):
        loss = brew.step(views, source_grads, gen)
        if step % 50 == 0:
            log.debug("sleeper_agent seed %d step %d alignment loss %.4f", seed, step, loss)
        every = params.retrain_every
        if every is not None and step % every == 0 and step not in (0, params.steps - 1):
            images = train.images.copy()
            images[positions] = brew.poisoned(bases)
            for i, m in enumerate(models):
                fresh = fresh_model(m, derive_seed(seed, "retrain", step, i)).to(device)
                train_model(fresh, train.replace(images=images), recipe, device=device,
                            seed=derive_seed(seed, "retrain-data", step, i))
                m.load_state_dict(fresh.state_dict())
            retrains += 1
            views, source_grads = matching_target()
            log.info("sleeper_agent seed %d: models retrained at step %d (alignment loss %.4f)", seed, step, loss)
        if checkpoint is not None and checkpoint.due(step + 1):
            save_loop(checkpoint, step + 1, loop, {"retrains": retrains})
    poisoned = brew.poisoned(bases)
    return brew.final_loss(views, source_grads, poisoned, bases), poisoned, retrains


@register_attack
class SleeperAgent(Attack):
    """Souri et al.'s Sleeper Agent (NeurIPS 2022, Algorithm 1): gradient matching towards patched sources
    labelled with the target class, on max-gradient target-class poisons, with retraining during crafting."""

    name = "sleeper_agent"
    paper = ("Souri et al., Sleeper Agent: Scalable Hidden Trigger Backdoors for Neural Networks Trained from "
             "Scratch, NeurIPS 2022")
    summary = "clean-label hidden-trigger backdoor: gradient matching to patched sources, retraining while crafting"
    Params = SleeperAgentParams
    smoke = {"steps": 4, "retrain_every": 2, "retrain": {"epochs": 1, "batch_size": 64}}
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = True

    def check_dataset(self, train: ImageDataset) -> None:
        p, (h, w, c) = self.params, train.image_shape
        check_source_target(p.target_class, p.source_class, patch_side(p, h, w), train.num_classes, h, w)
        if p.data_std is not None and len(p.data_std) != c:
            raise ConfigError(f"params.data_std: {len(p.data_std)} values for {c}-channel images "
                              f"(allowed: exactly {c})")

    def trigger_spec(self, height: int, width: int) -> dict[str, Any]:
        """The test-time trigger: the patch pasted opaque at a `location_seed`-drawn place per image."""
        p = self.params
        return {"kind": "random_patch", "size": patch_side(p, height, width), "pattern": p.pattern,
                "pattern_seed": p.pattern_seed, "location_seed": p.location_seed, "epsilon": 255,
                "target_class": p.target_class, "source_class": p.source_class}

    def patched(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`images` with the patch at locations drawn from the attack's generator (crafting)."""
        p = self.params
        _, h, w, _ = images.shape
        return paste_at_random(images, patch_side(p, h, w), p.pattern, p.pattern_seed, rng)

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train = self.params, ctx.train
        pool = np.flatnonzero(train.labels == p.target_class)
        source_pool = np.flatnonzero(train.labels == p.source_class)
        if len(pool) == 0 or len(source_pool) == 0:
            raise ConfigError(f"params.target_class/source_class: no training image of class "
                              f"{p.target_class if len(pool) == 0 else p.source_class}")
        n = min(n_poison, len(pool))
        if p.selection == "max_gradient":
            norms = gradient_norms(ctx.surrogates, train.images[pool], train.labels[pool])
            positions = np.sort(pool[np.argsort(-norms, kind="stable")[:n]])
        else:
            positions = np.sort(rng.choice(pool, size=n, replace=False))
        if p.n_sources is not None and p.n_sources < len(source_pool):
            source_pool = np.sort(rng.choice(source_pool, size=p.n_sources, replace=False))
        sources = self.patched(train.images[source_pool], rng)
        std = p.data_std or channel_std(train.images)
        calls = [(list(ctx.surrogates), train, positions, sources, p, ctx.threat.epsilon,
                  derive_seed(ctx.seed, self.name, r), ctx.checkpoint.child(r) if ctx.checkpoint is not None else None,
                  std, ctx.surrogate_recipe) for r in range(p.restarts)]
        results = ctx.map(run_sleeper, calls)
        losses = [r[0] for r in results]
        best = int(np.argmin(losses))
        log.info("sleeper_agent: %d poisons, %d patched sources, restart losses %s, kept restart %d "
                    "(%d retrains)", n, len(sources), ", ".join(f"{v:.4f}" for v in losses), best, results[best][2])
        h, w, _ = train.image_shape
        return Crafted(positions=positions, images=results[best][1], poison_labels=train.labels[positions],
                       targets={"kind": "backdoor", "target_class": p.target_class, "source_class": p.source_class},
                       trigger=self.trigger_spec(h, w),
                       provenance={"alignment_loss": losses[best], "retrains": results[best][2]})
