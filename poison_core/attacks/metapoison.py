"""MetaPoison: Huang, Geiping, Fowl, Taylor & Goldstein, 'MetaPoison: Practical General-purpose
Clean-label Data Poisoning', NeurIPS 2020.

Algorithm 1 (ensembling and network re-initialisation), as the reference code runs it
(github:wronnyhuang/metapoison, main.py ``craft``): M surrogate models are trained from scratch on clean
data to staggered epochs floor(m * T / M), m = 0..M-1. Each craft step every model sweeps one epoch
(:class:`~poison_core.attacks._metapoison_worker.MetaPoisonWorker`): at every batch holding poisons it
unrolls K SGD steps (:mod:`poison_core.attacks._unroll`) and adds the meta-gradient of the adversarial
loss on the target (the Carlini-Wagner margin averaged over unroll stages 1..K, the target riding in each
train-mode batch: meta.py ``metaloss``) to a sum, then trains one step on the clean batch (``-trajectory
clean``). The driver averages the M summed gradients (``mpi.Allreduce`` / nmeta), takes an Adam step at the
craft rate of utils.py ``cr_schedule`` (200/255, squared warm-up over 5 steps, x0.1 at drop_period and
x0.01 from 2 * drop_period) and projects onto the eps-ball and the pixel box; a model that reaches T
epochs restarts from a fresh initialisation. The perturbation starts uniform in [-eps, eps] (main.py
``restart_poison`` runs at craft step 0, since 0 % restartperiod == 0), clipped to the box.

The M models are stateful workers built with ctx.actors (one Ray actor each under orchestration); their
architecture is the surrogate's (ctx.surrogates[0]), freshly initialised. With `warm_start` the workers
instead start (and restart) from the trained surrogates' weights, cycling through ctx.surrogates: the
fine-tuning regime of the paper's pretrained-model experiments. Earlier behaviours stay as options:
unroll_batch 'mixed' / 'poisons' (unroll once at the current weights, on a random poison share or the
whole poison set), objective 'xent', loss_stages 'last', target_eval 'eval', trajectory 'poisoned',
init 'zero', craft_warmup 0, lr_warmup_epochs 0.

The reference's colour perturbation (ReColorAdv, Laidlaw & Feizi, NeurIPS 2019; reference meta.py
``colorperts``, on by default there) is the option `recolor` (off by default, so poisons stay L-inf only):
each poison is f_theta(base) + delta, theta its shifts of a recolor_grid^C grid over YUV (grey for one
channel; :mod:`poison_core.recolor`), zero at the start. theta gets the meta-gradient of the same
objective plus recolor_smoothness * R(theta) and joins delta in the one Adam (reference ``metavars``); after
each step theta is clipped to threat.color_epsilon (and into colour space), then delta to the eps-ball and
the pixel box around the colour-shifted base (the reference clips delta to the ball only; our pixels are
stored, so they stay in the box). The result is rounded to the uint8 grid within eps of the colour-shifted
base rounded to the nearest grey level, and the PoisonSet stores theta so the audit can recompute it.

Given ctx.checkpoint, every `checkpoint.every` steps the driver saves the perturbation, its Adam state,
and every worker's weights, generation and epoch. A worker that dies (:class:`WorkerLost`) makes the
driver rebuild the whole ensemble from the last checkpoint (from step 0 without one), at most
ctx.retries times; every random draw is a function of (seed, step), so the result is the same as an
undisturbed run's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Literal, Union

import numpy as np
import torch
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer
from torch import nn

from poison_core import recolor as colour
from poison_core.attacks import targets as targeting
from poison_core.attacks._metapoison_worker import MetaPoisonWorker, fresh_model
from poison_core.perturbation import project, quantize, random_start, to_unit
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.checkpoint import Checkpointer, CraftState, LoopState, resume_loop, save_loop
from poison_core.config import ThreatModel
from poison_core.data.dataset import ImageDataset
from poison_core.errors import ConfigError, WorkerLost
from poison_core.seeding import derive_seed
from poison_core.training import to_tensor

__all__ = ["MetaPoison", "MetaPoisonParams", "MetaPoisonWorker", "color_rate_at", "craft_rate_at", "fresh_model"]

log = logging.getLogger(__name__)

_KeyResult = Union[np.ndarray, tuple[np.ndarray, np.ndarray]]
"""One key's uint8 poisons, or with recolor (poisons, float32 colour parameters)."""


