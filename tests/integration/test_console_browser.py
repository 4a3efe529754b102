"""`radflow console` in a real browser: Playwright drives Debian's Chromium against the console served
over loopback for a trained workspace with real predictions. Signs in, opens a version and a trace
(the image with its boxes), confirms and rejects findings as a reviewer (and draws a missed lesion),
sees monitoring update, and a viewer is refused promotion while a promoter promotes.

Each page is saved as a PNG under $RADFLOW_CONSOLE_SCREENSHOTS (or the test's temporary folder)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.chromium import chromium
from tests.e2e.test_smoke import TINY_PARAMS, _embedded_env, _merge
from tests.integration.test_registry import free_port, stop, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SECRETS = {"vera": "viewer-pass-1", "rita": "reviewer-pass-1", "paul": "promoter-pass-1"}
ROLES = {"vera": "viewer", "rita": "reviewer", "paul": "promoter"}


def radflow(ws: Path, *args: str, stdin: str | None = None, timeout: float = 900):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=_embedded_env(),
        timeout=timeout,
    )


def _ledger(ws: Path, kind: str) -> list:
    from pipeline_steps.governance.ledger import open_ledger

    with open_ledger(ws) as ledger:
        return ledger.entries(kind=kind)


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    """A trained version 1 (gated into staging), predictions on four images, and the console serving it."""
    ws = tmp_path_factory.mktemp("console-ws")
    assert radflow(ws, "init").returncode == 0
    params = yaml.safe_load((ws / "params.yaml").read_text())
    # Floors of 0: the one-epoch model passes the gate, so a promoter can take it to production.
    tiny = _merge(TINY_PARAMS, {"gate": {"thresholds": {"ap50": 0.0, "sens_at_1fp": 0.0}}})
    (ws / "params.yaml").write_text(yaml.safe_dump(_merge(params, tiny)))
    run = radflow(ws, "run", "--json")
    assert run.returncode == 0, run.stderr[-4000:]

    manifest = pd.read_parquet(ws / "data" / "processed" / "manifest.parquet")
    inputs = tmp_path_factory.mktemp("inputs")
    raw = ws / "data" / "raw" / "images"
    for n, image_id in enumerate(sorted(manifest["image_id"])[:4]):
        shutil.copy(raw / f"{image_id}.dcm", inputs / f"patient_{n}_Testperson.dcm")
    out = tmp_path_factory.mktemp("out") / "preds.jsonl"
    done = radflow(
        ws,
        "predict",
        "--version",
        "1",
        "--input",
        str(inputs),
        "--out",
        str(out),
        "--threshold",
        "0.0",
        "--json",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]

    users = tmp_path_factory.mktemp("users") / "console-users"
    for name, secret in SECRETS.items():
        added = radflow(
            ws,
            "console-users",
            "add",
            name,
            "--role",
            ROLES[name],
            "--users-file",
            str(users),
            stdin=secret + "\n",
        )
        assert added.returncode == 0, added.stderr
    port = free_port()
    log = (tmp_path_factory.mktemp("logs") / "console.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "--workspace",
            str(ws),
            "console",
            "--port",
            str(port),
            "--users-file",
            str(users),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_embedded_env(),
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/login", proc, 120, "radflow console")
        shots = Path(os.environ.get("RADFLOW_CONSOLE_SCREENSHOTS") or ws / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        yield {
            "ws": ws,
            "url": f"http://127.0.0.1:{port}",
            "records": records,
            "shots": shots,
            "log": Path(log.name),
        }
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # The system Chromium (Debian's package); Playwright's own browser download is not used.
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield b
        b.close()


def signed_in(browser, console, name: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(f"{console['url']}/login")
    page.fill("#name", name)
    page.fill("#secret", SECRETS[name])
    page.click("button[type=submit]")
    page.wait_for_url(f"{console['url']}/models")
    return page


def shot(page, console, name: str) -> None:
    page.screenshot(path=str(console["shots"] / f"{name}.png"), full_page=True)


def test_sign_in_is_required_and_a_wrong_password_is_refused(browser, console):
    page = browser.new_page()
    page.goto(f"{console['url']}/review")
    assert page.url.endswith("/login")  # no session: the sign-in page
    page.fill("#name", "rita")
    page.fill("#secret", "wrong")
    page.click("button[type=submit]")
    assert "Wrong name or password" in page.inner_text("#message")
    shot(page, console, "login")
    cookies = page.context.cookies()
    assert not [c for c in cookies if c["name"] == "radflow_console_session"]
    page.context.close()


def test_models_and_version_pages(browser, console):
    page = signed_in(browser, console, "vera")
    cookie = next(c for c in page.context.cookies() if c["name"] == "radflow_console_session")
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    rows = page.locator("#versions tbody tr")
    assert rows.count() == 1 and "version 1" in rows.first.inner_text()
    assert "AP@0.5" in page.inner_text("#versions thead")
    shot(page, console, "models")

    page.click("text=version 1")
    page.wait_for_url(f"{console['url']}/versions/1")
    metrics = page.inner_text("#metrics")
    assert "AP@0.5" in metrics and "FROC sensitivity at 1 FP/image" in metrics
    assert "train" in page.inner_text("#manifest")
    # Both plots came from the version's run artifacts and decoded in the browser.
    widths = page.eval_on_selector_all("img.plot", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 2 and all(w > 100 for w in widths)
    assert "Promotion needs the promoter role" in page.inner_text("#promote-refused")
    shot(page, console, "version")
    page.click("text=open the model card")
    assert page.title() == "Model card: radflow-detector version 1"
    shot(page, console, "model-card")
    page.go_back()
    page.click("text=Data Docs")
    assert "Data Docs" in page.title()
    # GX's page ran under the console's policy: its validation results are listed.
    assert page.locator("text=radflow-metadata").count() >= 1
    shot(page, console, "data-docs")
    page.context.close()


def _with_boxes(console) -> dict:
    return max(console["records"], key=lambda r: len(r.get("boxes", [])))


def test_trace_shows_the_image_with_its_boxes_and_every_link(browser, console):
    record = _with_boxes(console)
    assert len(record["boxes"]) >= 2, "the tiny model at threshold 0 should find several boxes"
    page = signed_in(browser, console, "vera")
    page.goto(f"{console['url']}/predictions/{record['prediction_id']}")
    page.wait_for_function("document.querySelector('svg.study image') !== null")
    # The PNG loaded: SVG <image> has no naturalWidth, so load the same URL as an <img>.
    width = page.evaluate(
        """async (src) => { const i = new Image(); i.src = src; await i.decode();
                            return i.naturalWidth; }""",
        f"/predictions/{record['prediction_id']}/image.png",
    )
    assert width > 100
    assert page.locator("svg.study rect.finding").count() == len(record["boxes"])
    links = page.inner_text("#links")
    assert "audit ledger chain intact" in links and "held" in links
    assert "broken" not in links
    text = page.inner_text("#trace-text")
    assert record["prediction_id"] in text and "model       radflow-detector version 1" in text
    assert "Testperson" not in page.content()  # the input's file name never reaches the page
    assert page.locator("form#review").count() == 0  # a viewer has no review form
    shot(page, console, "trace")
    page.context.close()


def _coverage(page, console) -> str:
    page.goto(f"{console['url']}/monitoring")
    return page.inner_text('#monitoring tr[data-version="1"] td[data-key="coverage"]')


def test_a_reviewer_confirms_and_rejects_findings_and_monitoring_updates(browser, console):
    from pipeline_steps.governance import review

    record = _with_boxes(console)
    page = signed_in(browser, console, "rita")
    assert _coverage(page, console) == "0.0%"
    page.goto(f"{console['url']}/review?pending=1")
    assert page.locator("#queue tbody tr").count() == len(console["records"])
    shot(page, console, "review-queue")

    page.goto(f"{console['url']}/predictions/{record['prediction_id']}")
    page.check("input[name=verdict_0][value=confirmed]")
    for i in range(1, len(record["boxes"])):
        page.check(f"input[name=verdict_{i}][value=rejected]")
    # Draw a missed lesion on the image (review.js fills the form's `missed` field).
    page.locator("svg.study").scroll_into_view_if_needed()
    box = page.locator("svg.study").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.30, box["y"] + box["height"] * 0.60)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.40, box["y"] + box["height"] * 0.70, steps=5)
    page.mouse.up()
    assert page.input_value("#missed").count(",") == 3
    shot(page, console, "trace-reviewing")
    page.click("form#review button[type=submit]")
    page.wait_for_selector("#reviews tbody tr >> text=rita")

    (row,) = _ledger(console["ws"], review.REVIEW)
    verdicts = [f["verdict"] for f in row.payload["findings"]]
    assert verdicts == ["confirmed"] + ["rejected"] * (len(record["boxes"]) - 1)
    assert len(row.payload["missed"]) == 1 and row.payload["reviewer"] == "rita"
    x0, y0, x1, y1 = row.payload["missed"][0]["box"]
    rows, cols = row.payload["image_size"]
    assert 0.25 * cols < x0 < x1 < 0.45 * cols and 0.55 * rows < y0 < y1 < 0.75 * rows

    n = len(console["records"])
    assert _coverage(page, console) == f"{100 / n:.1f}%"
    precision = page.inner_text(
        '#monitoring tr[data-version="1"] td[data-key="reviewed_precision"]'
    )
    assert precision == f"{100 / len(record['boxes']):.1f}%"
    shot(page, console, "monitoring")
    page.goto(f"{console['url']}/ledger?kind=review")
    assert "intact" in page.inner_text("#verification")
    assert page.locator("#entries tbody tr").count() == 1
    shot(page, console, "ledger")
    page.context.close()


def test_a_viewer_is_refused_promotion_and_a_promoter_promotes_through_the_gate(browser, console):
    before = _ledger(console["ws"], "transition")
    page = signed_in(browser, console, "vera")
    page.goto(f"{console['url']}/versions/1")
    csrf = page.get_attribute("form[action='/logout'] input[name=csrf]", "value")
    refused = page.request.post(
        f"{console['url']}/versions/1/promote",
        form={"csrf": csrf, "to": "production", "reason": "I am only a viewer"},
    )
    assert refused.status == 403 and "promoter role" in refused.text()
    assert _ledger(console["ws"], "transition") == before
    page.context.close()

    page = signed_in(browser, console, "paul")
    page.goto(f"{console['url']}/versions/1")
    page.select_option("#to", "production")
    page.click("#promote button[type=submit]")  # no reason: the browser keeps the form
    assert _ledger(console["ws"], "transition") == before
    page.fill("#reason", "reviewed the gate evidence")
    page.click("#promote button[type=submit]")
    page.wait_for_url("**/versions/1?moved=*")
    after = _ledger(console["ws"], "transition")
    assert len(after) == len(before) + 1
    moved = after[-1].payload
    assert (moved["version"], moved["to_stage"], moved["actor"]) == ("1", "production", "paul")
    assert moved["reason"] == "reviewed the gate evidence"
    page.goto(f"{console['url']}/models")
    assert "paul" in page.inner_text("#timeline")
    # What was in production: nothing before the promotion, version 1 after it.
    page.fill("#at", after[-1].recorded_at)
    page.click("text=Look up")
    stages = page.locator("#held tbody tr td:first-child").all_inner_texts()
    assert stages == ["production"] and "version 1" in page.inner_text("#held")
    shot(page, console, "models-after-promotion")
    page.fill("#at", before[-1].recorded_at)
    page.click("text=Look up")
    assert page.locator("#held tbody tr td:first-child").all_inner_texts() == ["staging"]
    page.goto(f"{console['url']}/predictions/NO0SUCH0ID")
    assert "no prediction or SR 'NO0SUCH0ID'" in page.inner_text("#message")
    shot(page, console, "unknown-prediction")
    page.context.close()
    log = console["log"].read_text()
    assert "Testperson" not in log
