"""What a user sees in the MLflow UI after a benchmark, checked in a real headless browser.

Starts ``mlflow server`` on the run folder's store (127.0.0.1, a free port), opens in headless
Chromium (Debian's ``chromium``, driven over the DevTools protocol) the experiment, its runs list with
the metric columns docs/compare.md says to pick, the parent run, its figures, and a cell run
(overview, metric charts, figures), takes a screenshot of each, and checks that every figure image on
the figure pages actually loaded (``naturalWidth > 0``). Writes the screenshots and ``report.json`` to
``--out``; exits 1 if a figure did not load.

    belladonna run configs/... --out runs
    python -m benchmarks.mlflow_ui --run-dir runs --experiment quickstart --out runs/ui
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.mlflow_ui")
IMAGES_JS = ("JSON.stringify([...document.images].map(i => ({src: i.currentSrc || i.src, "
             "loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth})))")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], log_path: Path) -> subprocess.Popen:
    """A child in its own process group (stopped with :func:`stop`, by its PID)."""
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"),
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f}s")


class Page:
    """One Chromium tab over the DevTools protocol (websockets' sync client)."""

    def __init__(self, debug_port: int) -> None:
        from websockets.sync.client import connect

        with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list") as resp:
            target = next(t for t in json.load(resp) if t["type"] == "page")
        self.ws = connect(target["webSocketDebuggerUrl"], max_size=2 ** 26)
        self.ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def visit(self, url: str, screenshot: Path, until: str = "true", settle: float = 4.0,
              timeout: float = 45.0, then: str = "") -> dict[str, Any]:
        """Open `url`, wait until the JS condition `until` holds, run the JS `then` (e.g. type into a
        search box), wait `settle` seconds for the page to finish drawing, save a screenshot; returns
        the page's text head and its images."""
        self.call("Page.navigate", url="about:blank")  # a fresh page: no image of the last one stays
        time.sleep(0.5)
        self.call("Page.navigate", url=url)
        deadline, met = time.monotonic() + timeout, False
        while time.monotonic() < deadline:
            time.sleep(1.0)
            if self.evaluate(f"Boolean({until})"):
                met = True
                break
        if then:
            self.evaluate(then)
        time.sleep(settle)
        shot = self.call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        text = self.evaluate("document.body ? document.body.innerText : ''") or ""
        return {"url": url, "screenshot": str(screenshot), "condition_met": met, "text": text[:1500],
                "images": json.loads(self.evaluate(IMAGES_JS) or "[]")}


def click(page: Page, text: str) -> bool:
    """A real mouse click (DevTools input events, which React's handlers see) on the smallest visible
    element whose text is exactly `text`; False if there is none."""
    rect = page.evaluate(
        "(() => {const els = [...document.querySelectorAll('*')].filter(e => e.innerText && e.innerText.trim() === "
        f"{json.dumps(text)} && e.getBoundingClientRect().width > 0); if (!els.length) return null; "
        "const area = e => e.getBoundingClientRect().width * e.getBoundingClientRect().height; "
        "els.sort((a, b) => area(a) - area(b)); const r = els[0].getBoundingClientRect(); "
        "return [r.x + r.width / 2, r.y + r.height / 2];})()")
    if rect is None:
        return False
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=rect[0], y=rect[1], button="left", clickCount=1)
    return True


def pick_columns(page: Page, names: list[str], screenshot: Path) -> dict[str, Any]:
    """On the runs list: open **Columns**, search and tick each metric of `names`, close the menu, scroll
    the table to its right end and take a screenshot; returns the column headers the table then has."""
    time.sleep(3)
    picked = {"Columns": click(page, "Columns")}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "Metrics (" not in (page.evaluate("document.body.innerText") or ""):
        time.sleep(1)
    for name in names:
        page.evaluate("(() => {const i = [...document.querySelectorAll('input')].find(i => i.placeholder === "
                      "'Search columns'); if (!i) return; Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "
                      f"'value').set.call(i, {json.dumps(name)}); i.dispatchEvent(new Event('input', "
                      "{bubbles: true}));})()")
        time.sleep(2)
        picked[name] = click(page, name)
        time.sleep(2)
    for kind in ("keyDown", "keyUp"):
        page.call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27)
    page.evaluate("[...document.querySelectorAll('button')].filter(b => (b.getAttribute('aria-label') || '')"
                  ".toLowerCase().includes('close')).forEach(b => b.click())")  # the assistant's side panel
    time.sleep(2)
    page.evaluate("document.querySelectorAll('.ag-body-horizontal-scroll-viewport, .ag-center-cols-viewport, "
                  ".ag-header-viewport').forEach(e => e.scrollLeft = 5000)")
    time.sleep(2)
    screenshot.write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))
    headers = page.evaluate("[...document.querySelectorAll('.ag-header-cell')].map(e => e.innerText.trim())")
    return {"screenshot": str(screenshot), "clicked": picked, "headers": [h for h in headers or [] if h]}


def png_width(path: str) -> int:
    """The width in the PNG's IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    if not head.startswith(b"\x89PNG"):
        raise ValueError(f"{path} is not a PNG")
    return int.from_bytes(head[16:20], "big")


def shows_figure(width: int) -> str:
    """JS: the artifact viewer shows an image fetched from the server (a blob: URL) of the figure's width."""
    return f"[...document.images].some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth === {width})"


