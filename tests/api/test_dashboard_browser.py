"""The dashboard in a real headless Chromium against a real uvicorn server:
the jobs table and the job page are rendered by the pages' JavaScript from
the JSON API (checked in the DOM Chromium dumps), and screenshots are taken."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from api_seed import TOKEN, FakeDispatcher, advance, assemble, build_seg, gradient_series, ingest, save_seg_output, seed
from nodetest import free_port, make_settings, require_tool
from pacs_node.api.app import create_app
from pacs_node.jobs.states import JobState
from pacs_node.node import Node

#: A failed training-domain check; the second warning must be shown as text, not parsed.
DOMAIN = {"in_domain": False,
          "warnings": ["slice thickness 8.0 mm is outside the training range 1.0-6.0 mm", "<b>spacing</b> & more"],
          "checks": {"slice_thickness_mm": {"value": 8.0, "range": [1.0, 6.0], "ok": False}}}

#: Screenshots are kept here (``PACS_NODE_SCREENSHOT_DIR`` overrides) for a look.
SHOT_DIR = Path(os.environ.get("PACS_NODE_SCREENSHOT_DIR", "/tmp/pacs-node-screenshots"))


class Server:
    """uvicorn serving an app on a free loopback port, in a thread."""

    def __init__(self, node: Node) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(node, dispatcher=FakeDispatcher()), host="127.0.0.1", port=self.port,
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


def chromium(binary: str, tmp: Path, url: str, *, screenshot: Path | None = None) -> subprocess.Popen[str]:
    """Start headless Chromium on ``url``: a screenshot, or the DOM on stdout."""
    profile = tmp / f"profile-{free_port()}"
    args = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
        "--window-size=1280,900", "--virtual-time-budget=5000",
    ]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    return subprocess.Popen(args + [url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_all(procs: list[subprocess.Popen[str]]) -> list[str]:
    """Wait for every Chromium process; their stdout."""
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr[-2000:]
        out.append(stdout)
    return out


def check_screenshot(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 10_000, path
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (900, 1280, 3)
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not a blank page
    return img


@pytest.fixture
def seeded_node(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[Node, int, int]]:
    """Three seeded jobs plus a done job with a SEG (two findings)."""
    model = tmp_path / "model.pt"
    model.write_bytes(b"checkpoint")
    settings = make_settings(tmp_path, sqlite_url, http__api_token=TOKEN, engine=json.dumps({"model": str(model)}))
    node = Node.from_settings(settings, migrate=True)
    try:
        seeded = seed(node)
        series = gradient_series(6, 64, 64)
        ingest(node, series)
        (job_id,) = assemble(node)
        findings = {"count": 1, "items": [{"volume_mm3": 96.0, "max_score": 0.97, "mean_score": 0.8,
                                           "centroid": [20.0, 30.0, 4.0]}],
                    "domain": DOMAIN}
        advance(node, job_id, JobState.RUNNING, JobState.DELIVERING, JobState.DONE,
                timings={"queue_wait": 0.3, "load": 0.8, "inference": 4.2, "build": 0.5, "delivery": 1.1},
                findings=findings, study_score=0.97)
        ordered = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))
        mask = np.zeros((6, 64, 64), bool)
        yy, xx = np.mgrid[0:64, 0:64]
        mask[2] = (yy - 30) ** 2 + (xx - 36) ** 2 <= 100
        mask[3] = (yy - 31) ** 2 + (xx - 35) ** 2 <= 49
        save_seg_output(node, job_id, build_seg(ordered, mask))
        yield node, job_id, seeded.failed
    finally:
        node.close()


def test_dashboard_in_headless_chromium(tmp_path: Path, seeded_node: tuple[Node, int, int]) -> None:
    binary = require_tool("chromium")
    node, seg_job, failed_job = seeded_node
    SHOT_DIR.mkdir(parents=True, exist_ok=True)
    index_png, job_png = SHOT_DIR / "dashboard-index.png", SHOT_DIR / "dashboard-job.png"
    for p in (index_png, job_png):
        p.unlink(missing_ok=True)
    with Server(node) as srv:
        index_dom, job_dom, _, _ = run_all([
            chromium(binary, tmp_path, srv.url("/")),
            chromium(binary, tmp_path, srv.url(f"/jobs/{seg_job}")),
            chromium(binary, tmp_path, srv.url("/"), screenshot=index_png),
            chromium(binary, tmp_path, srv.url(f"/jobs/{seg_job}"), screenshot=job_png),
        ])

    # The table rows were built by the page's script from /api/v1/jobs.
    assert "loading…" not in index_dom
    for job_id, state in ((seg_job, "done"), (failed_job, "failed")):
        assert f'data-job-id="{job_id}"' in index_dom and f'data-state="{state}"' in index_dom
        assert f'href="/jobs/{job_id}"' in index_dom
    assert index_dom.count("<tr data-job-id=") == 4
    assert 'class="badge badge-done" title="node health">healthy<' in index_dom  # /healthz answered 200

    # The job page: events, timings, findings and the key images (blob URLs).
    assert f"Job #{seg_job}" in job_dom
    assert "inference" in job_dom and "4.2 s" in job_dom and "1 finding(s)" in job_dom
    assert job_dom.count('data-key-image="') == 2 and 'src="blob:' in job_dom
    assert "anomaly area" in job_dom and "largest anomaly area first" in job_dom
    # The failed training-domain check: a visible warning listing the warnings, escaped.
    box = job_dom.split('id="domain-warning"', 1)[1].split("</div>", 1)[0]
    assert "hidden" not in box.split(">", 1)[0]
    assert "outside the model's training domain" in box
    assert "<li>slice thickness 8.0 mm is outside the training range 1.0-6.0 mm</li>" in box
    assert "<li>&lt;b&gt;spacing&lt;/b&gt; &amp; more</li>" in box and "<b>" not in box

    check_screenshot(index_png)
    shot = check_screenshot(job_png)
    red = (shot[..., 0] > 200) & (shot[..., 1] < 40) & (shot[..., 2] < 40)
    assert red.sum() > 50  # the outlines are visible on the page


def test_dashboard_with_read_token(tmp_path: Path, sqlite_url: str) -> None:
    binary = require_tool("chromium")
    settings = make_settings(tmp_path, sqlite_url, http__api_token=TOKEN, http__read_requires_token="true")
    node = Node.from_settings(settings, migrate=True)
    try:
        seeded = seed(node)
        with Server(node) as srv:
            without, with_token = run_all([
                chromium(binary, tmp_path, srv.url("/")),
                chromium(binary, tmp_path, srv.url(f"/?token={TOKEN}")),
            ])
        assert "requires an API token" in without and "<tr data-job-id=" not in without
        assert f'data-job-id="{seeded.done}"' in with_token and "requires an API token" not in with_token
    finally:
        node.close()
