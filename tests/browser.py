"""Open an HTML file in headless Chromium (Debian package `chromium`): the DOM after load, whether every
image decoded, the page's errors (a capturing error listener injected at the top of <head> sees failed
resource loads and script errors) and a screenshot. Skips the calling test when no browser is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROBE = """<script>window.__errors=[];addEventListener('error',function(e){window.__errors.push(
(e.target&&e.target.src)||e.message||'error')},true);addEventListener('load',function(){var imgs=[].slice.call(
document.images);document.documentElement.setAttribute('data-probe',JSON.stringify({images:imgs.length,
broken:imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0)}).map(function(i){return i.alt}),
errors:window.__errors}))});</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium binary (Debian package `chromium`; `apt-get install -y chromium`)")
    return found


def open_page(page: Path, tmp: Path, screenshot: Path | None = None) -> dict:
    """Load `page` (with the probe) in headless Chromium; returns images, broken, errors, console, dom."""
    browser = chromium()
    probed = tmp / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
              f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000",
              "--enable-logging=stderr", "--v=0"]
    done = subprocess.run([*common, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r"data-probe=\"([^\"]*)\"", done.stdout)
    assert match, "the probe did not run: " + done.stdout[:500]
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    if screenshot is not None:
        shot = subprocess.run([*common, "--hide-scrollbars", "--window-size=1280,2600", f"--screenshot={screenshot}",
                               page.as_uri()], capture_output=True, text=True, timeout=180)
        assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    return {**probe, "console": console, "dom": done.stdout}
