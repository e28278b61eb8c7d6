"""Open the tracking store while the flow's jobs run, instead of after them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def warm_tracking(tracking_uri: str | None, experiment: str, run_dir: str) -> Iterator[threading.Thread]:
    """Import MLflow and matplotlib and open (on a new run folder: create and migrate) the tracking
    database in a background thread while the flow's jobs run on Ray: about 3 s that the summarize
    stage would otherwise spend after the last job. Yields the thread (join it before summarizing)
    and joins it on the way out, also when the flow fails, so the database is never left half
    created. A failure here is only logged: the summarize stage's own Tracker raises it."""

    def warm() -> None:
        try:
            import matplotlib.backends.backend_agg  # what infra.figures draws with
            import matplotlib.figure  # noqa: F401

            from infra.tracking import Tracker

            Tracker(tracking_uri, experiment, run_dir=run_dir)
        except Exception as exc:  # noqa: BLE001 - a warm-up only: summarize opens the store again
            log.warning("tracking warm-up failed (%s); summarize retries", exc)

    thread = threading.Thread(target=warm, name="tracking-warm-up", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join()
