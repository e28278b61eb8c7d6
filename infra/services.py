"""Start the flow's services side by side instead of one after another.

A fresh ``belladonna run`` needs Prefect's API (its ephemeral server when ``PREFECT_API_URL`` is
unset: a subprocess that takes several seconds to migrate its database and answer), a Ray instance
whose workers import torch and Belladonna, and the driver's own imports. Started in sequence these
cost more than the quick-start's compute; :func:`start_services` launches the Prefect server from a
background thread (the thread only waits on the subprocess's health check) and Ray with its warm-up
jobs, so the costs overlap; :meth:`Services.wait` joins before the flow starts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from infra.ray_runner import ensure_ray
from poison_core.config import ExecutionConfig

log = logging.getLogger(__name__)


class Services:
    """Handles on the services being started; `wait()` blocks until Prefect's API answers."""

    def __init__(self, prefect_thread: threading.Thread | None) -> None:
        self._thread = prefect_thread
        self.error: BaseException | None = None

    def wait(self) -> None:
        """Join the Prefect start-up. A failure is left to the flow's own start, which raises it."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            log.warning("prefect: background server start failed (%s); the flow retries it", self.error)


def start_services(execution: ExecutionConfig) -> Services:
    """Start Prefect's ephemeral server (when no API URL is configured) in the background, then Ray."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    services = Services(None)
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():

        def start() -> None:
            try:
                from prefect.server.api.server import SubprocessASGIServer  # ~2 s of imports, overlapped too

                SubprocessASGIServer().start()
            except Exception as exc:  # the flow's own client start raises it with Prefect's message
                services.error = exc

        services._thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
        services._thread.start()
    ensure_ray(execution)
    return services


@contextmanager
def warm_tracking(tracking_uri: str | None, experiment: str, run_dir: str) -> Iterator[threading.Thread]:
    """Import MLflow and matplotlib and open (on a new run folder: create and migrate) the tracking
    database in a background thread while the flow's jobs run on Ray: about 3 s that the summarize
    stage would otherwise spend after the last job. Yields the thread (join it before summarizing)
    and joins it on the way out, also when the flow fails, so the database is never left half
    created. A failure here is only logged: the summarize stage's own Tracker raises it."""

    def warm() -> None:
        try:
            import matplotlib.backends.backend_agg  # noqa: F401  (what infra.figures draws with)
            import matplotlib.figure  # noqa: F401

            from infra.tracking import Tracker

            Tracker(tracking_uri, experiment, run_dir=run_dir)
        except Exception as exc:
            log.warning("tracking warm-up failed (%s); summarize retries", exc)

    thread = threading.Thread(target=warm, name="tracking-warm-up", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join()
