"""The console app (flows/console) in-process over a real SQLite ledger and real DICOMs: sign-in,
roles, CSRF, the review form's bad input (nothing written), the rendered image, and the monitoring
page's figures against the ones computed from the ledger. Pages that need MLflow (models, version,
trace) are driven in a real browser by tests/integration/test_console_browser.py."""

from __future__ import annotations

import hashlib
import io
import re
from html import unescape

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient

from flows import console_auth as auth
from flows.console.app import create_app
from pipeline_steps.core.config import Params
from pipeline_steps.core.deid import image_id_for
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance import review
from pipeline_steps.governance.ledger import open_ledger
from pipeline_steps.serving.serving import example_dicom

ROWS, COLS = 96, 64
PATIENT = "Testperson^Ada"
SECRETS = {"vera": "viewer-secret", "rita": "reviewer-secret", "paul": "promoter-secret"}


def _dicom(seed: int) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(example_dicom(8)))
    ds.Rows, ds.Columns = ROWS, COLS
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4095, (ROWS, COLS), dtype=np.uint16).tobytes()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT, "PID-4711", "ACC-99"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _box(x0, y0, x1, y1, score):
    return {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "score": score, "label": "nodule"}


@pytest.fixture
def workspace(tmp_path):
    """Three kept images and their predictions (two by version 1, one by version 2), and one
    prediction whose input was refused."""
    layout = Layout(tmp_path)
    boxes = {
        "P1": [_box(4, 4, 20, 20, 0.91), _box(30, 50, 44, 70, 0.42)],
        "P2": [_box(10, 10, 30, 30, 0.77)],
        "P3": [],
    }
    with open_ledger(tmp_path) as ledger:
        for n, (pid, found) in enumerate(boxes.items()):
            blob = _dicom(n)
            key = image_id_for(hashlib.sha256(blob).hexdigest())
            layout.review_image(key).parent.mkdir(parents=True, exist_ok=True)
            layout.review_image(key).write_bytes(blob)
            payload = {
                "prediction_id": pid,
                "boxes": found,
                "model": {"name": "radflow-detector", "version": "2" if pid == "P3" else "1"},
                "created_at": f"2026-12-0{n + 1}T08:00:00.000Z",
                "training_membership_key": key,
                "threshold": 0.3,
            }
            ledger.append(review.PREDICTION, pid, payload)
        ledger.append(
            review.PREDICTION,
            "P4",
            {"prediction_id": "P4", "reason": "not_dicom", "boxes": [], "model": {"version": "1"}},
        )
    return layout


@pytest.fixture
def client(workspace):
    lines = [
        f"vera:viewer:{auth.hash_secret(SECRETS['vera'])}",
        f"rita:reviewer:{auth.hash_secret(SECRETS['rita'])}",
        f"paul:promoter:{auth.hash_secret(SECRETS['paul'])}",
    ]
    users = auth.parse_users("\n".join(lines), "test users")
    app = create_app(workspace, Params(), users)
    # Secure cookies travel over HTTPS only, as in a browser.
    with TestClient(app, base_url="https://testserver") as c:
        yield c


def sign_in(client: TestClient, name: str) -> str:
    """Sign in; returns the session's CSRF token (from a page's logout form)."""
    form = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]
    done = client.post(
        "/login",
        data={"name": name, "secret": SECRETS[name], "csrf": token},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    page = client.get("/review")
    return re.search(r'name="csrf" value="([^"]+)"', page.text)[1]


def reviews(workspace) -> list:
    with open_ledger(workspace.root) as ledger:
        return ledger.entries(kind=review.REVIEW)


def test_pages_need_a_session(client, workspace):
    workspace.data_docs.mkdir(parents=True)
    (workspace.data_docs / "index.html").write_text("<html>validation results</html>")
    assert client.get("/data-docs/index.html").status_code == 401
    assert (
        client.get("/review", headers={"accept": "text/html"}, follow_redirects=False).headers[
            "location"
        ]
        == "/login"
    )
    assert client.get("/metrics").status_code == 401
    assert client.post("/predictions/P1/review", data={}).status_code == 401


def test_sign_in_sets_a_secure_http_only_strict_cookie_and_wrong_secrets_are_refused(client):
    form = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]
    wrong = client.post("/login", data={"name": "rita", "secret": "nope", "csrf": token})
    assert wrong.status_code == 401 and "Wrong name or password" in wrong.text
    token = re.search(r'name="csrf" value="([^"]+)"', wrong.text)[1]
    ok = client.post(
        "/login",
        data={"name": "rita", "secret": SECRETS["rita"], "csrf": token},
        follow_redirects=False,
    )
    cookie = next(
        v for k, v in ok.headers.multi_items() if k == "set-cookie" and auth.SESSION_COOKIE in v
    ).lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie


