"""One self-contained HTML page per run (no network needed to open it: inline CSS, SVG and base64 PNG
thumbnails): the attack x defense table with intervals and the no-poison baseline, a heatmap, the trend
of each headline metric over the benchmark's previous runs, the comparison with the previous run, a
poison gallery per attack (clean / poisoned / amplified perturbation) and the run's provenance.

Size is bounded: at most :data:`GALLERY_PER_ATTACK` poisons per attack, thumbnails of at most
:data:`THUMB` pixels a side, :data:`MAX_HISTORY` runs in the trend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from poison_core.compare import compare_results, direction
from poison_core.compare_format import HEADERS, headline, table_rows
from poison_core.io import atomic_write_bytes
from poison_core.metrics import SUMMARY_COLUMNS, format_value
from tasks import run_history

log = logging.getLogger(__name__)
GALLERY_PER_ATTACK, THUMB, MAX_HISTORY, AMPLIFY = 4, 64, 50, 4
TABLE_COLUMNS = ("clean_acc", "baseline_clean_acc", "acc_drop", "asr", "baseline_asr", "pair_flip_rate",
                 "target_success", "adv_prob", "baseline_adv_prob")
HEADLINE = ("clean_acc", "acc_drop", "asr", "pair_flip_rate", "target_success")
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #cccccc;padding:.25em .5em;font-size:.9em}th{background:#f3f3f3}td.num{text-align:right}
.worse{background:#ffdddd}.better{background:#ddffdd}.nc{color:#888888}figure{display:inline-block;margin:.3em;
text-align:center;font-size:.75em}img{image-rendering:pixelated;border:1px solid #cccccc}h2{margin-top:1.4em}
svg{background:#fafafa;border:1px solid #dddddd;margin:.3em}"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(summary: list[dict[str, Any]]) -> str:
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in summary)]
    head = "".join(f"<th>{_e(SUMMARY_COLUMNS.get(c, c))}</th>" for c in ("attack", "defense", "n_seeds", *cols))
    body = "".join("<tr>" + f"<td>{_e(r['attack'])}</td><td>{_e(r['defense'])}</td><td class=num>{r['n_seeds']}</td>"
                   + "".join(f"<td class=num>{_e(format_value(r, c))}</td>" for c in cols) + "</tr>" for r in summary)
    return f"<table id=results><tr>{head}</tr>{body}</table>"


def _colour(value: float, good_high: bool) -> str:
    """White for the defender's best, red for the worst, on a fixed 0-1 scale."""
    bad = 1 - value if good_high else value
    bad = min(1.0, max(0.0, bad))
    return f"rgb(255,{int(255 - 170 * bad)},{int(255 - 170 * bad)})"


def _heatmap(summary: list[dict[str, Any]]) -> str:
    attacks = list(dict.fromkeys(r["attack"] for r in summary))
    defenses = list(dict.fromkeys(r["defense"] for r in summary))
    by = {(r["attack"], r["defense"]): r for r in summary}
    out = []
    for metric in HEADLINE:
        if not any(metric in r for r in summary):
            continue
        rows = "".join("<tr><th>" + _e(a) + "</th>" + "".join(
            (f"<td class=num style='background:{_colour(by[(a, d)][metric], direction(metric) == 1)}'>"
             f"{by[(a, d)][metric]:.3f}</td>") if metric in by.get((a, d), {}) else "<td>-</td>" for d in defenses)
            + "</tr>" for a in attacks)
        out.append(f"<table class=heatmap><caption>{_e(SUMMARY_COLUMNS.get(metric, metric))} (attack x defense; "
                   f"red = bad for the defender)</caption><tr><th></th>"
                   + "".join(f"<th>{_e(d)}</th>" for d in defenses) + f"</tr>{rows}</table>")
    return "".join(out)


def _trend(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """One small SVG line chart per headline metric and cell over the runs (oldest left)."""
    if len(runs) < 2:
        return "<p>Fewer than two runs of this benchmark: no trend yet.</p>"
    charts = []
    for metric in HEADLINE:
        series: dict[str, list[float | None]] = {}
        for i, (_, res) in enumerate(runs):
            for r in res.get("summary") or []:
                if isinstance(r.get(metric), (int, float)):
                    series.setdefault(f"{r['attack']}/{r['defense']}", [None] * len(runs))[i] = float(r[metric])
        if not series:
            continue
        w, h, pad = 360, 140, 24

        def x(i: int, w=w, pad=pad) -> float:
            return pad + (w - 2 * pad) * i / (len(runs) - 1)

        def y(v: float, h=h, pad=pad) -> float:
            return h - pad - (h - 2 * pad) * min(1.0, max(0.0, v))
        lines = []
        for k, (label, values) in enumerate(sorted(series.items())):
            points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if v is not None)
            hue = (k * 67) % 360
            lines.append(f"<polyline fill=none stroke='hsl({hue},70%,40%)' stroke-width=1.5 points='{points}'>"
                         f"<title>{_e(label)}</title></polyline>")
        charts.append(f"<svg width={w} height={h} role=img><title>{_e(metric)}</title>"
                      f"<text x={pad} y=14 font-size=12>{_e(SUMMARY_COLUMNS.get(metric, metric))} over "
                      f"{len(runs)} runs (0-1)</text><line x1={pad} y1={h - pad} x2={w - pad} y2={h - pad} "
                      f"stroke='#999999'/>{''.join(lines)}</svg>")
    ids = ", ".join(_e(r) for r, _ in runs)
    return "".join(charts) + f"<p class=nc>Runs, oldest first: {ids}</p>"


