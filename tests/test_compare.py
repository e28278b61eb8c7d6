"""`belladonna compare` and its statistics, on results.json files the test writes (fast tier): the tests'
numbers against scipy and published values, the verdicts (identical runs, a moved cell, a different
config, thresholds, pooled counts), the run history (latest / previous / run ids) and exit codes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from poison_core.compare import Thresholds, compare_results
from poison_core.compare_format import to_markdown
from poison_core.compare_stats import holm, t_sf2, two_proportions, welch
from poison_core.config import load_benchmark
from tasks import run_history

CONFIG = """
name: tiny
dataset: {name: digits, n_train: 300, n_test: 100}
victim:
  model: {name: mlp, width: 32}
  train: {epochs: 2, batch_size: 64}
threat: {epsilon: 255, budget: 0.05}
attacks:
  - name: badnets
  - name: label_flip
    params: {mode: pair, source_class: 1, target_class: 7}
defenses: [{name: none}, {name: trimmed_loss}]
seeds: [0, 1, 2, 3]
"""
ASR = {0: 0.90, 1: 0.92, 2: 0.88, 3: 0.91}
ACC = {0: 0.95, 1: 0.94, 2: 0.96, 3: 0.95}


def results(config_text: str = CONFIG, asr_shift: float = 0.0, run_id: str = "20250101T020000Z-aaaa0000",
            code: str = "abc") -> dict:
    """A results.json object as the flow writes it (rows, summary, provenance), values set by hand."""
    cfg = load_benchmark(config_text)
    rows = []
    for attack in ("badnets", "label_flip"):
        for defense in ("none", "trimmed_loss"):
            for seed in cfg.seeds:
                row = {"attack": attack, "defense": defense, "seed": seed, "clean_acc": ACC[seed],
                       "baseline_clean_acc": ACC[seed] + 0.01, "acc_drop": 0.01, "n_poison": 15,
                       "target_hits": 1 + seed % 2, "n_targets": 10}
                row["target_success"] = row["target_hits"] / 10
                if attack == "badnets":
                    moved = asr_shift if defense == "trimmed_loss" else 0.0
                    row["asr"] = round(ASR[seed] - 0.5 * (defense == "trimmed_loss") + moved, 6)
                    row["baseline_asr"] = 0.02
                else:
                    row["pair_flip_rate"] = 0.3 + 0.01 * seed
                rows.append(row)
    from poison_core.evaluation import summarize

    return {"rows": rows, "summary": summarize(rows), "code_version": code, "store": "/tmp/store",
            "provenance": {"config": cfg.model_dump(mode="json"), "dataset_fingerprint": "d1", "run_id": run_id,
                           "config_hash": "h"}}


def entry(comparison: dict, attack: str, defense: str, metric: str) -> dict:
    return next(e for e in comparison["entries"] if (e["attack"], e["defense"], e["metric"]) == (attack, defense,
                                                                                                metric))


def test_welch_matches_scipy_and_hand_computed_values():
    stats = pytest.importorskip("scipy.stats")
    base, new = [0.80, 0.82, 0.79], [0.70, 0.75, 0.72, 0.71]
    got, ref = welch(base, new), stats.ttest_ind(new, base, equal_var=False)
    assert got["t"] == pytest.approx(ref.statistic, rel=1e-12) and got["df"] == pytest.approx(ref.df, rel=1e-12)
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert got["ci"] == pytest.approx(tuple(ref.confidence_interval()), rel=1e-9)
    # by hand: diff -1/12, var 1/3*(0.0133/2)... t = -5.976, df = 5.000 (both sample variances give df 5)
    assert got["diff"] == pytest.approx(-1 / 12) and got["t"] == pytest.approx(-5.97614, abs=1e-5)
    assert t_sf2(12.706204736, 1) == pytest.approx(0.05, abs=1e-9)  # the textbook 97.5 % quantile, df 1
    assert t_sf2(2.570581836, 5) == pytest.approx(0.05, abs=1e-9)
    assert welch([0.5], [0.6, 0.7]) is None  # one seed: nothing to test against
    assert welch([0.5, 0.5], [0.5, 0.5])["p"] == 1.0 and welch([0.5, 0.5], [0.6, 0.6])["p"] == 0.0


def test_two_proportions_match_newcombe_1998_and_the_score_test():
    got = two_proportions(48, 80, 56, 70)  # Newcombe (1998), Table II, example (a): 56/70 - 48/80
    assert got["diff"] == pytest.approx(0.2)
    assert got["ci"] == pytest.approx((0.0524, 0.3339), abs=5e-5)  # method 10, as published
    assert got["z"] == pytest.approx(2.65017, abs=1e-5)  # pooled p = 104/150, se = 0.07547
    assert got["p"] == pytest.approx(0.0080451, abs=1e-6)
    assert two_proportions(0, 10, 0, 10)["p"] == 1.0 and two_proportions(0, 0, 1, 2) is None


def test_holm_adjusts_by_rank_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2, 0.9]) == pytest.approx([0.4, 0.9]) and holm([]) == []


def test_identical_runs_show_no_significant_change():
    comparison = compare_results(results(), results(run_id="20250102T020000Z-bbbb0000"))
    verdicts = {e["verdict"] for e in comparison["entries"]}
    assert verdicts == {"no significant change"} and not comparison["regression"]
    assert {e["metric"] for e in comparison["entries"]} >= {"asr", "clean_acc", "target_success", "pair_flip_rate"}
    assert entry(comparison, "badnets", "none", "target_success")["test"].startswith("two-proportion")
    assert entry(comparison, "badnets", "none", "asr")["test"] == "Welch t over seeds"


def test_a_moved_cell_is_worse_or_better_and_only_that_cell():
    worse = compare_results(results(), results(asr_shift=0.3))
    flagged = [e for e in worse["entries"] if e["verdict"] != "no significant change"]
    assert [(e["attack"], e["defense"], e["metric"], e["verdict"]) for e in flagged] == [
        ("badnets", "trimmed_loss", "asr", "worse")]
    e = flagged[0]
    assert e["diff"] == pytest.approx(0.3) and e["diff_ci"][0] < 0.3 < e["diff_ci"][1]
    assert e["p_holm"] <= 1 and e["p_holm"] >= e["p"] and worse["regression"]
    assert worse["family_size"] == len([x for x in worse["entries"] if x.get("p") is not None])
    better = compare_results(results(asr_shift=0.3), results())
    assert entry(better, "badnets", "trimmed_loss", "asr")["verdict"] == "better" and not better["regression"]
    # a threshold above the change: significant, but not worth flagging (MLflow's MetricThreshold)
    quiet = compare_results(results(), results(asr_shift=0.3), Thresholds(min_abs=0.5))
    assert not quiet["regression"]
    quiet = compare_results(results(), results(asr_shift=0.3), Thresholds(per_metric={"asr": (0.0, 1.0)}))
    assert not quiet["regression"]  # 0.3 is less than 100 % of the base 0.40
    assert "| badnets | trimmed_loss | attack success (backdoor) |" in to_markdown(worse)


def test_pooled_counts_flag_a_moved_targeted_success():
    new = results()
    for row in new["rows"]:
        if row["attack"] == "label_flip" and row["defense"] == "none":
            row["target_hits"], row["target_success"] = 9, 0.9
    comparison = compare_results(results(), new)
    e = entry(comparison, "label_flip", "none", "target_success")
    assert e["verdict"] == "worse" and (e["base_n"], e["new_n"]) == (40, 40)
    assert e["base"] == pytest.approx(6 / 40) and e["new"] == pytest.approx(36 / 40)


def test_different_configs_are_not_comparable_and_name_the_fields():
    other = CONFIG.replace("epochs: 2", "epochs: 3").replace("name: trimmed_loss", "name: trimmed_loss, params: "
                                                                                   "{alpha: 0.7}")
    comparison = compare_results(results(), results(other))
    assert {e["verdict"] for e in comparison["entries"]} == {"not comparable"}
    assert any("config.victim.train.epochs: 2 -> 3" in r for r in comparison["run"])
    only_defense = compare_results(results(), results(CONFIG.replace("name: trimmed_loss", "name: trimmed_loss, "
                                                                      "params: {alpha: 0.7}")))
    reasons = entry(only_defense, "badnets", "trimmed_loss", "asr")["reasons"]
    assert any(r.startswith("config.defenses[trimmed_loss].params.alpha") for r in reasons)
    assert entry(only_defense, "badnets", "none", "asr")["verdict"] == "no significant change"
    fingerprint = results()
    fingerprint["provenance"]["dataset_fingerprint"] = "d2"
    assert any("dataset fingerprint: d1 -> d2" in r for r in compare_results(results(), fingerprint)["run"])
    code = compare_results(results(), results(code="def"))
    assert code["notes"] == ["code version: abc -> def"] and not code["run"]  # code changes are what we look for


def _write(folder: Path, result: dict) -> None:
    run_history.write_run(result, folder, result["provenance"]["run_id"])


def belladonna(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "belladonna.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_history_selectors_and_the_compare_command(tmp_path):
    bench = tmp_path / "runs" / "tiny"
    _write(bench, results(run_id="20250101T020000Z-aaaa0000"))
    _write(bench, results(asr_shift=0.3, run_id="20250102T020000Z-bbbb0000"))
    _write(bench, results(asr_shift=0.3, run_id="20250103T020000Z-cccc0000"))
    assert run_history.run_ids(bench) == ["20250101T020000Z-aaaa0000", "20250102T020000Z-bbbb0000",
                                          "20250103T020000Z-cccc0000"]
    assert (bench / "latest").read_text().strip() == "20250103T020000Z-cccc0000"
    assert json.loads((bench / "results.json").read_text())["provenance"]["run_id"].startswith("20250103")
    out = tmp_path / "runs"
    assert run_history.resolve("tiny", out).parent.name.startswith("20250103")
    assert run_history.resolve("tiny/previous", out).parent.name.startswith("20250102")
    assert run_history.resolve(str(bench / "latest~2"), out).parent.name.startswith("20250101")
    assert run_history.resolve("tiny/20250101", out).parent.name.startswith("20250101")
    same = belladonna("compare", "tiny/previous", "tiny/latest", "--out", str(out))
    assert same.returncode == 0 and "no regression" in same.stdout, same.stdout + same.stderr
    worse = belladonna("compare", "tiny/latest~2", "tiny", "--out", str(out), "--markdown")
    assert worse.returncode == 1 and "| badnets | trimmed_loss | attack success (backdoor) |" in worse.stdout
    data = belladonna("compare", str(bench / "20250101T020000Z-aaaa0000"), str(bench / "results.json"), "--json")
    assert data.returncode == 1 and json.loads(data.stdout)["counts"]["worse"] == 1
    quiet = belladonna("compare", "tiny/latest~2", "tiny", "--out", str(out), "--threshold", "asr=0.5")
    assert quiet.returncode == 0, quiet.stdout
    report = belladonna("report", "tiny/previous", "--out", str(out))
    assert report.returncode == 0 and "badnets" in report.stdout, report.stderr


@pytest.mark.parametrize("args, message", [
    (["nowhere", "tiny"], "run 'nowhere' has no results.json"),
    (["garbage.json", "tiny"], "is not a Belladonna results file"),
    (["tiny/latest~7", "tiny"], "no 'latest~7' run"),
    (["tiny", "tiny", "--threshold", "speed=1"], "--threshold 'speed=1'"),
    (["tiny", "tiny", "--alpha", "2"], "--alpha"),
    (["0123456789abcdef0123456789abcdef", "tiny"], "MLflow run 0123456789abcdef0123456789abcdef"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "runs"
    _write(out / "tiny", results())
    (tmp_path / "garbage.json").write_text("{not json")
    proc = belladonna("compare", *args, "--out", str(out), cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_legacy_folder_without_history_still_reads(tmp_path):
    legacy = tmp_path / "runs" / "old"
    legacy.mkdir(parents=True)
    (legacy / "results.json").write_text(json.dumps(results()))
    assert run_history.resolve("old", tmp_path / "runs") == legacy / "results.json"
    with pytest.raises(Exception, match="no 'previous' run"):
        run_history.resolve("old/previous", tmp_path / "runs")
    assert compare_results(copy.deepcopy(results()), {"rows": [], "summary": []})["run"][0].startswith(
        "provenance.config: absent from the new run")
