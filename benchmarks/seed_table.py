"""One markdown table over seeds from finished runs: for every (attack, defense) cell, a metric per seed,
its mean +- sample std, and the same metric of the no-poison victim of that defense (the `baseline_`
column every results row carries). Used for the re-measured grids of benchmarks/results/recipes.md,
where each seed ran as its own `belladonna run` so that two seeds use the two cores:

    python3 -m benchmarks.seed_table runs-s*/NAME-s*/results.json --metric clean_acc

Rows of one (attack, defense) from different files are pooled by their `seed`; a seed met twice is
refused (two runs of one seed would weigh it double).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def cells(paths: list[Path]) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """(attack, defense) -> seed -> results row, over every file's `rows`."""
    table: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            by_seed = table.setdefault((row["attack"], row["defense"]), {})
            if row["seed"] in by_seed:
                raise ValueError(f"{path}: seed {row['seed']} of {row['attack']}/{row['defense']} is already in another file")
            by_seed[row["seed"]] = row
    return table


def _spread(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} +- {std:.3f}"


def markdown(table: dict[tuple[str, str], dict[int, dict[str, Any]]], metric: str) -> str:
    """The table: attack, defense, seeds, per seed, mean +- std, no-poison victim (mean +- std)."""
    lines = [f"| attack | defense | seeds | {metric} per seed | mean +- std | no-poison victim |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (attack, defense), by_seed in sorted(table.items()):
        seeds = sorted(by_seed)
        values = [float(by_seed[s][metric]) for s in seeds]
        baseline = [by_seed[s].get(f"baseline_{metric}") for s in seeds]
        base = _spread([float(b) for b in baseline]) if None not in baseline else "-"
        lines.append(f"| {attack} | {defense} | {', '.join(map(str, seeds))} | "
                     f"{', '.join(f'{v:.3f}' for v in values)} | {_spread(values)} | {base} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of finished runs")
    parser.add_argument("--metric", default="clean_acc", help="a numeric field of the results rows")
    args = parser.parse_args(argv)
    sys.stdout.write(markdown(cells(args.results), args.metric))


if __name__ == "__main__":
    main()