def _comparison(results: dict[str, Any], runs: list[tuple[str, dict[str, Any]]]) -> str:
    comparison = results.get("comparison")
    own = (results.get("provenance") or {}).get("run_id")
    if comparison is None:
        earlier = [res for rid, res in runs if own is None or rid < own]
        if not earlier:
            return "<p>No earlier run of this benchmark to compare with.</p>"
        comparison = compare_results(earlier[-1], results)
    rows = "".join("<tr class='{}'>".format({"worse": "worse", "better": "better"}.get(r[-1].split(":")[0], ""))
                   + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in table_rows(comparison))
    notes = "".join(f"<li>{_e(n)}</li>" for n in [*comparison["run"], *comparison["notes"]])
    return (f"<p><b>{_e(headline(comparison))}</b> (base run {_e(comparison['base'].get('run_id'))})</p>"
            f"<ul>{notes}</ul><table id=comparison><tr>" + "".join(f"<th>{_e(h)}</th>" for h in HEADERS)
            + f"</tr>{rows}</table>")


def _png(image: np.ndarray) -> str:
    from PIL import Image

    img = Image.fromarray(image.squeeze() if image.shape[-1] == 1 else image)
    scale = max(1, THUMB // max(img.size))
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _gallery(results: dict[str, Any]) -> str:
    """Clean / poisoned / amplified |perturbation| for the first poisons of each attack's first seed."""
    from infra.storage import Store
    from poison_core.config import BenchmarkConfig
    from tasks.stages import load_splits, read_poisons

    prov = results.get("provenance") or {}
    if not prov.get("config") or not prov.get("dataset_key") or not results.get("store"):
        return "<p>No provenance in this results file: no gallery.</p>"
    cfg = BenchmarkConfig.model_validate(prov["config"])
    store = Store(results["store"])
    train = load_splits(store, prov["dataset_key"]).train
    parts = []
    for attack in cfg.attacks:
        key = (results.get("poisons") or {}).get(f"{attack.key}/seed{cfg.seeds[0]}")
        if key is None:
            continue
        ps = read_poisons(store, cfg, prov["dataset_key"], key, train)
        count = min(GALLERY_PER_ATTACK, len(ps))
        figs = []
        clean_all = train.images[train.positions(ps.ids[:count])]
        for i in range(count):
            clean, poisoned = clean_all[i], ps.images[i]
            delta = poisoned.astype(np.int16) - clean.astype(np.int16)
            amplified = np.clip(128 + AMPLIFY * delta, 0, 255).astype(np.uint8)
            caption = f"{_label(train, int(ps.orig_labels[i]))} -> {_label(train, int(ps.poison_labels[i]))}"
            figs.append("".join(f"<img src='{_png(im)}' alt='{_e(attack.key)} {kind} {i}' title='{kind}'>"
                                for kind, im in (("clean", clean), ("poisoned", poisoned), ("perturbation x4",
                                                                                            amplified)))
                        + f"<figcaption>{_e(caption)}</figcaption>")
        parts.append(f"<h3>{_e(attack.key)}: {count} of {len(ps)} poisons (clean, poisoned, perturbation x"
                     f"{AMPLIFY} around grey)</h3>" + "".join(f"<figure>{f}</figure>" for f in figs))
    return "".join(parts) or "<p>No poisons.</p>"


def _label(train, c: int) -> str:
    names = train.class_names or []
    return str(names[c]) if c < len(names) else str(c)


def _provenance(results: dict[str, Any]) -> str:
    prov = results.get("provenance") or {}
    items = {"run id": prov.get("run_id"), "code version": results.get("code_version"),
             "config hash": prov.get("config_hash"), "dataset fingerprint": prov.get("dataset_fingerprint"),
             "seeds": prov.get("seeds"), "store": results.get("store"),
             "MLflow run": (results.get("mlflow") or {}).get("run_id"),
             "Prefect flow run": (results.get("prefect") or {}).get("flow_run_id")}
    return "<table id=provenance>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items.items()) \
        + "</table>"


def render(results: dict[str, Any], runs: list[tuple[str, dict[str, Any]]]) -> str:
    """The page's HTML for `results` given the benchmark's runs (oldest first, for the trend)."""
    name = ((results.get("provenance") or {}).get("config") or {}).get("name", "benchmark")
    try:
        gallery = _gallery(results)
    except Exception as exc:  # noqa: BLE001 - a store that moved must not cost the rest of the page
        log.warning("no poison gallery: %s", exc)
        gallery = f"<p>Poison gallery unavailable: {_e(exc)}</p>"
    summary = results.get("summary") or []
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>" + _e(name) + " report</title>"
            f"<style>{CSS}</style></head><body><h1>{_e(name)}</h1>"
            "<h2>Results</h2><p>Mean over seeds [95 % interval] (n); baseline = the no-poison victim.</p>"
            + _table(summary) + "<h2>Heatmap</h2>" + _heatmap(summary)
            + "<h2>Trend</h2>" + _trend(runs) + "<h2>Compared with the previous run</h2>" + _comparison(results, runs)
            + "<h2>Poisons</h2>" + gallery + "<h2>Provenance</h2>" + _provenance(results) + "</body></html>")


def write_report_for(results_path: Path, out: Path, history: int = 10) -> Path:
    """Write the page for the results.json at `results_path` to `out` (atomically); returns `out`."""
    results = json.loads(Path(results_path).read_text())
    run_dir = Path(results_path).parent
    bench = run_dir.parent if (run_dir.parent / run_history.LATEST).is_file() else run_dir
    runs = run_history.history(bench, limit=min(history, MAX_HISTORY))
    own = (results.get("provenance") or {}).get("run_id")
    runs = [(r, res) for r, res in runs if own is None or r <= own]
    atomic_write_bytes(str(out), render(results, runs).encode())
    return out
