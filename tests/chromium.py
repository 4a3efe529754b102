"""Headless Chromium with the network blocked: what a browser on an air-gapped network renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL_HINT = (
    "Chromium is needed to check that Data Docs render offline: `apt-get install -y chromium` "
    "(Debian's package; `make test` installs it where apt-get exists)."
)
# Every host name fails to resolve, as on a hospital network without internet.
NO_NETWORK = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost"


def chromium() -> str:
    """The Chromium binary; fails (never skips) when there is none."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return found


def _run(*args: str) -> str:
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", NO_NETWORK, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# Written into the page before </body>: what the browser made of the page, as JSON in the DOM.
PROBE = """<script>
(() => {
  const style = (el) => {
    const s = getComputedStyle(el);
    return {classes: el.className, width: s.width, color: s.color,
            mask: s.maskImage || s.webkitMaskImage};
  };
  const probe = {
    stylesheets: [...document.querySelectorAll('link[rel=stylesheet]')].map((l) => l.href),
    icons: [...document.querySelectorAll('i.fas')].map(style),
    rows: [...document.querySelectorAll('table tbody tr')].map((tr) => tr.innerText.trim()),
    // Every request the page made, failed ones included (a blocked CDN still shows here).
    resources: performance.getEntriesByType('resource').map((r) => r.name),
    containerPadding: getComputedStyle(document.querySelector('.container-fluid')).paddingLeft,
  };
  const out = document.createElement('pre');
  out.id = 'radflow-probe';
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
})();
</script>"""


def probe_page(page: Path) -> dict:
    """Load `page` (a copy with the probe, beside it so relative URLs hold) and return the probe."""
    probed = page.with_name(f".probe-{page.name}")
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
    try:
        dom = _run("--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    finally:
        probed.unlink()
    found = re.search(r'<pre id="radflow-probe">(.*?)</pre>', dom, re.S)
    assert found, f"{page}: the probe did not run:\n{dom[-2000:]}"
    text = found[1].replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


def screenshot(page: Path, png: Path, size: str = "1400,1800") -> Path:
    _run(f"--window-size={size}", f"--screenshot={png}", page.as_uri())
    return png