def test_sign_in_without_the_forms_token_is_refused(client):
    client.get("/login")
    done = client.post("/login", data={"name": "rita", "secret": SECRETS["rita"], "csrf": "x"})
    assert done.status_code == 403
    assert client.get("/review", follow_redirects=False).status_code == 401


def _review(client, csrf, pid="P1", **fields):
    data = {"csrf": csrf, **fields}
    return client.post(f"/predictions/{pid}/review", data=data, follow_redirects=False)


def test_a_reviewer_records_a_review_in_the_ledger(client, workspace):
    csrf = sign_in(client, "rita")
    done = _review(
        client,
        csrf,
        verdict_0="confirmed",
        verdict_1="corrected",
        box_1="28, 48, 46, 72",
        missed="40 10 60 30\n2,80,12,90",
    )
    assert done.status_code == 303, done.text
    (row,) = reviews(workspace)
    assert row.subject == "P1" and row.payload["reviewer"] == "rita"
    assert [f["verdict"] for f in row.payload["findings"]] == ["confirmed", "corrected"]
    assert row.payload["findings"][1]["corrected_box"] == [28, 48, 46, 72]
    assert [m["box"] for m in row.payload["missed"]] == [[40, 10, 60, 30], [2, 80, 12, 90]]
    assert row.payload["image_size"] == [ROWS, COLS]
    queue = client.get("/review").text
    assert "reviewed</span> by rita" in queue


@pytest.mark.parametrize(
    ("pid", "fields", "status", "message"),
    [
        ("NOSUCHID", {"verdict_0": "confirmed"}, 404, "no prediction 'NOSUCHID'"),
        ("P1", {"verdict_0": "confirmed"}, 422, "finding 2 has no verdict"),
        ("P1", {"verdict_0": "confirmed", "verdict_1": "maybe"}, 422, "verdict must be one of"),
        (
            "P1",
            {"verdict_0": "confirmed", "verdict_1": "corrected", "box_1": "a, b, c, d"},
            422,
            "must be numbers",
        ),
        (
            "P1",
            {"verdict_0": "confirmed", "verdict_1": "rejected", "missed": "10, 10, 70, 20"},
            422,
            "outside the image (64 x 96 pixels",
        ),
        (
            "P1",
            {"verdict_0": "confirmed", "verdict_1": "corrected", "box_1": "0, 0, 10, 97"},
            422,
            "outside the image",
        ),
        (
            "P1",
            {"verdict_0": "confirmed", "verdict_1": "rejected", "missed": "1 2 3"},
            422,
            "x_min",
        ),
        ("P4", {}, 422, "nothing to review"),
        ("bad id!", {}, 422, "a prediction id is letters and digits"),
    ],
)
def test_bad_review_input_gets_a_clear_error_and_writes_nothing(
    client, workspace, pid, fields, status, message
):
    csrf = sign_in(client, "rita")
    done = _review(client, csrf, pid=pid, **fields)
    assert done.status_code == status, done.text
    assert message in unescape(done.text)
    assert "Nothing was changed" in done.text
    assert reviews(workspace) == []


