"""Belladonna's benchmark runner: measures on this machine, in one run, and writes
``<out>/results.json`` and ``<out>/results.md``.

    python3 -m benchmarks.run [--quick] [--only matmul,throughput,...] [--merge] [--out benchmarks/results]

Sections:

* ``matmul``: the CPU's float32 matrix-multiply rate, the physical reference (the best one-thread
  rate over three sizes is what crafting rates are compared with);
* ``throughput``: every attack's crafting throughput and FLOP rate (:mod:`benchmarks.throughput`);
* ``growth``: crafting time against the number of poisons and the ensemble size
  (:mod:`benchmarks.growth`);
* ``ray_scaling``: Witches' Brew restarts, MetaPoison actors, DPA partitions on 1 vs 2 Ray workers
  (:mod:`benchmarks.ray_scaling`);
* ``orchestration``: the quick-start flow's wall time against its core compute
  (:mod:`benchmarks.orchestration`).

The setting is Fashion-MNIST (2,000 training images) when the Debian package is installed, else
digits. Timings are wall-clock medians where repeated; nothing here is asserted (speed targets live
in benchmarks, never in tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from poison_core.config import DatasetConfig
from poison_core.data import load_dataset

log = logging.getLogger("benchmarks")
FASHION = Path("/usr/share/datasets/fashion-mnist")


SECTIONS = ("matmul", "throughput", "growth", "ray_scaling", "orchestration")


def matmul_rate(sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 10) -> list[dict[str, Any]]:
    """GFLOP/s (median of `repeats`) of float32 (n x n) @ (n x n), on one thread and on every core:
    the reference against which crafting rates are compared."""
    rows = []
    before = torch.get_num_threads()
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        torch.set_num_threads(threads)
        for size in sizes:
            a, b = torch.randn(size, size), torch.randn(size, size)
            a @ b
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            seconds = sorted(times)[len(times) // 2]
            rows.append({"case": f"matmul_{size}", "threads": threads, "gflops": round(2 * size**3 / seconds / 1e9, 1)})
    torch.set_num_threads(before)
    return rows


def reference_gflops(rows: list[dict[str, Any]]) -> float:
    """The best one-thread matmul rate: crafts run on one thread."""
    return max(r["gflops"] for r in rows if r["threads"] == 1)


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}", "",
             f"Reference: {results['reference_gflops']} GFLOP/s (best one-thread float32 matmul)", ""]
    for section, rows in results["sections"].items():
        columns = list(dict.fromkeys(k for row in rows for k in row))
        measured = results.get("measured", {}).get(section, "?")
        lines += [f"### {section} (measured {measured})", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and epochs (a smoke run)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--merge", action="store_true",
                        help="keep the sections of an existing results.json that this run does not measure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    known = set(SECTIONS)
    sections = [s for s in args.only.split(",") if s]
    unknown = sorted(set(sections) - known)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    torch.set_num_threads(1)
    name = "fashion-mnist" if FASHION.is_dir() else "digits"
    splits = load_dataset(DatasetConfig(name=name, n_train=2000 if name == "fashion-mnist" else None,
                                        n_test=500 if name == "fashion-mnist" else None, seed=0))
    results: dict[str, Any] = {"machine": machine(), "dataset": name, "quick": args.quick, "sections": {}}
    matmul = matmul_rate()
    results["reference_gflops"] = reference_gflops(matmul)
    if "matmul" in sections:
        results["sections"]["matmul"] = matmul
    if "throughput" in sections:
        from benchmarks.throughput import throughput

        results["sections"]["throughput"] = throughput(splits, results["reference_gflops"])
    if "growth" in sections:
        from benchmarks.growth import growth

        results["sections"]["growth"] = growth(splits, quick=args.quick)
    if "ray_scaling" in sections:
        from benchmarks.ray_scaling import ray_scaling

        results["sections"]["ray_scaling"] = ray_scaling(splits, quick=args.quick)
    if "orchestration" in sections:
        from benchmarks.orchestration import orchestration

        results["sections"]["orchestration"] = orchestration()
    out = Path(args.out)
    today = results["machine"]["date"]
    results["measured"] = {section: today for section in results["sections"]}
    if args.merge and (out / "results.json").is_file():
        previous = json.loads((out / "results.json").read_text())
        kept = {k: v for k, v in previous.get("sections", {}).items() if k not in results["sections"]}
        results["measured"] = {**{k: previous.get("measured", {}).get(k, previous["machine"]["date"]) for k in kept},
                               **results["measured"]}
        results["sections"] = {**kept, **results["sections"]}
        if "matmul" in kept:  # the kept rates were compared with the kept reference
            results["reference_gflops"] = previous["reference_gflops"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    log.info("wrote %s and %s", out / "results.json", out / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