class MetaPoisonParams(AttackParams):
    """Huang et al. Sec. 4 and reference parse.py: M=24 models, T=24 epochs (stagger 1), K=2 (nadapt), 60
    steps, craftrate 200/255 (crdropperiod 20, cr_schedule warm-up 5), SGD lrnrate 0.1 (warmupperiod 5),
    batch 125, objective cwT, trajectory clean. epoch_batches: batches per worker (mini-)epoch (None: a
    full pass); warm_start: start from the surrogates' weights; unroll_batch: 'epoch' (sweep, reference),
    'mixed' or 'poisons' (one unroll at the current weights); target_eval: 'batch' (train mode inside the
    unrolled batch, reference) or 'eval'; init: 'uniform' (reference) or 'zero'. recolor: add the
    reference's ReColorAdv colour perturbation (needs threat.color_epsilon > 0; reference -epscolor 0.04),
    recolor_grid points per colour axis (-gridshape 10), recolor_smoothness lambda (-smoothcoef 1),
    recolor_rate the colour parameters' Adam rate at full craft rate (None: craft_rate, as the reference's
    one Adam gives both; on the colour scale, fractions of a channel's range, that moves theta far past its
    bound in a step, so the reference's theta sits at +-color_epsilon). With recolor off the recolor_*
    fields are left out of the dump: provenance and keys stay as they were."""

    n_models: int = Field(24, ge=1, le=1024)
    stagger_epochs: int = Field(24, ge=1, le=10_000)
    unroll_steps: int = Field(2, ge=1, le=100)
    steps: int = Field(60, ge=1, le=100_000)
    craft_rate: float = Field(200.0, gt=0, le=10_000)
    drop_period: int = Field(20, ge=1, le=100_000)
    craft_warmup: int = Field(5, ge=0, le=100_000)
    lr: float = Field(0.1, gt=0, le=10)
    lr_warmup_epochs: int = Field(5, ge=0, le=10_000)
    batch_size: int = Field(125, ge=2, le=65_536)
    epoch_batches: int | None = Field(None, ge=1, le=1_000_000)
    warm_start: bool = False
    unroll_batch: Literal["epoch", "mixed", "poisons"] = "epoch"
    objective: Literal["cw", "xent"] = "cw"
    loss_stages: Literal["mean", "last"] = "mean"
    target_eval: Literal["batch", "eval"] = "batch"
    trajectory: Literal["clean", "poisoned"] = "clean"
    init: Literal["uniform", "zero"] = "uniform"
    recolor: bool = False
    recolor_grid: int = Field(10, ge=2, le=colour.MAX_POINTS)
    recolor_smoothness: float = Field(1.0, ge=0, le=1e6)
    recolor_rate: float | None = Field(None, gt=0, le=10_000)

    @model_serializer(mode="wrap")
    def _dump_without_recolor(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if not self.recolor:
            for name in ("recolor", "recolor_grid", "recolor_smoothness", "recolor_rate"):
                data.pop(name, None)
        return data


def craft_rate_at(params: MetaPoisonParams, step: int) -> float:
    """The Adam rate (on the [0, 1] scale) at craft step `step`: reference utils.py ``cr_schedule``,
    craft_rate * min(((step + 1) / craft_warmup)^2, 1), x0.1 from drop_period, x0.01 from 2 * drop_period."""
    warm = min(((step + 1) / params.craft_warmup) ** 2, 1.0) if params.craft_warmup else 1.0
    drop = 1.0 if step < params.drop_period else 0.1 if step < 2 * params.drop_period else 0.01
    return params.craft_rate / 255.0 * warm * drop


def color_rate_at(params: MetaPoisonParams, step: int) -> float:
    """The colour parameters' Adam rate at craft step `step`: recolor_rate (else craft_rate, on the colour
    parameters' own scale, as the reference's one Adam) under the same warm-up and drops."""
    return (params.recolor_rate or params.craft_rate) * craft_rate_at(params, step) * 255.0 / params.craft_rate


@register_attack
class MetaPoison(Attack):
    """Meta-learned poisons through unrolled training of a staggered ensemble (Huang et al., NeurIPS 2020)."""

    name = "metapoison"
    paper = "Huang et al., MetaPoison: Practical General-purpose Clean-label Data Poisoning, NeurIPS 2020"
    summary = "clean-label targeted: meta-gradients through K unrolled SGD steps of a staggered model ensemble"
    Params = MetaPoisonParams
    smoke = {"steps": 2, "n_models": 2, "stagger_epochs": 2, "batch_size": 16, "epoch_batches": 2}
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = True

    def check_threat(self, threat: ThreatModel) -> None:
        super().check_threat(threat)
        if self.params.recolor and threat.color_epsilon == 0:
            raise ConfigError("threat.color_epsilon: metapoison's recolor perturbs colours, but the threat model "
                              "allows none; set color_epsilon > 0 (allowed: 0 < color_epsilon <= 1; reference 0.04)")

    def changes_only_within_epsilon(self, threat: ThreatModel) -> bool:
        """With recolor on, the colour shift (bounded by color_epsilon) changes images even at epsilon 0."""
        return not (self.params.recolor and threat.color_epsilon > 0)

    def check_dataset(self, train: ImageDataset) -> None:
        channels = train.images.shape[-1]
        if self.params.recolor and channels not in colour.GRID_LOW:
            raise ConfigError(f"params.recolor: the colour perturbation needs grey (1-channel) or RGB (3-channel) "
                              f"images; dataset {train.name!r} has {channels} channels")

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        plans = targeting.plan(ctx, n_poison, rng)
        results = [self._craft_key(ctx, kp, i) for i, kp in enumerate(plans)]
        if not self.params.recolor:
            return targeting.pack(ctx.train, plans, results)  # type: ignore[arg-type]  # recolor off: images only
        crafted = targeting.pack(ctx.train, plans, [images for images, _ in results])
        return dataclasses.replace(crafted, color=np.concatenate([theta for _, theta in results]))

    def _architecture(self, ctx: CraftContext, worker: int) -> nn.Module:
        """Worker `worker`'s model: the first surrogate (re-initialised by the worker), or with warm_start
        the surrogates' trained weights in turn."""
        source = ctx.surrogates[worker % len(ctx.surrogates)] if self.params.warm_start else ctx.surrogates[0]
        return copy.deepcopy(source).cpu()

    def _craft_key(self, ctx: CraftContext, kp: targeting.KeyPlan, index: int) -> _KeyResult:
        """Brew one key's poisons; a lost worker restarts the ensemble from the last checkpoint."""
        checkpoint = ctx.checkpoint.child("key", index) if ctx.checkpoint is not None else None
        for attempt in range(ctx.retries + 1):
            try:
                return self._brew(ctx, kp, index, checkpoint)
            except WorkerLost as exc:
                if attempt == ctx.retries:
                    raise
                log.warning("metapoison target %d: %s; rebuilding the ensemble from the last checkpoint "
                               "(retry %d of %d)", kp.key.target_id, exc, attempt + 1, ctx.retries)
        raise AssertionError("unreachable")

    def _brew(self, ctx: CraftContext, kp: targeting.KeyPlan, index: int,
              checkpoint: Checkpointer | None) -> _KeyResult:
        """One key's uint8 poisons; with recolor, (poisons, their float32 colour parameters)."""
        p, train, test = self.params, ctx.train, ctx.test
        assert test is not None
        saved: CraftState | None = checkpoint.load() if checkpoint is not None else None
        target = test.images[kp.key.target_position:kp.key.target_position + 1]
        group = ctx.actors(MetaPoisonWorker, [
            (self._architecture(ctx, m), train.images, train.labels, kp.positions, target, kp.key.adversarial_class,
             p, 0 if saved else m * p.stagger_epochs // p.n_models,
             derive_seed(ctx.seed, self.name, index, "worker", m), str(ctx.device))
            for m in range(p.n_models)])
        x0 = to_tensor(train.images[kp.positions], "cpu")
        eps = to_unit(ctx.threat.epsilon)
        start = torch.zeros_like(x0)
        if p.init == "uniform":
            gen = torch.Generator().manual_seed(derive_seed(ctx.seed, self.name, index, "init"))
            start = random_start(x0, eps, gen)
        delta = start.requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=craft_rate_at(p, 0))
        loop = LoopState(tensors={"delta": delta}, optimizers={"adam": optimizer})
        theta = None
        if p.recolor:
            theta = colour.zero_params(len(x0), x0.shape[1], p.recolor_grid).requires_grad_(True)
            optimizer.add_param_group({"params": [theta], "lr": color_rate_at(p, 0)})
            loop.tensors["color"] = theta
        done, extra = resume_loop(checkpoint, loop, saved)
        if done:
            group.call("restore", [({k[len(f"{m}."):]: v.numpy() for k, v in loop.payload.items()
                                     if k.startswith(f"{m}.")}, *extra["workers"][m]) for m in range(p.n_models)])
        for step in range(done, p.steps):
            for param_group, rate in zip(optimizer.param_groups, (craft_rate_at(p, step), color_rate_at(p, step))):
                param_group["lr"] = rate
            current = delta.detach().numpy().copy()
            extra_args = () if theta is None else (theta.detach().numpy().copy(),)
            results = group.call("craft_step", [(current, step, *extra_args)] * p.n_models)
            delta.grad = torch.from_numpy(np.mean([r[1] for r in results], axis=0))
            if theta is not None:
                theta.grad = torch.from_numpy(np.mean([r[2] for r in results], axis=0))
            optimizer.step()
            with torch.no_grad():
                if theta is None:
                    delta.copy_(project(delta, x0, eps))
                else:
                    theta.copy_(colour.project(theta, ctx.threat.color_epsilon))
                    delta.copy_(project(delta, colour.recolor(x0, theta), eps))
            log.debug("metapoison target %d step %d adversarial loss %.4f", kp.key.target_id, step,
                         float(np.mean([r[0] for r in results])))
            if checkpoint is not None and checkpoint.due(step + 1):
                states = group.call("state", [()] * p.n_models)
                loop.payload = {f"{m}.{k}": torch.from_numpy(np.asarray(v)) for m, (weights, _, _) in enumerate(states)
                                for k, v in weights.items()}
                save_loop(checkpoint, step + 1, loop, {"workers": [[g, e] for _, g, e in states]})
        if theta is None:
            return quantize(train.images[kp.positions], delta, ctx.threat.epsilon)
        params = theta.detach().numpy().copy()
        return colour.quantize_recolored(train.images[kp.positions], theta, delta, ctx.threat.epsilon), params
