"""The one check a benchmark passes before anything starts: its config, its dataset and its paths.

The CLI runs it before it starts Prefect or Ray; the benchmark flow runs it again as its first step,
so a deployment run with a bad parameter fails in seconds, with one line, before it starts Ray, opens
MLflow or writes to the store. Everything here only reads: nothing is created or written.
"""

from __future__ import annotations

from pathlib import Path

from infra.local_checks import check_prefect_home, check_tracking_db
from infra.storage import Store, check_local_folder
from poison_core.config import BenchmarkConfig
from poison_core.data import DatasetSplits, load_dataset
from poison_core.members import check_names
from poison_core.preflight import check_benchmark


def preflight(cfg: BenchmarkConfig, store: Store | None = None, run_dir: str | Path | None = None,
              tracking_uri: str | None = None) -> DatasetSplits:
    """Raise one InputError line unless `cfg` can run on its dataset into `store` and `run_dir` (and its
    MLflow database: `tracking_uri`, else MLFLOW_TRACKING_URI, else the run folder's); returns the
    dataset's splits (read once here, so a missing or corrupt file is reported now). Member names and
    parameters are checked first (poison_core.members), before any path or file is looked at."""
    check_names(cfg)
    if run_dir is not None:
        check_local_folder(run_dir, "--out")
        check_tracking_db(run_dir, tracking_uri)
        check_prefect_home()
    if store is not None:
        store.check_writable()
    splits = load_dataset(cfg.dataset)
    check_benchmark(cfg, splits)
    return splits
