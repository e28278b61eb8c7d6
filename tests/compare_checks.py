"""Checks of the run history, `belladonna compare`, the regression gate and the report page on a real
run folder (called from the slow CLI test, which has just run a small grid: no second server or grid).

`run_again` reruns the same grid with ``compare: {to: previous}`` (every stage is reused, so the two
runs are identical), then: the gate recorded a comparison with the first run; `compare` says no
significant change (exit 0); a copy of the run whose one cell's effect was moved is ``worse`` (exit 1);
a run of another config is ``not comparable`` naming the field; the report page opens in Chromium with
every image loaded, no errors and every cell of the table.
"""

from __future__ import annotations

import logging

import json
import sqlite3
from pathlib import Path
from typing import Callable

from tests.browser import open_page


def run_again(belladonna: Callable, config_text: str, out: Path, name: str, tmp: Path) -> None:
    gated = tmp / "gated.yaml"
    gated.write_text(config_text + "compare: {to: previous}\n")
    proc = belladonna("run", str(gated), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    bench = out / name
    runs = sorted(p.name for p in bench.iterdir() if p.is_dir() and (p / "results.json").is_file())
    assert len(runs) == 2 and (bench / "latest").read_text().strip() == runs[1]
    second = json.loads((bench / runs[1] / "results.json").read_text())
    comparison = second["comparison"]
    assert comparison["base"]["run_id"] == runs[0] and not comparison["regression"]
    assert {e["verdict"] for e in comparison["entries"]} == {"no significant change"}
    with sqlite3.connect(out / "mlflow.db") as db:
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", (second["mlflow"]["run_id"],)))
    assert tags["regression"] == "false" and "Compared with the previous run" in tags["mlflow.note.content"]
    assert (bench / runs[1] / "report.html").is_file()

    same = belladonna("compare", f"{name}/previous", f"{name}/latest", "--out", str(out))
    assert same.returncode == 0 and "no regression" in same.stdout, same.stdout + same.stderr
    via_mlflow = belladonna("compare", f"runs:/{second['mlflow']['run_id']}", str(bench), "--out", str(out))
    assert via_mlflow.returncode == 0, via_mlflow.stdout + via_mlflow.stderr

    moved = dict(second, rows=[dict(r) for r in second["rows"]])
    asr = [r["asr"] for r in moved["rows"] if r["attack"] == "badnets" and "asr" in r]
    step = 0.4 if max(asr) <= 0.6 else -0.4
    shift = {}
    for row in moved["rows"]:  # the backdoor's success moves by 0.4 in every seed (the spread is kept)
        if row["attack"] == "badnets" and "asr" in row:
            shift[row["seed"]] = step
            row["asr"] += step
    (tmp / "moved.json").write_text(json.dumps(moved))
    flagged = belladonna("compare", str(bench / runs[0]), str(tmp / "moved.json"), "--json")
    assert flagged.returncode in (0, 1), flagged.stderr
    entry = next(e for e in json.loads(flagged.stdout)["entries"] if (e["attack"], e["metric"]) == ("badnets", "asr"))
    expected = sum(shift.values()) / len(shift)
    assert abs(entry["diff"] - expected) < 1e-9 and entry["test"] == "Welch t over seeds", entry
    unchanged = [e for e in json.loads(flagged.stdout)["entries"] if e.get("p") is not None and e is not entry]
    assert all(entry["p"] < e["p"] for e in unchanged if e["diff"] == 0), entry
    # two seeds a side: Welch has 1-2 degrees of freedom, so a 0.4 move is flagged only when the seeds agree
    # closely; the verdict follows the Holm-adjusted p either way
    assert entry["verdict"] == (("worse" if expected > 0 else "better") if entry["p_holm"] < 0.05
                                else "no significant change"), entry
    logging.getLogger(__name__).info("moved cell on the real run: diff %+.3f CI %s, p %.3g, Holm %.3g: %s",
                                     entry["diff"], entry["diff_ci"], entry["p"], entry["p_holm"], entry["verdict"])

    other = dict(second, provenance=dict(second["provenance"]))
    other["provenance"]["config"] = dict(other["provenance"]["config"], seeds=[5])
    (tmp / "other.json").write_text(json.dumps(other))
    differs = belladonna("compare", str(bench / runs[0]), str(tmp / "other.json"), "--markdown")
    assert differs.returncode == 0 and "not comparable: config.seeds" in differs.stdout, differs.stdout

    page = tmp / "page.html"
    report = belladonna("report", name, "--out", str(out), "--html", str(page))
    assert report.returncode == 0 and page.is_file(), report.stderr
    assert page.stat().st_size < 2 * 2**20  # thumbnails: bounded
    opened = open_page(page, tmp, screenshot=tmp / "report-page.png")
    logging.getLogger(__name__).info("report page screenshot: %s", tmp / "report-page.png")
    assert opened["images"] >= 3 and opened["broken"] == [] and opened["errors"] == [], opened
    assert not [c for c in opened["console"] if "error" in c.lower()], opened["console"]
    dom = opened["dom"]
    for row in second["summary"]:
        assert f"<td>{row['attack']}</td><td>{row['defense']}</td>" in dom
    assert "http://" not in page.read_text() and "https://" not in page.read_text()  # nothing from a network
