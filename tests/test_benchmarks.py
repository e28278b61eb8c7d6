"""The benchmark runner's pieces: FLOP counting, the growth exponent, the per-attack cases, the
runner's outputs and its section check, and the tracking warm-up the flow starts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks import run as runner
from benchmarks.growth import exponent
from benchmarks.throughput import CASES, NOT_CRAFTED, FlopCount, steps_of, throughput
from poison_core.attacks import ATTACKS
from poison_core.config import DatasetConfig
from poison_core.data import load_dataset


def test_flop_count_matches_the_formulas_forward_and_backward():
    layer = nn.Linear(10, 5, bias=False)
    x = torch.randn(4, 10, requires_grad=True)
    with FlopCount() as forward:
        out = layer(x)
    assert forward.flops == 2 * 4 * 10 * 5
    with FlopCount() as backward:
        out.sum().backward()
    assert backward.flops == 2 * (2 * 4 * 10 * 5)  # grad wrt input and wrt weight
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    with FlopCount() as counted:
        conv(torch.randn(2, 3, 6, 6))
    assert counted.flops == 2 * 2 * 8 * 6 * 6 * 3 * 3 * 3


def test_growth_exponent_recovers_the_power():
    xs = [0.5, 1, 2, 4]
    assert exponent(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert exponent(xs, [2 * x**0.5 for x in xs]) == pytest.approx(0.5)
    assert exponent(xs, [x**2 for x in xs]) == pytest.approx(2.0)


def test_every_registered_attack_has_a_throughput_case():
    assert set(CASES) == set(ATTACKS.names()) - NOT_CRAFTED
    assert steps_of({"steps": 100, "restarts": 2}, "witches_brew") == 200
    assert steps_of({}, "label_flip") is None


def test_throughput_rows_on_digits():
    splits = load_dataset(DatasetConfig(name="digits", seed=0))
    rows = throughput(splits, matmul_gflops=50.0, only=["label_flip", "error_max"])
    by_attack = {r["attack"]: r for r in rows}
    assert by_attack["label_flip"]["gflop"] == "" and by_attack["label_flip"]["poisons"] > 0
    error_max = by_attack["error_max"]
    assert error_max["gflop"] > 0 and error_max["poisons_per_s"] > 0
    # Both are rounded to 0.1: compare within that rounding, not a relative bound (small rates on a busy machine).
    assert error_max["pct_of_matmul"] == pytest.approx(100 * error_max["gflop_per_s"] / 50.0, abs=0.2)


@pytest.mark.slow
def test_runner_writes_json_and_markdown(tmp_path):
    assert runner.main(["--only", "matmul", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["sections"]["matmul"]
    assert {r["threads"] for r in rows} >= {1} and all(r["gflops"] > 0 for r in rows)
    assert results["reference_gflops"] == max(r["gflops"] for r in rows if r["threads"] == 1)
    markdown = (tmp_path / "results.md").read_text()
    assert "### matmul" in markdown and "Reference:" in markdown
    previous = results["measured"]["matmul"]
    results["sections"]["growth"] = [{"series": "kept", "seconds": 1.0}]
    results["measured"]["growth"] = "earlier"
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert runner.main(["--only", "matmul", "--merge", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "results.json").read_text())
    assert merged["sections"]["growth"] == [{"series": "kept", "seconds": 1.0}]
    assert merged["measured"]["growth"] == "earlier" and merged["measured"]["matmul"] >= previous
    assert "### growth (measured earlier)" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--only", "matmul,nosuch", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and not (tmp_path / "bad").exists()


def test_tracking_warm_up_creates_the_experiment(tmp_path):
    from infra.warm_up import warm_tracking
    from infra.tracking import Tracker

    with warm_tracking(None, "warmed", str(tmp_path)) as thread:
        pass
    assert not thread.is_alive()
    assert (tmp_path / "mlflow.db").is_file()
    tracker = Tracker(None, "warmed", run_dir=tmp_path)
    assert tracker.client.get_experiment_by_name("warmed").experiment_id == tracker.experiment_id


def test_seed_table_pools_seeds_across_runs_and_refuses_a_seed_twice(tmp_path):
    from benchmarks.seed_table import cells, markdown

    def run(seed, acc):
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"rows": [{"attack": "error_min", "defense": "none", "seed": seed,
                                              "clean_acc": acc, "baseline_clean_acc": 0.8}]}))
        return path

    table = markdown(cells([run(0, 0.3), run(1, 0.5)]), "clean_acc")
    assert "| error_min | none | 0, 1 | 0.300, 0.500 | 0.400 +- 0.141 | 0.800 +- 0.000 |" in table
    with pytest.raises(ValueError, match="seed 0 of error_min/none"):
        cells([run(0, 0.3), tmp_path / "s0.json"])
