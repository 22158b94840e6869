"""The dashboard in a real headless Chromium against a real uvicorn server,
driven over the DevTools protocol (:mod:`cdp`): the login form exchanges a
token for the HttpOnly session cookie, the jobs table, the searchable and
paged study list and the job page are rendered by the pages' JavaScript from
the JSON API (patient name, ID, study date, description, accession; the stage
of a running job; the viewer link of ``http.viewer_url``), the key images (one
per finding) load as plain ``<img>`` tags with the cookie and a key image that
cannot be rendered shows its error in its place, the retry button posts with
the CSRF token, logout ends the session; screenshots are taken."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import uvicorn
from PIL import Image
from sqlalchemy import select

from api_seed import TOKEN, FakeDispatcher, advance, assemble, build_seg, gradient_series, ingest, save_seg_output, seed
from cdp import Browser
from nodetest import free_port, make_settings, require_tool, tokens_env
from pacs_node.api.app import create_app
from pacs_node.db.models import Instance, utcnow
from pacs_node.jobs.states import JobState
from pacs_node.node import Node

#: A failed training-domain check; the second warning must be shown as text, not parsed.
DOMAIN = {"in_domain": False,
          "warnings": ["slice thickness 8.0 mm is outside the training range 1.0-6.0 mm", "<b>spacing</b> & more"],
          "checks": {"slice_thickness_mm": {"value": 8.0, "range": [1.0, 6.0], "ok": False}}}
READER = "pn_dashboard-reader-" + "4" * 32
VIEWER = "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}"

#: Screenshots are kept here (``PACS_NODE_SCREENSHOT_DIR`` overrides) for a look.
SHOT_DIR = Path(os.environ.get("PACS_NODE_SCREENSHOT_DIR", "/tmp/pacs-node-screenshots"))


class Server:
    """uvicorn serving an app on a free loopback port, in a thread."""

    def __init__(self, node: Node, dispatcher: FakeDispatcher) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(node, dispatcher=dispatcher), host="127.0.0.1", port=self.port,
            log_config=None, access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def check_screenshot(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 10_000, path
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (900, 1280, 3)
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not a blank page
    return img


def log_in(browser: Browser, token: str) -> None:
    """Type ``token`` into the login form and submit it, as a user does."""
    browser.wait_for("!!document.getElementById('login-form')")
    browser.evaluate(f"""(() => {{
        document.getElementById('token').value = {json.dumps(token)};
        document.getElementById('login-form').requestSubmit();
        return true;
    }})()""")


def session_cookies(browser: Browser) -> list[dict[str, object]]:
    return [c for c in browser.cookies() if c["name"] == "pacs_node_session"]


@dataclass
class Seeded:
    node: Node
    seg_job: int
    failed_job: int
    running_job: int
    seg_study: str


def break_pixels(node: Node, sop_uid: str) -> None:
    """Rewrite a stored instance without its pixel data: its header still
    reads (the key image is planned), rendering it fails."""
    with node.db.sessionmaker() as s:
        relpath = s.execute(select(Instance.path).where(Instance.sop_instance_uid == sop_uid)).scalar_one()
    path = node.store.path_of(relpath)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


@pytest.fixture
def seeded_node(tmp_path: Path, sqlite_url: str) -> Iterator[Seeded]:
    """Three seeded jobs, a running job (in its inference stage), and a done
    job with a SEG of three findings whose third finding's slice cannot be
    rendered (its stored file lost its pixel data)."""
    model = tmp_path / "model.pt"
    model.write_bytes(b"checkpoint")
    settings = make_settings(tmp_path, sqlite_url, engine=json.dumps({"model": str(model)}),
                             http__tokens=tokens_env(("operator", TOKEN, ["read", "write"]), ("reader", READER, ["read"])),
                             http__viewer_url=VIEWER)
    node = Node.from_settings(settings, migrate=True)
    try:
        seeded = seed(node)
        series = gradient_series(8, 64, 64)
        for ds in series:
            ds.PatientName, ds.PatientID, ds.AccessionNumber = "Smith^John", "P-4711", "ACC-777"
            ds.StudyDate, ds.StudyDescription = "20250105", "MRI Head <b>"
        ingest(node, series)
        (job_id,) = assemble(node)
        items = [{"volume_mm3": v, "max_score": 0.9, "mean_score": 0.8, "centroid": [20.0, 30.0, 4.0]}
                 for v in (120.0, 40.0, 10.0)]
        advance(node, job_id, JobState.RUNNING, JobState.DELIVERING, JobState.DONE,
                timings={"queue_wait": 0.3, "load": 0.8, "inference": 4.2, "build": 0.5, "delivery": 1.1},
                findings={"count": 3, "items": items, "domain": DOMAIN}, study_score=0.97)
        ordered = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))
        mask = np.zeros((8, 64, 64), bool)
        yy, xx = np.mgrid[0:64, 0:64]
        mask[1] = (yy - 30) ** 2 + (xx - 36) ** 2 <= 100  # finding 1 (two slices), largest on slice 1
        mask[2] = (yy - 31) ** 2 + (xx - 35) ** 2 <= 49
        mask[4] = (yy - 20) ** 2 + (xx - 20) ** 2 <= 36   # finding 2
        mask[6, 40:44, 40:44] = True                       # finding 3 (16 px)
        save_seg_output(node, job_id, build_seg(ordered, mask))
        break_pixels(node, ordered[6].SOPInstanceUID)
        ingest(node, gradient_series(4, 16, 16))
        (running,) = assemble(node)
        advance(node, running, JobState.RUNNING, stage="inference", stage_started_at=utcnow(),
                timings={"queue_wait": 0.3, "load": 0.8})
        yield Seeded(node, job_id, seeded.failed, running, series[0].StudyInstanceUID)
    finally:
        node.close()


def test_dashboard_login_pages_key_images_retry_and_logout(tmp_path: Path, seeded_node: Seeded) -> None:
    binary = require_tool("chromium")
    node, seg_job, failed_job = seeded_node.node, seeded_node.seg_job, seeded_node.failed_job
    running_job, seg_study = seeded_node.running_job, seeded_node.seg_study
    SHOT_DIR.mkdir(parents=True, exist_ok=True)
    index_png, job_png = SHOT_DIR / "dashboard-index.png", SHOT_DIR / "dashboard-job.png"
    login_png = SHOT_DIR / "dashboard-login.png"
    for p in (index_png, job_png, login_png):
        p.unlink(missing_ok=True)
    dispatcher = FakeDispatcher()
    with Server(node, dispatcher) as srv, Browser(binary, tmp_path / "profile") as browser:
        # Not logged in: the page's first API request answers 401, the browser lands on the login form.
        browser.navigate(srv.url(f"/jobs/{seg_job}"))
        browser.wait_for("location.pathname === '/login'")
        assert browser.evaluate("location.search") == f"?next=%2Fjobs%2F{seg_job}"
        assert "data-key-image" not in browser.html()
        log_in(browser, "pn_not-a-token")
        assert "not valid on this node" in browser.wait_for(
            "!document.getElementById('notice').hidden && document.getElementById('notice').textContent")
        assert session_cookies(browser) == []
        browser.screenshot(login_png)

        # The token opens a session: an HttpOnly, SameSite=Strict cookie scripts cannot read.
        log_in(browser, TOKEN)
        browser.wait_for(f"location.pathname === '/jobs/{seg_job}'")
        (cookie,) = session_cookies(browser)
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
        assert cookie["secure"] is False  # plain http on loopback here; Secure over HTTPS
        assert TOKEN not in json.dumps(browser.cookies())
        assert browser.evaluate("document.cookie") == ""
        assert browser.evaluate("JSON.stringify({...sessionStorage, ...localStorage})") == "{}"

        # The job page: events, timings, findings and the key images, loaded by <img> tags with the cookie.
        # One key image per finding; the third cannot be rendered and says so in its place.
        browser.wait_for("document.querySelectorAll('img.keyimage').length === 2 && "
                         "[...document.querySelectorAll('img.keyimage')].every(i => i.complete && i.naturalWidth > 0) && "
                         "document.querySelectorAll('.keyimage-error').length === 1")
        browser.wait_for("document.getElementById('user').textContent.startsWith('operator (read, write)')")
        job_dom = browser.html()
        assert f"Job #{seg_job}" in job_dom
        assert "inference" in job_dom and "4.2 s" in job_dom and "3 finding(s)" in job_dom
        assert job_dom.count('data-key-image="') == 3
        assert [browser.evaluate(f"document.querySelector('[data-key-image=\"{n}\"]').dataset.finding")
                for n in range(3)] == ["1", "2", "3"]
        captions = browser.evaluate("[...document.querySelectorAll('#keyimages figcaption')].map(f => f.textContent)")
        assert [c.split(" · ")[:2] for c in captions] == [["finding 1", "slice 2/8"], ["finding 2", "slice 5/8"],
                                                          ["finding 3", "slice 7/8"]]
        assert f'src="/jobs/{seg_job}/keyimages/0.png?v=' in job_dom and "one per finding" in job_dom
        error = browser.evaluate("document.querySelector('[data-key-image=\"2\"] .keyimage-error').textContent")
        assert error == "Key image not available: HTTP 500: key image 2 cannot be rendered (AttributeError)"
        assert browser.evaluate("document.getElementById('notice').hidden") is True  # no page-wide error
        # Patient and study, escaped; the viewer link with the Study UID.
        summary = browser.evaluate("document.getElementById('summary').textContent")
        for text in ("Smith, John", "P-4711", "2025-01-05", "MRI Head <b>", "ACC-777"):
            assert text in summary
        assert "<b>" not in job_dom.split('id="summary"', 1)[1].split("</dl>", 1)[0]
        assert browser.evaluate("document.getElementById('viewer-link').hidden") is False
        assert browser.evaluate("document.getElementById('viewer-link').getAttribute('href')") == \
            VIEWER.replace("{study_uid}", seg_study)
        # done: no stage (and hidden means not laid out)
        assert browser.evaluate("document.getElementById('stage-box').hidden") is True
        assert browser.evaluate("document.getElementById('stage-box').getClientRects().length") == 0
        # The failed training-domain check: a visible warning listing the warnings, escaped.
        box = job_dom.split('id="domain-warning"', 1)[1].split("</div>", 1)[0]
        assert "hidden" not in box.split(">", 1)[0]
        assert "outside the model's training domain" in box
        assert "<li>slice thickness 8.0 mm is outside the training range 1.0-6.0 mm</li>" in box
        assert "<li>&lt;b&gt;spacing&lt;/b&gt; &amp; more</li>" in box and "<b>" not in box
        browser.screenshot(job_png)

        # A running job's page: its stage and how far along the stages it is.
        browser.navigate(srv.url(f"/jobs/{running_job}"))
        browser.wait_for("!document.getElementById('stage-box').hidden")
        assert browser.evaluate("document.getElementById('stage-text').textContent").startswith(
            "Stage: inference (3/6) · ")
        assert browser.evaluate("document.getElementById('stage-progress').value") == 2
        assert browser.evaluate("document.getElementById('stage-progress').max") == 6

        # The jobs table, built by the page's script from /api/v1/jobs; /healthz answered 200.
        browser.navigate(srv.url("/?page_size=2"))
        browser.wait_for("document.querySelectorAll('tr[data-job-id]').length === 5 && "
                         "document.querySelectorAll('tr[data-study-uid]').length === 2 && "
                         "document.getElementById('health').textContent === 'healthy'")
        index_dom = browser.html()
        assert "loading…" not in index_dom
        for job_id, state in ((seg_job, "done"), (failed_job, "failed"), (running_job, "running")):
            assert f'data-job-id="{job_id}"' in index_dom and f'data-state="{state}"' in index_dom
            assert f'href="/jobs/{job_id}"' in index_dom
        cells = browser.evaluate(f"[...document.querySelector('tr[data-job-id=\"{seg_job}\"]').cells]"
                                 ".map(c => c.textContent)")
        assert cells[2:7] == ["Smith, John", "P-4711", "2025-01-05", "MRI Head <b>", "ACC-777"]
        stage = browser.evaluate(f"document.querySelector('tr[data-job-id=\"{running_job}\"] .stage').textContent")
        assert stage.startswith("inference (3/6)")
        browser.screenshot(index_png)

        # The study list: pages of two (next / previous), then a search narrows it.
        def page_text() -> str:
            return str(browser.evaluate("document.getElementById('studies-page').textContent"))

        assert page_text() == "studies 1–2 of 5"
        assert browser.evaluate("document.getElementById('studies-prev').disabled") is True
        browser.evaluate("document.getElementById('studies-next').click(), true")
        browser.wait_for("document.getElementById('studies-page').textContent === 'studies 3–4 of 5'")
        browser.evaluate("document.getElementById('studies-next').click(), true")
        browser.wait_for("document.getElementById('studies-page').textContent === 'studies 5–5 of 5'")
        assert browser.evaluate("document.getElementById('studies-next').disabled") is True
        browser.evaluate("document.getElementById('studies-prev').click(), true")
        browser.wait_for("document.getElementById('studies-page').textContent === 'studies 3–4 of 5'")
        browser.evaluate("""(() => {
            document.getElementById('q-patient').value = 'smith*';
            document.getElementById('study-search').requestSubmit();
            return true;
        })()""")
        browser.wait_for("document.getElementById('studies-page').textContent === 'studies 1–1 of 1'")
        row = browser.evaluate("[...document.querySelectorAll('tr[data-study-uid]')].map(r => r.dataset.studyUid)")
        assert row == [seg_study]
        study_cells = browser.evaluate("[...document.querySelector('tr[data-study-uid]').cells].map(c => c.textContent)")
        assert study_cells[:5] == ["Smith, John", "P-4711", "2025-01-05", "MRI Head <b>", "ACC-777"]
        assert browser.evaluate("document.querySelector('tr[data-study-uid] a.viewer-link').getAttribute('href')") == \
            VIEWER.replace("{study_uid}", seg_study)
        browser.evaluate("""(() => {
            document.getElementById('q-patient').value = '';
            document.getElementById('q-accession').value = 'ACC1';
            document.getElementById('q-date').value = '20260101';
            document.getElementById('study-search').requestSubmit();
            return true;
        })()""")
        browser.wait_for("document.getElementById('studies-page').textContent === 'studies 1–2 of 4'")
        browser.evaluate("document.getElementById('q-date').value = '2026', "
                         "document.getElementById('study-search').requestSubmit(), true")
        browser.wait_for("document.getElementById('studies-body').textContent.startsWith('Search not understood')")
        browser.evaluate("document.getElementById('q-clear').click(), true")
        browser.wait_for("document.getElementById('studies-page').textContent === 'studies 1–2 of 5'")

        # Retry from the failed job's page: a POST with the cookie and the session's CSRF token.
        browser.navigate(srv.url(f"/jobs/{failed_job}"))
        browser.wait_for("!document.getElementById('retry').hidden")
        failed_dom = browser.html()  # a failed job keeps its timings and error text
        assert "CUDA out of memory" in failed_dom and "300 ms" in failed_dom and "queue wait" in failed_dom
        browser.evaluate("document.getElementById('retry').click(), true")
        browser.wait_for("document.getElementById('retry-msg').textContent === 'retry accepted: queued'")
        assert dispatcher.process == [failed_job]

        # Logout ends the session; the pages send the browser to the login form again.
        browser.evaluate("document.getElementById('logout').click(), true")
        browser.wait_for("location.pathname === '/login'")
        assert session_cookies(browser) == []
        browser.navigate(srv.url("/"))
        browser.wait_for("location.pathname === '/login'")

        # A read-only token sees the jobs but gets no retry button.
        log_in(browser, READER)
        browser.wait_for("location.pathname === '/' && document.querySelectorAll('tr[data-job-id]').length === 5")
        browser.navigate(srv.url(f"/jobs/{failed_job}"))
        browser.wait_for(f"document.getElementById('title').textContent === 'Job #{failed_job}' && "
                         "document.getElementById('user').textContent.startsWith('reader (read)')")
        assert browser.evaluate("document.getElementById('retry').hidden") is True
    assert dispatcher.process == [failed_job]

    assert login_png.stat().st_size > 5_000
    check_screenshot(index_png)
    shot = check_screenshot(job_png)
    red = (shot[..., 0] > 200) & (shot[..., 1] < 40) & (shot[..., 2] < 40)
    assert red.sum() > 50  # the outlines are visible on the page
