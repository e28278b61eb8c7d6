"""The process lifecycle of a long command (``run``, ``stage``) and of the standing services.

One interface, used by :mod:`belladonna.cli`:

* :func:`supervise` — a log file for every record, Ctrl-C / SIGTERM / SIGHUP stop the command within
  seconds (exit 130, "rerun to resume"), a watcher stops what it started if it dies (:mod:`.session`,
  :mod:`.reaper`);
* :func:`start_services` — a Prefect server and a Ray head of the command's own, started side by
  side and stopped at interpreter exit (:mod:`.services`; server starts on one PREFECT_HOME take turns,
  :mod:`.start_lock`); :func:`use_standing` — OUT's standing
  services instead, while they answer (:mod:`.standing`, ``belladonna services start|status|stop``);
* :func:`at_stop` — clean-ups that run when a signal stops the command (the store's orphaned temporary
  files);
* :func:`off_main_thread` — the flow in a worker thread, so that signals reach the command's handler;
* :func:`begin` (first thing: a :class:`Timeline`) and :func:`finish` — the wall time, printed last
  at interpreter exit.

Only the tools' public interfaces are used: Prefect's and Ray's CLIs (``prefect server start``,
``ray start --head``), ``prefect.settings.temporary_settings``, ``ray.init``'s documented arguments,
Ray's and MLflow's documented environment variables, and the interpreter's ordinary exit
(:mod:`atexit`). docs/operations.md lists them.
"""

from __future__ import annotations

from belladonna.lifecycle.services import ServiceError, Services, start_services
from belladonna.lifecycle.session import Timeline, at_stop, begin, finish, log_file, off_main_thread, supervise
from belladonna.lifecycle.standing import use_standing

__all__ = ["ServiceError", "Services", "Timeline", "at_stop", "begin", "finish", "log_file", "off_main_thread", "start_services",
           "supervise", "use_standing"]
