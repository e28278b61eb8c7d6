"""Standing local services: a Prefect server and a Ray head started once, reused by later runs.

``belladonna run`` on its own starts a Prefect server of its own (a subprocess that imports the
server, migrates its database and answers after several seconds) and a local Ray head
(:mod:`belladonna.lifecycle.services`), and stops both at its end: no process it starts outlives it
(:mod:`belladonna.lifecycle.reaper`). ``belladonna services start
--out OUT`` is the explicit, documented exception, as ``ray start`` is for Ray: it starts both in
sessions of their own, records them by PID and start time in ``OUT/services/services.json`` (never
found by name), and every later ``run`` / ``stage`` on OUT uses them while they answer
(:func:`use_standing`), skipping those start-ups and stops. Both are started with the same
commands as a run's own (:func:`services.prefect_server_command`, :func:`services.ray_head_command`).
``belladonna services stop --out OUT`` stops exactly the recorded processes and what they started.
Flows stay real Prefect flows, tracked by that server (its UI shows them); jobs stay real Ray tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import typer

from belladonna.lifecycle import reaper, services as svc

log = logging.getLogger(__name__)
RECORD = Path("services") / "services.json"
FORWARDED = ("BELLADONNA_", "AWS_", "MLFLOW_")
"""Ray workers inherit the Ray head's environment, not the command's: a head is used only by commands
whose variables with these prefixes are the ones it was started with (compared by digest)."""


def _env_digest(environ: dict[str, str]) -> str:
    items = sorted((k, v) for k, v in environ.items() if k.startswith(FORWARDED))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _answers(name: str, entry: dict[str, Any], timeout: float = 1.0) -> bool:
    """The recorded service is up: Prefect's API answers /health; Ray's head answers
    (:func:`services.ray_head_answers`)."""
    if name == "prefect":
        return svc.server_answers(entry["url"], timeout)
    return svc.ray_head_answers(entry["address"], entry["temp_dir"], timeout)


def _read(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _alive(entry: dict[str, Any]) -> bool:
    """The recorded process still runs (same PID and start time, not a reused PID)."""
    return reaper.start_time(entry["pid"]) == entry["start"]


def standing(out: Path) -> dict[str, bool]:
    """{service: answers} for the standing services recorded under `out` (empty when none)."""
    record = _read(out) or {}
    return {name: _alive(e) and _answers(name, e) for name, e in record.get("services", {}).items()}


def start_standing(out: Path, timeout: float = 180.0) -> dict[str, Any]:
    """Start a local Prefect server (its own PREFECT_HOME and database under OUT/services, the server
    services a local run does not use off, the UI on) and a Ray head (``ray start --head --block``),
    each in a session of its own so that they outlive this command; record them; wait until both
    answer."""
    if any(standing(out).values()):
        raise svc.ServiceError(f"services already run for {out} (belladonna services status / stop --out {out})")
    folder = (out / RECORD.parent).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    port = svc.free_port()
    ray_temp = tempfile.mkdtemp(prefix="belladonna-ray-")  # short (Ray's socket paths), and not /tmp/ray:
    # `ray start` writes its address there, and every address-less ray.init() on the machine joins it
    ray_command, ray_address = svc.ray_head_command(ray_temp)
    commands = {
        "prefect": (svc.prefect_server_command(port, ui=True, log_level="WARNING"),
                    svc.server_env(str(folder / "prefect"))),
        "ray": (ray_command, svc.ray_env()),
    }
    services: dict[str, Any] = {}
    for name, (command, env) in commands.items():
        with open(folder / f"{name}.log", "ab") as log_out:
            proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log_out,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        services[name] = {"pid": proc.pid, "start": reaper.start_time(proc.pid), "log": str(folder / f"{name}.log")}
    services["prefect"]["url"] = f"http://127.0.0.1:{port}/api"
    services["ray"].update(address=ray_address, temp_dir=ray_temp)
    record = {"services": services, "env": _env_digest(dict(os.environ))}
    tmp = folder / f".services.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, out / RECORD)
    deadline = time.monotonic() + timeout
    for name, entry in services.items():
        if not svc.answered(partial(_answers, name, entry), partial(_alive, entry), deadline - time.monotonic()):
            stop_standing(out)
            raise svc.ServiceError(f"services: {name} did not answer within {timeout:g} s (log: {entry['log']})")
    return record


def stop_standing(out: Path, timeout: float = 40.0) -> list[str]:
    """Stop the standing services recorded under `out` and what they started (SIGTERM: Ray's processes
    and uvicorn shut down), SIGKILL what of them is left after `timeout` s; returns the names stopped."""
    record = _read(out)
    if record is None:
        return []
    alive = {name: entry for name, entry in record["services"].items() if _alive(entry)}
    recorded: dict[int, int] = {}
    for entry in alive.values():
        recorded.update(reaper.tree(entry["pid"]))
    ray_head = alive.get("ray", {}).get("pid")  # SIGKILL: its SIGTERM drains the node first (svc.RAY_GRACE_S)
    reaper.stop_tree(recorded, timeout, kill=frozenset([ray_head] if ray_head else []))
    if "temp_dir" in record["services"].get("ray", {}):
        shutil.rmtree(record["services"]["ray"]["temp_dir"], ignore_errors=True)
    (out / RECORD).unlink(missing_ok=True)
    return list(alive)


def use_standing(out: Path) -> dict[str, str]:
    """Point this command at OUT's standing services that answer, unless the user named others
    (PREFECT_API_URL, RAY_ADDRESS); otherwise nothing changes. Call it before Prefect is imported
    (Prefect reads its settings then). Returns {service: address} of those it uses."""
    record = _read(out) or {"services": {}}
    used: dict[str, str] = {}
    prefect, ray = record["services"].get("prefect"), record["services"].get("ray")
    if prefect and not os.environ.get("PREFECT_API_URL") and _alive(prefect) and _answers("prefect", prefect):
        os.environ["PREFECT_API_URL"] = used["prefect"] = prefect["url"]
    if ray and not os.environ.get("RAY_ADDRESS") and _alive(ray) and _answers("ray", ray):
        if record.get("env") == _env_digest(dict(os.environ)):
            os.environ["RAY_ADDRESS"] = used["ray"] = ray["address"]
        else:
            log.warning("services: the Ray head of %s was started with other %s variables; this run starts "
                        "its own Ray instance", out, "/".join(f"{p}*" for p in FORWARDED))
    return used


app = typer.Typer(help="Standing local services (a Prefect server, a Ray head) that later runs on OUT reuse.")
OUT_HELP = "The run folder whose commands use them (the --out of `belladonna run`)."


@app.command("start")
def start(out: Path = typer.Option(Path("runs"), help=OUT_HELP)) -> None:
    """Start a local Prefect server and a Ray head; `belladonna run --out OUT` uses them until `stop`."""
    services = start_standing(out)["services"]
    url = services["prefect"]["url"]
    typer.echo(f"prefect {url} (UI {url.removesuffix('/api')}), ray {services['ray']['address']}; logs: "
               f"{(out / RECORD.parent).resolve()}; stop them with: belladonna services stop --out {out}")


@app.command("stop")
def stop(out: Path = typer.Option(Path("runs"), help=OUT_HELP)) -> None:
    """Stop OUT's standing services (the recorded processes and what they started)."""
    typer.echo(f"stopped: {', '.join(stop_standing(out)) or 'none was running'}")


@app.command("status")
def status(out: Path = typer.Option(Path("runs"), help=OUT_HELP)) -> None:
    """Which of OUT's standing services answer (exit 1 unless all do)."""
    state = standing(out)
    typer.echo(", ".join(f"{k} {'answers' if v else 'does not answer'}" for k, v in state.items())
               or f"no standing services for {out}")
    raise typer.Exit(0 if state and all(state.values()) else 1)