def figure_loaded(page: dict[str, Any], width: int) -> bool:
    return any(i["src"].startswith("blob:") and i["loaded"] and i["width"] == width for i in page["images"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs"), help="the folder `belladonna run --out` wrote")
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--out", type=Path, default=Path("runs/ui"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    from infra import mlflow_runs

    run_dir, out = args.run_dir.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{run_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=db)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {db}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    cell = next((c for c in cells if c.data.tags.get("defense") == "abl"), cells[0])
    port, debug_port = free_port(), free_port()
    server = start([shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow"), "server",
                    "--backend-store-uri", db, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                   out / "mlflow-server.log")
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    browser = None
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server)
        browser = start([args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                         f"--remote-debugging-port={debug_port}", f"--user-data-dir={profile}",
                         "--window-size=1600,1300", "about:blank"], out / "chromium.log")
        wait_http(f"http://127.0.0.1:{debug_port}/json/version", browser, 60)
        page = Page(debug_port)
        eid, p_id, c_id = experiment.experiment_id, parent.info.run_id, cell.info.run_id
        base = f"http://127.0.0.1:{port}"

        def at(page_: str) -> str:  # the UI's "Model training" pages (see infra.mlflow_runs.runs_view_url)
            return f"{base}/#/experiments/{eid}/{page_}?workflowType=machine_learning"

        has = "document.body && document.body.innerText.includes({!r})".format
        search_victim = ("(() => {const i = document.querySelector('input[placeholder*=\"Search metric\"]'); "
                         "if (!i) return; Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value')"
                         ".set.call(i, 'victim'); i.dispatchEvent(new Event('input', {bubbles: true}));})()")
        pages = {
            "experiment_plain": page.visit(f"{base}/#/experiments/{eid}", out / "0-experiment-plain.png",
                                           has("Overview")),
            "experiment": page.visit(mlflow_runs.runs_view_url(base, eid), out / "1-experiment-runs.png",
                                     "/[1-9][0-9]* matching runs/.test(document.body.innerText)"),
            "parent": page.visit(mlflow_runs.runs_view_url(base, eid, p_id), out / "2-parent.png", has("Description")),
            "parent_metrics": page.visit(at(f"runs/{p_id}"), out / "2b-parent-metrics.png", has("Description"),
                                         then="document.querySelectorAll('*').forEach(e => "
                                              "{if (e.scrollHeight > e.clientHeight + 400) e.scrollTop = 1400;})"),
            "cell": page.visit(at(f"runs/{c_id}"), out / "5-cell.png", has("victim.loss")),
            "cell_charts": page.visit(at(f"runs/{c_id}/model-metrics"), out / "6-cell-charts.png",
                                      "document.querySelectorAll('input').length > 0", settle=10, then=search_victim),
        }
        # the runs list with the columns docs/compare.md recommends picking (the UI shows no metric by default)
        headline = sorted(k for k in parent.data.metrics if k.endswith((".asr", ".clean_acc")))[:2]
        page.visit(mlflow_runs.runs_view_url(base, eid), out / "1b-runs-columns-menu.png",
                   "/[1-9][0-9]* matching runs/.test(document.body.innerText)")
        columns = pick_columns(page, ["regression.worse", *headline], out / "1c-runs-with-columns.png")
        log.info("runs list columns: %s", ", ".join(columns["headers"]))
        dpa = next((c for c in cells if c.data.tags.get("defense") == "dpa"), None)
        wanted = [("parent_heatmap", p_id, "heatmap_asr.png"),
                  ("parent_poisons", p_id, f"poisons_{cell.data.tags['attack']}.png"),
                  ("cell_poisons", c_id, "poisons.png"), ("cell_abl", c_id, "abl_losses.png"),
                  ("cell_dpa", dpa.info.run_id if dpa else None, "certified_accuracy.png")]
        widths: dict[str, int] = {}
        for name, run_id, file in wanted:
            names = {a.path for a in client.list_artifacts(run_id, "figures")} if run_id else set()
            if f"figures/{file}" not in names:
                continue
            folder = Path(tempfile.mkdtemp(prefix="figure-", dir=profile.parent))
            widths[name] = png_width(client.download_artifacts(run_id, f"figures/{file}", str(folder)))
            shutil.rmtree(folder, ignore_errors=True)
            pages[name] = page.visit(at(f"runs/{run_id}/artifacts/figures/{file}"), out / f"fig-{name}.png",
                                     shows_figure(widths[name]), settle=2)
        figures = {name: figure_loaded(pages[name], width) for name, width in widths.items()}
        report = {"experiment_id": eid, "parent": p_id, "cell": c_id, "figures_loaded": figures, "runs_columns": columns,
                  "pages": {name: {k: v for k, v in p.items() if k != "text"} | {"text_head": p["text"][:400]}
                            for name, p in pages.items()}}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        for name, ok in figures.items():
            log.info("%-16s figure %s", name, "loaded" if ok else "NOT LOADED")
        log.info("screenshots and report.json in %s", out)
        return 0 if all(figures.values()) else 1
    finally:
        if browser is not None:
            stop(browser)
        stop(server)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
