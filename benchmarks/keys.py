"""What the key contract costs and what it recomputes (writes ``benchmarks/results/keys.{json,md}``).

    python3 -m benchmarks.keys [--out benchmarks/results] [--files 10000]

* fingerprint time (median of 5, warm page cache) of digits, Fashion-MNIST (60k + 10k, when the Debian
  package is installed) and an imagefolder of `--files` 28x28 PNGs written for the measurement;
* the code fingerprint of the stage runner, first computed in a fresh process (what each Ray worker pays once);
* the reuse decision of a cached quick-start ingest (fingerprint, key, record read, both splits read back);
* granularity: every output key of ``configs/fashion-mnist.yaml`` computed in a fresh process from a copy
  of the source tree, before and after a one-line change to one attack (``badnets.py``) and to shared
  machinery (``training.py``); the number of keys that change per stage is what a rerun recomputes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

log = logging.getLogger("benchmarks.keys")
ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")

ALL_KEYS = r'''
import json, sys
from poison_core.config import load_benchmark
from tasks import keys
cfg = load_benchmark(sys.argv[1])
prefix = keys.dataset_prefix(cfg.dataset)
out = {"ingest": [prefix], "pretrain": [], "craft": [], "retrain": [], "evaluate": []}
for seed in cfg.seeds:
    out["pretrain"] += [keys.surrogate_key(cfg, prefix, seed, i) for i in range(cfg.n_surrogates)]
    for d in cfg.defenses:
        clean = keys.model_key(cfg, prefix, d, seed, None)
        out["retrain"].append(clean)
        for a in cfg.attacks:
            p = keys.poison_key(cfg, prefix, a, seed)
            m = keys.model_key(cfg, prefix, d, seed, p)
            out["craft"].append(p); out["retrain"].append(m)
            out["evaluate"].append(keys.cell_stage(cfg, a.key, d.key, seed, p, m, clean).key)
print(json.dumps({k: sorted(set(v)) for k, v in out.items()}))
'''


def _median_seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fingerprint_times(n_files: int) -> list[dict[str, Any]]:
    from poison_core.config import DatasetConfig
    from poison_core.data.fingerprint import dataset_fingerprint

    rows = []
    cases = [("digits", DatasetConfig(name="digits"), "1 file, 57 KB")]
    if FASHION.is_dir():
        size = sum(p.stat().st_size for p in FASHION.iterdir()) / 1e6
        cases.append(("fashion-mnist", DatasetConfig(name="fashion-mnist"), f"4 IDX files, {size:.1f} MB"))
    with tempfile.TemporaryDirectory(prefix="bd-keys-") as tmp:
        folder = Path(tmp) / "images"
        rng = np.random.default_rng(0)
        for i in range(n_files):
            cls = folder / f"class{i % 10}"
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(cls / f"{i:05d}.png")
        total = sum(p.stat().st_size for p in folder.rglob("*.png")) / 1e6
        cases.append(("imagefolder", DatasetConfig(name="imagefolder", path=str(folder)),
                      f"{n_files} PNG files, {total:.1f} MB"))
        for name, cfg, what in cases:
            dataset_fingerprint(cfg)  # warm the page cache: a rerun reads files the first run read
            rows.append({"dataset": name, "what": what, "seconds": round(_median_seconds(
                lambda cfg=cfg: dataset_fingerprint(cfg)), 4)})
    return rows


def code_fingerprint_seconds() -> float:
    """Seconds to import the stage runner's closure fingerprint in a fresh process (minus the imports)."""
    script = ("import time; import tasks.stages; from tasks import keys; s = time.perf_counter(); keys.stage_code(); "
              "keys.attack_code('badnets'); print(time.perf_counter() - s)")
    runs = [float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                 cwd=ROOT).stdout) for _ in range(3)]
    return round(statistics.median(runs), 4)


def quickstart_ingest_reuse() -> dict[str, float]:
    """Seconds the cached quick-start's ingest takes to decide 'reused' (after a first ingest)."""
    from infra.storage import Store
    from poison_core import presets
    from poison_core.config import load_benchmark
    from tasks import keys, stages

    cfg = load_benchmark(presets.resolve("quickstart"))
    with tempfile.TemporaryDirectory(prefix="bd-keys-store-") as tmp:
        store = Store(tmp)
        stages.ingest(store, cfg.dataset, cfg.name)
        key_seconds = _median_seconds(lambda: keys.dataset_stage(cfg.dataset, cfg.name))
        reuse_seconds = _median_seconds(lambda: stages.ingest(store, cfg.dataset, cfg.name))
    return {"dataset_key_seconds": round(key_seconds, 4), "ingest_reuse_seconds": round(reuse_seconds, 4)}


def _keys_of(tree: Path, config: Path) -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", ALL_KEYS, str(config)], capture_output=True, text=True,
                          check=True, cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
    return json.loads(proc.stdout)


def granularity(config: str = "configs/fashion-mnist.yaml") -> list[dict[str, Any]]:
    """Per edit, how many of the config's output keys change, per stage."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bd-keys-tree-") as tmp:
        tree = Path(tmp)
        for package in ("poison_core", "tasks", "infra"):
            shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
        before = _keys_of(tree, ROOT / config)
        for edit in ("poison_core/attacks/badnets.py", "poison_core/training.py"):
            path = tree / edit
            original = path.read_text()
            path.write_text(original + "\n_BENCHMARK_EDIT = 1\n")  # one line that is code, not a comment
            after = _keys_of(tree, ROOT / config)
            path.write_text(original)
            changed = {stage: sum(k not in set(before[stage]) for k in keys) for stage, keys in after.items()}
            rows.append({"edit": edit, "changed": changed, "total": {s: len(k) for s, k in after.items()}})
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Keys: fingerprint cost and what a code change recomputes", "",
             f"Command: `python3 -m benchmarks.keys --files {result['files']}` ({result['when']}, "
             f"{result['machine']}).", "",
             "| dataset | source | fingerprint (s, median of 5) |", "|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['what']} | {r['seconds']:.4f} |" for r in result["fingerprints"]]
    q = result["quickstart"]
    lines += ["", f"Code fingerprint of the stage runner and one attack, first call in a fresh process: "
              f"{result['code_fingerprint_seconds']:.3f} s (once per process, Ray workers included).", "",
              f"Cached quick-start ingest: dataset key {q['dataset_key_seconds'] * 1000:.1f} ms; the whole reuse "
              f"decision (key, record, both splits read back and checksummed) {q['ingest_reuse_seconds'] * 1000:.1f} ms.",
              "", "Output keys of `configs/fashion-mnist.yaml` that change (= recomputed) after a one-line edit:", "",
              "| edit | ingest | pretrain | craft | retrain | evaluate |", "|---|---|---|---|---|---|"]
    for row in result["granularity"]:
        c, t = row["changed"], row["total"]
        lines.append(f"| `{row['edit']}` | " + " | ".join(f"{c[s]} of {t[s]}" for s in
                                                          ("ingest", "pretrain", "craft", "retrain", "evaluate")) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import platform

    result = {"files": args.files, "when": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or 'cpu'}, "
              f"{__import__('os').cpu_count()} cores",
              "fingerprints": fingerprint_times(args.files), "code_fingerprint_seconds": code_fingerprint_seconds(),
              "quickstart": quickstart_ingest_reuse(), "granularity": granularity()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "keys.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "keys.md").write_text(markdown(result))
    log.info("%s", markdown(result))


if __name__ == "__main__":
    main()