def test_malformed_form_bodies_are_refused(client, workspace):
    csrf = sign_in(client, "rita")
    twice = client.post(
        "/predictions/P2/review",
        content=f"csrf={csrf}&verdict_0=confirmed&verdict_0=rejected",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert twice.status_code == 422 and "appears twice" in unescape(twice.text)
    as_json = client.post("/predictions/P2/review", json={"csrf": csrf, "verdict_0": "confirmed"})
    assert as_json.status_code == 422 and "expected a form" in as_json.text
    assert reviews(workspace) == []
    query = client.get("/review?page_no=abc")
    assert query.status_code == 422 and "check page_no" in query.text


def test_roles_and_csrf_guard_the_forms(client, workspace):
    csrf = sign_in(client, "vera")
    refused = _review(client, csrf, pid="P2", verdict_0="confirmed")
    assert refused.status_code == 403 and "does not hold the reviewer role" in refused.text
    promote = client.post(
        "/versions/1/promote", data={"csrf": csrf, "to": "production", "reason": "looks good"}
    )
    assert promote.status_code == 403 and "promoter role" in promote.text
    client.post("/logout", data={"csrf": csrf})
    sign_in(client, "rita")
    forged = _review(client, "not-the-token", pid="P2", verdict_0="confirmed")
    assert forged.status_code == 403 and "CSRF" in forged.text
    assert reviews(workspace) == []
    with open_ledger(workspace.root) as ledger:
        assert ledger.entries(kind="transition") == []


def _cell(html: str, version: str, key: str) -> str:
    row = re.search(rf'<tr data-version="{version}">(.*?)</tr>', html, re.S)[1]
    return re.search(rf'data-key="{key}">([^<]*)<', row)[1]


def test_monitoring_page_shows_the_figures_computed_from_the_ledger(client, workspace):
    csrf = sign_in(client, "rita")
    _review(client, csrf, pid="P1", verdict_0="confirmed", verdict_1="rejected", missed="1,1,5,5")
    _review(client, csrf, pid="P2", verdict_0="rejected")
    _review(client, csrf, pid="P2", verdict_0="corrected", box_0="9, 9, 31, 33")  # supersedes
    with open_ledger(workspace.root) as ledger:
        expected = {
            m.version: m
            for m in review.monitoring(
                ledger.entries(kind=review.PREDICTION), ledger.entries(kind=review.REVIEW)
            )
        }
    page = client.get("/monitoring").text
    for version, mon in expected.items():
        for key in ("coverage", "reviewed_precision", "missed_lesion_rate"):
            value = getattr(mon.total, key)
            shown = "-" if value is None else f"{100 * value:.1f}%"
            assert _cell(page, version, key) == shown, (version, key)
    # By hand: version 1 made P1 and P2 (P4 failed), both reviewed; findings P1 confirmed +
    # rejected, P2 corrected (its first review superseded); one missed lesion.
    v1 = expected["1"].total
    assert (v1.predictions, v1.reviewed, v1.coverage) == (2, 2, 1.0)
    assert v1.reviewed_precision == pytest.approx(2 / 3)
    assert v1.missed_lesion_rate == pytest.approx(1 / 3)
    assert _cell(page, "1", "reviewed_precision") == "66.7%"
    assert _cell(page, "2", "coverage") == "0.0%"
    metrics = client.get("/metrics").text
    assert (
        'radflow_review_reviewed_precision{model="radflow-detector",version="1"} 0.666667'
        in metrics
    )


def test_metrics_take_a_bearer_secret_for_scrapers(client):
    ok = client.get("/metrics", headers={"authorization": f"Bearer vera:{SECRETS['vera']}"})
    assert ok.status_code == 200 and "radflow_review_coverage" in ok.text
    bad = client.get("/metrics", headers={"authorization": "Bearer vera:wrong"})
    assert bad.status_code == 401


def test_the_image_is_pixels_only_and_no_page_shows_patient_identity(client, workspace):
    from PIL import Image

    sign_in(client, "vera")
    png = client.get("/predictions/P1/image.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(png.content))
    assert picture.size == (COLS, ROWS) and picture.mode == "L"
    assert not picture.text  # no text chunk: nothing from the header travels with the pixels
    assert np.asarray(picture).std() > 10  # the image, not a blank
    pages = [
        client.get(p).text for p in ("/review", "/monitoring", "/ledger", "/ledger?kind=review")
    ]
    for text in [*pages, png.content.decode("latin-1")]:
        for phi in ("Testperson", "PID-4711", "ACC-99"):
            assert phi not in text
    assert client.get("/predictions/NOSUCHID/image.png").status_code == 404


def test_the_ledger_page_verifies_the_chain_and_filters_by_kind(client, workspace):
    csrf = sign_in(client, "rita")
    _review(client, csrf, pid="P2", verdict_0="confirmed")
    page = client.get("/ledger").text
    assert "intact" in page and "5 rows verified" in page
    only = client.get("/ledger?kind=review").text
    assert "1 row of kind review" in only
    assert only.count('<td class="num">') == 1  # one row in the table


def test_data_docs_are_served_from_their_folder_only(client, workspace):
    workspace.data_docs.mkdir(parents=True)
    (workspace.data_docs / "index.html").write_text("<html>validation results</html>")
    (workspace.root / "secret.txt").write_text("outside the Data Docs")
    sign_in(client, "vera")
    page = client.get("/data-docs/index.html")
    assert page.status_code == 200 and "validation results" in page.text
    assert "'unsafe-inline'" in page.headers["content-security-policy"]  # GX's own inline code
    assert client.get("/data-docs/..%2Fsecret.txt").status_code == 404
    assert client.get("/data-docs/missing.html").status_code == 404


def test_pages_carry_security_headers(client):
    sign_in(client, "vera")
    headers = client.get("/review").headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
