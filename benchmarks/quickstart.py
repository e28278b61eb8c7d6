"""The quick-start's wall time from the shell, before and after a change.

    python3 -m benchmarks.quickstart --variant before,code=/tmp/before --variant after \
        --variant after-services,services [--reps 3] [--nice 10]

Each repetition runs the real command in a new process, on a new run folder, timed by
``/usr/bin/time`` (its ``%e``, what a user sees from the shell) and by this script's own clock:

* ``fresh``: ``belladonna run --out OUT`` on an empty OUT (the command starts its own Prefect server
  and a local Ray instance; every stage computed);
* ``rerun``: the same command again on the same OUT: every stage output reused;
* with ``services``, the same two against the standing services of ``belladonna services start
  --out OUT`` (started once per repetition, its own time reported as ``services_start``, and
  stopped after).

``code=PATH`` runs another checkout of the code (e.g. ``git archive HEAD | tar -x -C /tmp/before``) by
putting PATH first on ``PYTHONPATH``: that is how the "before" rows were measured. The printed time
is parsed from the command's output (the old code printed only the flow's part, the new one prints
``wall time ...`` last). Rows are medians over the repetitions, which are interleaved across the variants;
the load average (1 min) before and after each command is kept, since the machine may be shared.
Results are merged into ``benchmarks/results/quickstart.json`` under each label and rendered to
``quickstart.md``.
Nothing is asserted: targets are benchmarks, not tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.quickstart")
RESULTS = Path(__file__).parent / "results"
QUIET = {"RAY_AUTH_MODE": "disabled", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
PRINTED = (re.compile(r"wall time (\d+\.\d+)s \(([^)]*)\)"), re.compile(r"; (\d+\.\d+)s; store "))


def command() -> list[str]:
    """``python3 -m belladonna.cli``: what the ``belladonna`` console script runs, for either checkout."""
    return [sys.executable, "-m", "belladonna.cli"]


def timed(args: list[str], env: dict[str, str], nice: int, cwd: str | None) -> dict[str, Any]:
    """Run `args` under /usr/bin/time; its wall seconds, ours, the printed time, the load average."""
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.monotonic()
        proc = subprocess.run(["nice", "-n", str(nice), "/usr/bin/time", "-o", report.name, "-f", "%e %U %S", *args],
                              env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
        ours = time.monotonic() - start
        fields = report.read().split()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    row: dict[str, Any] = {"time_wall_s": float(fields[-3]), "cpu_s": round(float(fields[-2]) + float(fields[-1]), 2),
                           "our_wall_s": round(ours, 2), "load_before": round(load, 2),
                           "load_after": round(os.getloadavg()[0], 2)}
    whole, flow_only = PRINTED[0].search(proc.stdout), PRINTED[1].search(proc.stdout)
    if whole:
        row["printed_s"] = float(whole.group(1))
        row["phases"] = {p.rsplit(" ", 1)[0]: float(p.rsplit(" ", 1)[1][:-1]) for p in whole.group(2).split(", ")}
    elif flow_only:
        row["printed_s"] = float(flow_only.group(1))
    return row


def repetition(args: list[str], env: dict[str, str], nice: int, cwd: str | None, services: bool) -> dict[str, Any]:
    """One fresh run and one rerun on a new OUT (with `services`: around them, start and stop OUT's
    standing services)."""
    with tempfile.TemporaryDirectory(prefix="qs-") as tmp:
        out = str(Path(tmp) / "runs")
        rows: dict[str, Any] = {}
        if services:
            rows["services_start"] = timed([*args, "services", "start", "--out", out], env, nice, cwd)
        try:
            rows["fresh"] = timed([*args, "run", "--out", out], env, nice, cwd)
            rows["rerun"] = timed([*args, "run", "--out", out], env, nice, cwd)
        finally:
            if services:
                subprocess.run([*args, "services", "stop", "--out", out], env=env, cwd=cwd, capture_output=True,
                               timeout=120)
        return rows


def median_rows(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per case: the median of every number over the repetitions, and each repetition's wall time."""
    out: dict[str, Any] = {}
    for case in reps[0]:
        runs = [r[case] for r in reps]
        row = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]
               if isinstance(runs[0][k], (int, float)) and all(k in r for r in runs)}
        if "phases" in runs[0]:
            row["phases"] = {p: round(statistics.median(r["phases"][p] for r in runs), 2) for p in runs[0]["phases"]}
        row["time_wall_each_s"] = [r["time_wall_s"] for r in runs]
        out[case] = row
    return out


def render(results: dict[str, Any]) -> str:
    lines = ["# Quick-start wall time (`belladonna run`, digits, 2 attacks x 2 seeds)", "",
             "Medians over the repetitions; `time_wall_s` is `/usr/bin/time`'s elapsed time of the command from "
             "the shell, `printed_s` what the command printed (before: the flow's part only; after: the whole "
             "command), `load` the 1-minute load average around the runs (the machine is shared). "
             "Written by `python3 -m benchmarks.quickstart`.", ""]
    for label, entry in results.items():
        lines += [f"## {label}", "", f"{entry['when']}; {entry['machine']}; command `{entry['command']}`; "
                  f"{entry['reps']} repetition(s)", "",
                  "| case | time_wall_s | each | printed_s | cpu_s | load | phases |", "|---|---|---|---|---|---|---|"]
        for case, row in entry["cases"].items():
            phases = ", ".join(f"{k} {v}" for k, v in row.get("phases", {}).items())
            lines.append(f"| {case} | {row['time_wall_s']} | {row['time_wall_each_s']} | {row.get('printed_s', '')} | "
                         f"{row.get('cpu_s', '')} | {row['load_before']}-{row['load_after']} | {phases} |")
        lines.append("")
    return "\n".join(lines)


def parse_variant(text: str) -> dict[str, Any]:
    """``LABEL[,services][,code=PATH]`` -> {label, services, code}."""
    label, *options = text.split(",")
    codes = [o.split("=", 1)[1] for o in options if o.startswith("code=")]
    if not label or any(o != "services" and not o.startswith("code=") for o in options):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL[,services][,code=PATH]")
    return {"label": label, "services": "services" in options, "code": codes[0] if codes else None}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="LABEL[,services][,code=PATH], repeatable: the variants' repetitions are interleaved "
                             "(before, after, before, after, ...) so that they meet the same load")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args()
    args = command()
    reps: dict[str, list[dict[str, Any]]] = {v["label"]: [] for v in opts.variant}
    for i in range(opts.reps):
        for variant in opts.variant:
            env = {**os.environ, **QUIET}
            if variant["code"]:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(variant["code"]).resolve()),
                                                                  env.get("PYTHONPATH")]))
            reps[variant["label"]].append(repetition(args, env, opts.nice, variant["code"], variant["services"]))
            log.info("%s repetition %d: %s", variant["label"], i + 1, json.dumps(reps[variant["label"]][-1]))
    path = opts.out / "quickstart.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for variant in opts.variant:
        results[variant["label"]] = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": opts.reps,
            "machine": f"{platform.platform()}, {len(os.sched_getaffinity(0))} cores",
            "command": "python3 -m belladonna.cli" + (f" (code: {variant['code']})" if variant["code"] else ""),
            "services": variant["services"], "cases": median_rows(reps[variant["label"]]),
            "runs": reps[variant["label"]]}
    opts.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (opts.out / "quickstart.md").write_text(render(results))
    log.info("\n%s", render({v["label"]: results[v["label"]] for v in opts.variant}))


if __name__ == "__main__":
    main()
