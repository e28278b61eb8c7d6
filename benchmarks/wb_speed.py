"""Witches' Brew crafting speed: seconds per restart-step of the earlier (unfused) crafting loop
(:func:`baseline_restart`, a frozen copy kept here) against today's ``witches_brew.run_restart``,
interleaved in one process, on one thread.

    nice -n 10 python3 -m benchmarks.wb_speed [--steps 20] [--reps 5] [--out benchmarks/results]

Setting: Fashion-MNIST (2,000 training images; digits when the Debian package is missing), the
width-16 ConvNet trained one epoch as the surrogate, 60 bases of class 0, one target of another
class, eps 16, the paper's defaults otherwise (augmentation on, batch 512, forest's step rule).
Each repetition runs both loops for ``--steps`` steps in alternating order; the per-step time is the
restart's time over its steps (setup and final loss included), the median over repetitions, in
process CPU time (what the loop costs, whatever else runs on the machine) and in wall time. The
FLOPs of one step (convolutions and matrix products, forward, backward and double backward, counted
by :class:`benchmarks.throughput.FlopCount`) over the CPU time give the rate, compared with a
one-thread float32 1024 x 1024 matrix multiply timed the same way between the repetitions. Equivalence: both loops
run ``--quality-steps`` steps from the same seeds; the final alignment losses (Eq. 3, on the stored
uint8 poisons) and the share of identical poisoned pixels are reported. :func:`other_loops` measures,
without changing them, error-min's PGD step and MetaPoison's unrolled meta-gradient. Nothing here
is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.run import FASHION, machine
from benchmarks.throughput import FlopCount
from poison_core.attacks import witches_brew as wb
from poison_core.attacks._augment import default_shift, random_shift_flip
from poison_core.perturbation import delta_of, project, quantize, to_unit
from poison_core.config import DatasetConfig, ModelConfig, TrainConfig
from poison_core.data import load_dataset
from poison_core.models import build_model
from poison_core.seeding import derive_seed
from poison_core.training import batch_slices, to_tensor, train_model

log = logging.getLogger("benchmarks.wb_speed")
EPSILON, N_POISON = 16, 60


def _baseline_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=create_graph)


def _baseline_alignment(models: Sequence[nn.Module], target_grads: Sequence[Sequence[torch.Tensor]],
                        x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    losses = []
    for model, target in zip(models, target_grads):
        poison = _baseline_grad(model, x, y, True)
        dot = sum((p * t).sum() for p, t in zip(poison, target))
        p_norm = torch.sqrt(sum(p.pow(2).sum() for p in poison))
        t_norm = torch.sqrt(sum(t.pow(2).sum() for t in target))
        losses.append(1 - dot / (p_norm * t_norm).clamp_min(1e-12))
    return torch.stack(losses).mean()


def baseline_restart(surrogates: Sequence[nn.Module], bases: np.ndarray, labels: np.ndarray, target: np.ndarray,
                     adversarial_class: int, params: wb.WitchesBrewParams, epsilon: int, seed: int,
                     data_std: Sequence[float] | None = None) -> tuple[float, np.ndarray]:
    """The crafting loop of ``witches_brew.run_restart`` before the fused crafting view (without its checkpointing):
    the surrogates as they are, a zero-filled gradient buffer and one host read of the loss per batch."""
    device = next(surrogates[0].parameters()).device
    models = [m.eval() for m in surrogates]
    gen = torch.Generator(device=device).manual_seed(seed)
    eps = to_unit(epsilon)
    x0 = to_tensor(bases, device)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    x_t = to_tensor(target, device)
    y_t = torch.full((len(target),), int(adversarial_class), dtype=torch.long, device=device)
    target_grads = [[g.detach() for g in _baseline_grad(m, x_t, y_t, False)] for m in models]
    std = data_std or params.data_std or wb.channel_std(bases)
    scale = (torch.tensor(std, dtype=x0.dtype, device=device).view(1, -1, 1, 1) if params.lr_rule == "forest"
             else torch.ones((1, 1, 1, 1), dtype=x0.dtype, device=device))
    delta = (wb.initial_delta(x0, eps, gen, params.init) / scale).requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=wb.step_size(params, epsilon, len(models)), weight_decay=0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=wb.lr_milestones(params.steps), gamma=0.1)
    shift = default_shift(bases.shape[1]) if params.max_shift is None else params.max_shift
    batches = batch_slices(len(bases), params.batch_size)
    for _ in range(params.steps):
        grad = torch.zeros_like(delta)
        total = 0.0
        for batch in batches:
            x = x0[batch] + delta[batch] * scale
            if params.augment:
                x = random_shift_flip(x, gen, max_shift=shift)
            loss = _baseline_alignment(models, target_grads, x, y[batch])
            grad[batch] = torch.autograd.grad(loss, delta)[0][batch]
            total += float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        delta.grad = grad.sign()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            delta.copy_(project(delta * scale, x0, eps) / scale)
    poisoned = quantize(bases, delta.detach() * scale, epsilon)
    x_final = x0 + delta_of(poisoned, bases).to(device)
    finals = [float(_baseline_alignment(models, target_grads, x_final[b].detach().requires_grad_(True), y[b]).detach())
              for b in batches]
    return float(np.mean(finals)), poisoned


RESTARTS: dict[str, Callable[..., tuple[float, np.ndarray]]] = {"baseline": baseline_restart, "new": wb.run_restart}


def setting() -> dict[str, Any]:
    """The surrogate, bases, labels, target and data std of the benchmark (see the module docstring)."""
    name = "fashion-mnist" if FASHION.is_dir() else "digits"
    splits = load_dataset(DatasetConfig(name=name, n_train=2000 if name == "fashion-mnist" else None,
                                        n_test=500 if name == "fashion-mnist" else None, seed=0))
    train, test = splits.train, splits.test
    seed = derive_seed(0, "surrogate", 0)
    model = build_model(ModelConfig(name="convnet", width=16), train.image_shape, train.num_classes, seed=seed)
    train_model(model, train, TrainConfig(epochs=1, batch_size=64), device="cpu", seed=seed)
    positions = np.flatnonzero(train.labels == 0)[:N_POISON]
    return {"dataset": name, "models": [model.eval()], "bases": train.images[positions],
            "labels": train.labels[positions].astype(np.int64), "target": test.images[test.labels != 0][:1],
            "adversarial_class": 0, "std": wb.channel_std(train.images),
            "x0": to_tensor(train.images[positions], "cpu")}


def craft(kind: str, s: dict[str, Any], steps: int, seed: int) -> tuple[float, np.ndarray]:
    params = wb.WitchesBrewParams(steps=steps, restarts=1)
    args = (s["models"], s["bases"], s["labels"], s["target"], s["adversarial_class"], params, EPSILON, seed)
    if kind == "baseline":
        return baseline_restart(*args, s["std"])
    return wb.run_restart(*args, None, s["std"])


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """float32 (size x size) @ (size x size) on this thread, GFLOP per CPU second (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * size**3 / max(best, 1e-9) / 1e9


def time_restarts(s: dict[str, Any], steps: int, reps: int) -> tuple[dict[str, dict[str, float]], float]:
    """Median CPU and wall seconds per restart-step of each loop, alternating which runs first, and the
    median matmul rate measured between them (GFLOP per CPU second)."""
    cpu: dict[str, list[float]] = {k: [] for k in RESTARTS}
    wall: dict[str, list[float]] = {k: [] for k in RESTARTS}
    matmul = []
    craft("new", s, 2, 0)  # warm-up of both code paths
    craft("baseline", s, 2, 0)
    for rep in range(reps):
        matmul.append(matmul_gflops())
        for kind in (list(RESTARTS) if rep % 2 == 0 else list(RESTARTS)[::-1]):
            c0, w0 = time.process_time(), time.perf_counter()
            craft(kind, s, steps, rep)
            cpu[kind].append((time.process_time() - c0) / steps)
            wall[kind].append((time.perf_counter() - w0) / steps)
    timing = {k: {"cpu_s_per_step": statistics.median(cpu[k]), "wall_s_per_step": statistics.median(wall[k])}
              for k in RESTARTS}
    return timing, round(statistics.median(matmul), 1)


def flops_per_step(kind: str, s: dict[str, Any]) -> int:
    """FLOPs of one crafting step: a 3-step restart minus a 2-step one (setup and final loss cancel)."""
    counts = []
    for steps in (2, 3):
        with FlopCount() as counter:
            craft(kind, s, steps, 0)
        counts.append(counter.flops)
    return counts[1] - counts[0]


def equivalence(s: dict[str, Any], steps: int, seeds: int) -> list[dict[str, Any]]:
    """Final alignment loss of both loops and the share of equal poisoned pixels, per seed."""
    rows = []
    for seed in range(seeds):
        (old_loss, old), (new_loss, new) = craft("baseline", s, steps, seed), craft("new", s, steps, seed)
        diff = np.abs(old.astype(np.int16) - new.astype(np.int16))
        rows.append({"seed": seed, "steps": steps, "baseline_loss": round(old_loss, 5), "new_loss": round(new_loss, 5),
                     "equal_pixels": round(float((diff == 0).mean()), 5), "max_pixel_diff": int(diff.max())})
    return rows


def other_loops(s: dict[str, Any], reps: int, reference: float) -> list[dict[str, Any]]:
    """Measured only: error-min's PGD step (per_sample_steps, 512 images, eval mode) on the surrogate and
    on its crafting view (default and input_pass), and one MetaPoison meta-gradient (K = 2 unrolled SGD
    steps on batches of 64, 10 poisons each, train mode): median CPU s per call, GFLOP, % of matmul."""
    from poison_core.attacks._craft_view import crafting_view, input_pass
    from poison_core.attacks._unroll import unrolled_adversarial_grad
    from poison_core.attacks.error_min import per_sample_steps

    model, gen = s["models"][0], torch.Generator().manual_seed(0)
    x = torch.rand(512, *s["x0"].shape[1:], generator=gen)
    y = torch.randint(0, 10, (512,), generator=gen)
    view = crafting_view(model)
    batches = [(x[64 * k:64 * k + 54], y[64 * k:64 * k + 54], torch.arange(10 * k, 10 * k + 10)) for k in range(3)]
    poisons, labels, target = s["x0"], torch.from_numpy(s["labels"]), to_tensor(s["target"], "cpu")

    def pgd(net: nn.Module, fast: bool = False) -> torch.Tensor:
        with input_pass([net] if fast else []):
            return per_sample_steps(net, x, torch.zeros_like(x), y, steps=1, step_size=0.8 / 255, radius=8 / 255)

    cases = {"error_min PGD step (512 images), surrogate": lambda: pgd(model),
             "error_min PGD step (512 images), crafting view": lambda: pgd(view),
             "error_min PGD step (512 images), crafting view, input_pass": lambda: pgd(view, True),
             "MetaPoison meta-gradient (K = 2)": lambda: unrolled_adversarial_grad(
                 model, poisons, torch.zeros_like(poisons), labels, batches[:2], target, 0, 0.1, tail=batches[2])}
    rows = []
    for name, fn in cases.items():
        fn()
        times = []
        for _ in range(reps):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        with FlopCount() as counter:
            fn()
        seconds = statistics.median(times)
        rate = counter.flops / seconds / 1e9
        rows.append({"case": name, "cpu_s": round(seconds, 4), "gflop": round(counter.flops / 1e9, 3),
                     "gflop_per_s": round(rate, 1), "pct_of_matmul": round(100 * rate / reference, 1)})
        log.info("%s", rows[-1])
    model.eval()
    return rows


def markdown(results: dict[str, Any]) -> str:
    t = results["timing"]
    lines = [f"Machine: {results['machine']}", "", f"Dataset: {results['dataset']}; "
             f"{N_POISON} poisons, eps {EPSILON}, {results['steps']} steps x {results['reps']} interleaved reps, "
             f"one thread. Matmul reference: {results['reference_gflops']} GFLOP per CPU second (float32, 1024).", "",
             "| loop | CPU s / restart-step | wall s / restart-step | GFLOP / step | GFLOP/s (CPU) | % of matmul |",
             "| --- | --- | --- | --- | --- | --- |"]
    for kind, row in t.items():
        lines.append(f"| {kind} | {row['cpu_s_per_step']:.4f} | {row['wall_s_per_step']:.4f} "
                     f"| {row['gflop_per_step']:.3f} | {row['gflop_per_s']:.1f} | {row['pct_of_matmul']:.0f} % |")
    lines += ["", f"Speed-up (baseline / new, CPU time): {results['speedup_cpu']:.2f}x; wall time: "
              f"{results['speedup_wall']:.2f}x", "",
              "| seed | steps | baseline loss | new loss | equal pixels | max pixel diff |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['seed']} | {r['steps']} | {r['baseline_loss']} | {r['new_loss']} | {r['equal_pixels']} | "
              f"{r['max_pixel_diff']} |" for r in results["equivalence"]]
    lines += ["", "Measured only (code not changed):", "",
              "| case | CPU s | GFLOP | GFLOP/s | % of matmul |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['cpu_s']} | {r['gflop']} | {r['gflop_per_s']} | {r['pct_of_matmul']} % |"
              for r in results["other_loops"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed restart")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--quality-steps", type=int, default=60, help="steps of the equivalence runs")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the equivalence runs")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    start = time.perf_counter()
    s = setting()
    timing, reference = time_restarts(s, args.steps, args.reps)
    for kind, row in timing.items():
        flops = flops_per_step(kind, s)
        rate = flops / row["cpu_s_per_step"] / 1e9
        row.update({"gflop_per_step": flops / 1e9, "gflop_per_s": rate, "pct_of_matmul": 100 * rate / reference})
        log.info("%s: %s", kind, row)
    results = {"machine": machine(), "dataset": s["dataset"], "steps": args.steps, "reps": args.reps,
               "reference_gflops": reference, "timing": timing,
               "speedup_cpu": timing["baseline"]["cpu_s_per_step"] / timing["new"]["cpu_s_per_step"],
               "speedup_wall": timing["baseline"]["wall_s_per_step"] / timing["new"]["wall_s_per_step"],
               "equivalence": equivalence(s, args.quality_steps, args.seeds),
               "other_loops": other_loops(s, args.reps, reference)}
    results["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wb_speed.json").write_text(json.dumps(results, indent=2))
    (out / "wb_speed.md").write_text(markdown(results))
    log.info("speed-up %.2fx (CPU), %.2fx (wall); wrote %s", results["speedup_cpu"], results["speedup_wall"],
             out / "wb_speed.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
