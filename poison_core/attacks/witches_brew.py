"""Witches' Brew: Geiping, Fowl, Huang, Czaja, Taylor, Moeller & Goldstein, 'Witches' Brew:
Industrial Scale Data Poisoning via Gradient Matching', ICLR 2021.

Clean-label targeted poisoning by gradient matching. The perturbations Delta of the bases (training
images of the adversarial class, labels kept) minimise Eq. (3), the negative cosine similarity
between the training gradient of the poisoned bases and the adversarial gradient of the target,

    B(Delta, theta) = 1 - < g_t, g_p > / ( ||g_t|| * ||g_p|| ),
    g_t = grad_theta L(F(x_t, theta), y_adv),   g_p = sum_i grad_theta L(F(x_i + Delta_i, theta), y_i),

averaged over an ensemble of K surrogates (ctx.surrogates, Sec. 4 "model ensembles") and over the
random shift/flip of differentiable data augmentation (Sec. 4).

The optimiser follows the reference code (github.com/JonasGeiping/data-poisoning,
forest/witchcoven/witch_base.py: `_initialize_brew`, `_run_trial`; forest/data/kettle_base.py:
`initialize_poison`), whose models see inputs normalised by the dataset's channel std `ds` and whose
Delta lives in those normalised units. Our models see [0, 1] images, so Delta is optimised here as
u = Delta / ds (ds: `data_std`, default the per-channel std of the clean training set, as forest's
`trainset.data_std`):

* start (`init: randn`, forest's default `--init randn`): Delta = clip(N(0, 1) * eps, -eps, eps);
  only the eps-ball clip, the pixel box is enforced by the first step's projection, as in forest;
* step (`attackoptim signAdam`): Adam on u with the *signed* gradient and forest's "Rule 2" step
  size lr = tau * (pbatch / 512) / K (pbatch = `batch_size`, K = number of surrogates), so the
  first step moves every pixel by lr * ds on the [0, 1] scale (0.1 * 0.25 ~ 6.4/255 on CIFAR-10
  with one model, whatever eps is);
* schedule (`--scheduling`): lr x0.1 after steps // 2.667, // 1.6 and // 1.142 (3/8, 5/8, 7/8);
* projection after every step onto the eps-ball and the pixel box [0, 1] (forest's two clamps).

`lr_rule: eps_scaled` with `init: rand` is this module's earlier rule (Adam lr tau * eps on the
[0, 1] scale, uniform start projected into the box), kept as a named option. Known difference from
forest: it keeps the restart with the lowest alignment loss of its *last iteration* (augmented,
measured before the last update); here the final loss is re-measured without augmentation on the
uint8 poisons that are actually stored.

R restarts run as independent jobs through ctx.map (each seeded from (ctx.seed, key, restart), so
the result does not depend on where or in what order they run); the restart with the lowest final
alignment loss is kept (Sec. 4).

Given ctx.checkpoint, each restart saves its perturbation, Adam moments, schedule position and
generator state every `checkpoint.every` steps (its own file, `checkpoint.child(key, restart)`); a
restart that Ray retries after its worker died resumes there and ends byte-identical.

The poison-batch gradient is one autograd call over the whole batch (create_graph=True, so the
loss can be differentiated again with respect to Delta), not a loop over samples. It runs on each
surrogate's crafting view (`_craft_view.crafting_view`: eval-mode BatchNorm fused into the
convolutions, a convolution double backward that computes only the terms asked for, channels-last),
about 2x faster per step than the surrogate itself (benchmarks/wb_speed.py). The fusion changes the
order of float32 operations, so poisons match the earlier loop to within rounding: >= 99 % of the
uint8 pixels equal and the same final alignment loss to 1e-3 (tests/test_wb_speed_equivalence.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from poison_core.attacks import targets as targeting
from poison_core.attacks._augment import default_shift, random_shift_flip
from poison_core.attacks._craft_view import crafting_view, input_pass, parameter_pass
from poison_core.perturbation import delta_of, project, quantize, random_start, to_unit
from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted, register_attack
from poison_core.checkpoint import Checkpointer, LoopState, resume_loop, save_loop
from poison_core.seeding import derive_seed
from poison_core.training import batch_slices, to_tensor

log = logging.getLogger(__name__)

LR_DIVISORS = (2.667, 1.6, 1.142)  # forest _run_trial: milestones attackiter // 2.667, // 1.6, // 1.142
REFERENCE_PBATCH = 512  # forest _initialize_brew: tau0 = tau * (pbatch / 512) / ensemble


class WitchesBrewParams(AttackParams):
    """steps / restarts / tau / augment: Geiping et al. Sec. 4-5 and forest/options.py (250 steps, R=8,
    tau=0.1, augment on, --pbatch 512 = `batch_size`, --init randn, --attackoptim signAdam).

    lr_rule 'forest': Adam lr tau * (batch_size / 512) / K on Delta / data_std (forest's Rule 2);
    'eps_scaled': lr tau * eps/255 on Delta itself (this module's earlier rule). init 'randn': Gaussian
    * eps clipped to the ball (forest's default); 'rand': uniform in the ball, projected into the box.
    data_std: per-channel std of the model inputs' normalisation (None: of the clean training set).
    """

    steps: int = Field(250, ge=1, le=100_000)
    restarts: int = Field(8, ge=1, le=1000)
    tau: float = Field(0.1, gt=0, le=10)
    augment: bool = True
    max_shift: int | None = Field(None, ge=0, le=64)
    batch_size: int = Field(512, ge=1, le=65_536)
    lr_rule: Literal["forest", "eps_scaled"] = "forest"
    init: Literal["randn", "rand"] = "randn"
    data_std: tuple[float, ...] | None = Field(None, min_length=1, max_length=64)


def lr_milestones(steps: int) -> list[int]:
    """Forest's step-size decay points: steps // 2.667, // 1.6, // 1.142 (at least step 1)."""
    return sorted({max(1, int(steps // d)) for d in LR_DIVISORS})


def channel_std(images: np.ndarray) -> tuple[float, ...]:
    """Per-channel std of uint8 NHWC images on the [0, 1] scale (forest's `data_std`)."""
    flat = np.asarray(images, dtype=np.float64).reshape(-1, images.shape[-1]) / 255.0
    return tuple(float(max(v, 1e-3)) for v in flat.std(axis=0))


def initial_delta(x0: torch.Tensor, eps: float, gen: torch.Generator, init: str) -> torch.Tensor:
    """The restart's start: 'randn' = clip(N(0, 1) * eps, -eps, eps) (forest initialize_poison, no box
    clip); 'rand' = uniform in [-eps, eps] projected into the pixel box."""
    if init == "rand":
        return random_start(x0, eps, gen)
    return (torch.randn(x0.shape, generator=gen, dtype=x0.dtype, device=x0.device) * eps).clamp(-eps, eps)


def step_size(params: WitchesBrewParams, epsilon: int, n_models: int) -> float:
    """Adam's lr: forest's Rule 2, tau * (pbatch / 512) / K in normalised units, or tau * eps/255."""
    if params.lr_rule == "eps_scaled":
        return params.tau * to_unit(epsilon)
    return params.tau * (params.batch_size / REFERENCE_PBATCH) / n_models


def _params(model: nn.Module) -> list[torch.Tensor]:
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("surrogate has no trainable parameters to match gradients on")
    return params


def parameter_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                       create_graph: bool) -> tuple[torch.Tensor, ...]:
    """grad_theta of the mean cross-entropy of the batch (x, y): one autograd call for the batch."""
    return torch.autograd.grad(F.cross_entropy(model(x), y), _params(model), create_graph=create_graph)


def alignment_loss(poison_grad: Sequence[torch.Tensor], target_grad: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 - cosine similarity of two parameter gradients (Eq. 3), over all layers flattened together
    (one concatenated vector each: three reductions instead of three per layer)."""
    poison = torch.cat([p.reshape(-1) for p in poison_grad])
    target = torch.cat([t.reshape(-1) for t in target_grad])
    return 1 - torch.dot(poison, target) / (poison.norm() * target.norm()).clamp_min(1e-12)


def ensemble_alignment(models: Sequence[nn.Module], target_grads: Sequence[Sequence[torch.Tensor]],
                       x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (3) averaged over the surrogate ensemble, differentiable with respect to x."""
    losses = [alignment_loss(parameter_gradient(m, x, y, create_graph=True), t) for m, t in zip(models, target_grads)]
    return torch.stack(losses).mean()


@dataclass
class Brew:
    """The perturbation of one restart and its signAdam optimiser (forest's `_run_trial`), shared by Witches'
    Brew and Sleeper Agent: Adam optimises u = Delta / data_std ('forest') or Delta itself ('eps_scaled')."""

    x0: torch.Tensor
    y: torch.Tensor
    scale: torch.Tensor
    delta: torch.Tensor
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    batches: list[slice]
    shift: int | None
    epsilon: int

    @classmethod
    def start(cls, bases: np.ndarray, labels: np.ndarray, params: WitchesBrewParams, epsilon: int, n_models: int,
              gen: torch.Generator, data_std: Sequence[float] | None = None) -> Brew:
        """The restart's start: `initial_delta`, Adam at `step_size`, forest's lr milestones. `data_std`
        (None: params.data_std, else the bases' std) is the normalisation the forest lr rule is expressed in."""
        device = gen.device
        x0 = to_tensor(bases, device)
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        std = data_std or params.data_std or channel_std(bases)
        if len(std) != x0.shape[1]:
            raise ValueError(f"data_std has {len(std)} channels, the images {x0.shape[1]}")
        scale = (torch.tensor(std, dtype=x0.dtype, device=device).view(1, -1, 1, 1) if params.lr_rule == "forest"
                 else torch.ones((1, 1, 1, 1), dtype=x0.dtype, device=device))
        delta = (initial_delta(x0, to_unit(epsilon), gen, params.init) / scale).requires_grad_(True)  # u = Delta / ds
        optimizer = torch.optim.Adam([delta], lr=step_size(params, epsilon, n_models), weight_decay=0)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_milestones(params.steps), gamma=0.1)
        shift = default_shift(bases.shape[1]) if params.max_shift is None else params.max_shift
        return cls(x0, y, scale, delta, optimizer, scheduler, batch_slices(len(bases), params.batch_size),
                   shift if params.augment else None, epsilon)

    def loop_state(self, gen: torch.Generator, modules: dict[str, nn.Module] | None = None) -> LoopState:
        return LoopState(tensors={"delta": self.delta}, optimizers={"adam": self.optimizer},
                         schedulers={"lr": self.scheduler}, generator=gen, modules=modules or {})

    def step(self, views: Sequence[nn.Module], target_grads: Sequence[Sequence[torch.Tensor]],
             gen: torch.Generator) -> float:
        """One signed Adam step on Eq. (3) over every batch, then the projection onto the eps-ball and the
        pixel box; returns the mean alignment loss before the step."""
        grad, total = alignment_gradient(views, target_grads, self.x0, self.y, self.delta, self.scale, self.batches,
                                         gen, self.shift)
        self.optimizer.zero_grad(set_to_none=True)
        self.delta.grad = grad.sign()
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.delta.copy_(project(self.delta * self.scale, self.x0, to_unit(self.epsilon)) / self.scale)
        return float(total) / len(self.batches)

    def poisoned(self, bases: np.ndarray) -> np.ndarray:
        """The uint8 poisons as stored."""
        return quantize(bases, self.delta.detach() * self.scale, self.epsilon)

    def final_loss(self, views: Sequence[nn.Module], target_grads: Sequence[Sequence[torch.Tensor]],
                   poisoned: np.ndarray, bases: np.ndarray) -> float:
        """Eq. (3) without augmentation on the stored uint8 poisons, averaged over the batches."""
        x = self.x0 + delta_of(poisoned, bases).to(self.x0.device)
        return float(np.mean([final_alignment(views, target_grads, x, self.y, batch) for batch in self.batches]))


def run_restart(surrogates: Sequence[nn.Module], bases: np.ndarray, labels: np.ndarray, target: np.ndarray,
                adversarial_class: int, params: WitchesBrewParams, epsilon: int, seed: int,
                checkpoint: Checkpointer | None = None,
                data_std: Sequence[float] | None = None) -> tuple[float, np.ndarray]:
    """One restart of the brew: returns (final alignment loss, uint8 poisoned bases). Module-level
    and free of shared state, so orchestration can run it as a remote task; with a checkpoint it
    resumes from the last saved step (see `Brew.start` for `data_std`)."""
    device = next(surrogates[0].parameters()).device
    views = [crafting_view(m.eval()) for m in surrogates]
    gen = torch.Generator(device=device).manual_seed(seed)
    x_t = to_tensor(target, device)
    y_t = torch.full((len(target),), int(adversarial_class), dtype=torch.long, device=device)
    target_grads = [[g.detach() for g in parameter_gradient(v, x_t, y_t, create_graph=False)] for v in views]
    brew = Brew.start(bases, labels, params, epsilon, len(views), gen, data_std)
    loop = brew.loop_state(gen)
    done, extra = resume_loop(checkpoint, loop)
    resumes = int(extra.get("resumes", 0)) + 1 if done else 0
    for step in range(done, params.steps):
        loss = brew.step(views, target_grads, gen)
        if step % 50 == 0:
            log.debug("witches_brew seed %d step %d alignment loss %.4f", seed, step, loss)
        if checkpoint is not None and checkpoint.due(step + 1):
            save_loop(checkpoint, step + 1, loop, {"resumes": resumes})
    poisoned = brew.poisoned(bases)
    return brew.final_loss(views, target_grads, poisoned, bases), poisoned


def alignment_gradient(views: Sequence[nn.Module], target_grads: Sequence[Sequence[torch.Tensor]], x0: torch.Tensor,
                   y: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, batches: Sequence[slice],
                   gen: torch.Generator, shift: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """d(Eq. 3)/d delta of every batch (each batch's gradient is zero outside it, so they add up
    exactly) and the summed loss, left on the device (no host round trip per step)."""
    grad, total = None, None
    for batch in batches:
        x = x0[batch] + delta[batch] * scale
        if shift is not None:
            x = random_shift_flip(x, gen, max_shift=shift)
        with parameter_pass(views, x):
            loss = ensemble_alignment(views, target_grads, x, y[batch])
        with input_pass(views):
            (part,) = torch.autograd.grad(loss, delta)
        grad = part if grad is None else grad + part
        total = loss.detach() if total is None else total + loss.detach()
    assert grad is not None and total is not None
    return grad, total


def final_alignment(models: Sequence[nn.Module], target_grads: Sequence[Sequence[torch.Tensor]], x: torch.Tensor,
                y: torch.Tensor, batch: slice) -> float:
    x = x[batch].detach().requires_grad_(True)
    return float(ensemble_alignment(models, target_grads, x, y[batch]).detach())


@register_attack
class WitchesBrew(Attack):
    """Gradient matching (Geiping et al., ICLR 2021, Eq. 3) with ensembles, augmentation and restarts."""

    name = "witches_brew"
    paper = "Geiping et al., Witches' Brew: Industrial Scale Data Poisoning via Gradient Matching, ICLR 2021"
    summary = "clean-label targeted: match the poison training gradient to the target's adversarial gradient"
    Params = WitchesBrewParams
    smoke = {"steps": 3, "restarts": 2}
    label_policy = "clean"
    perturbation_only = True
    needs_surrogate = True

    def _craft(self, ctx: CraftContext, n_poison: int, rng: np.random.Generator) -> Crafted:
        p, train, test = self.params, ctx.train, ctx.test
        plans = targeting.plan(ctx, n_poison, rng)
        assert test is not None
        surrogates = list(ctx.surrogates)
        std = p.data_std or channel_std(train.images)
        calls = [(surrogates, train.images[kp.positions], train.labels[kp.positions],
                  test.images[kp.key.target_position:kp.key.target_position + 1], kp.key.adversarial_class, p,
                  ctx.threat.epsilon, derive_seed(ctx.seed, self.name, i, r),
                  ctx.checkpoint.child(i, r) if ctx.checkpoint is not None else None, std)
                 for i, kp in enumerate(plans) for r in range(p.restarts)]
        results = ctx.map(run_restart, calls)
        images = []
        for i, kp in enumerate(plans):
            losses = [results[i * p.restarts + r][0] for r in range(p.restarts)]
            best = int(np.argmin(losses))
            log.info("witches_brew target %d: restart losses %s, kept restart %d", kp.key.target_id,
                        ", ".join(f"{v:.4f}" for v in losses), best)
            images.append(results[i * p.restarts + best][1])
        return targeting.pack(train, plans, images)
