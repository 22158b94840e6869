"""Server-side key images: a real SEG built with highdicom over real stored
slices; the PNG has the slice's size and red pixels exactly on the mask's
outline."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api_seed import AUTH, FakeDispatcher, advance, assemble, build_seg, gradient_series, ingest, save_seg_output
from pacs_node.api.app import create_app
from pacs_node.api.render import outline
from pacs_node.jobs.states import JobState
from pacs_node.node import Node

ROWS, COLS, SLICES = 24, 32, 5


def _png(c: TestClient, url: str) -> np.ndarray:
    r = c.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (COLS, ROWS)
    return np.asarray(img)


def _red(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] == 255) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0)


def test_outline_is_the_inner_boundary() -> None:
    mask = np.zeros((8, 10), bool)
    mask[2:6, 3:9] = True
    expected = mask.copy()
    expected[3:5, 4:8] = False
    assert np.array_equal(outline(mask), expected)
    assert outline(np.zeros((4, 4), bool)).sum() == 0
    full = np.ones((3, 3), bool)  # touches the border everywhere but the centre
    assert outline(full).sum() == 8


@pytest.mark.parametrize("omit_empty_frames", [False, True])
def test_key_images_outline_the_seg_mask(api_node: Node, omit_empty_frames: bool) -> None:
    series = gradient_series(SLICES, ROWS, COLS)
    ingest(api_node, series)
    (job_id,) = assemble(api_node)
    advance(api_node, job_id, JobState.RUNNING, JobState.DONE)
    ordered = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))
    mask = np.zeros((SLICES, ROWS, COLS), bool)
    mask[1, 5:13, 8:20] = True  # 96 px: the largest
    yy, xx = np.mgrid[0:ROWS, 0:COLS]
    mask[3] = (yy - 15) ** 2 + (xx - 22) ** 2 <= 9  # a small disc (29 px)
    seg = build_seg(ordered, mask, omit_empty_frames=omit_empty_frames)
    save_seg_output(api_node, job_id, seg)

    with TestClient(create_app(api_node, dispatcher=FakeDispatcher()), headers=AUTH) as c:
        info = c.get(f"/jobs/{job_id}/keyimages").json()
        assert info["has_seg"] is True and info["has_findings"] is True and info["slices"] == SLICES
        assert [(k["n"], k["slice_index"], k["area_px"]) for k in info["images"]] == [
            (0, 1, 96),
            (1, 3, int(mask[3].sum())),
        ]
        assert info["images"][0]["sop_instance_uid"] == ordered[1].SOPInstanceUID
        assert info["images"][0]["url"] == f"/jobs/{job_id}/keyimages/0.png"

        first = _png(c, info["images"][0]["url"])
        expected = np.zeros((ROWS, COLS), bool)
        expected[5:13, 8:20] = True
        expected[6:12, 9:19] = False
        assert np.array_equal(_red(first), expected)
        gray = ~expected
        assert np.array_equal(first[gray][:, 0], first[gray][:, 1])  # grayscale elsewhere
        assert np.ptp(first[gray][:, 0]) > 100  # windowed, not uniform

        second = _png(c, f"/jobs/{job_id}/keyimages/1.png")
        assert np.array_equal(_red(second), outline(mask[3]))
        assert c.get(f"/jobs/{job_id}/keyimages/2.png").status_code == 404
        assert c.get(f"/jobs/{job_id}/keyimages/9.png").status_code == 422
        assert c.get("/jobs/987654/keyimages/0.png").status_code == 404
        r = c.get(f"/jobs/{job_id}/keyimages/0.png", params={"download": "true"})
        assert r.headers["content-disposition"] == f'attachment; filename="job-{job_id}-key-0.png"'


def test_key_image_without_seg_is_the_middle_slice(api_node: Node) -> None:
    series = gradient_series(SLICES, ROWS, COLS)
    ingest(api_node, series)
    (job_id,) = assemble(api_node)
    middle = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))[SLICES // 2]
    with TestClient(create_app(api_node, dispatcher=FakeDispatcher()), headers=AUTH) as c:
        info = c.get(f"/jobs/{job_id}/keyimages").json()
        assert info["has_seg"] is False and info["has_findings"] is False
        assert "no findings" in info["message"] and "queued" in info["message"]
        assert [(k["slice_index"], k["area_px"], k["outlined"]) for k in info["images"]] == [(SLICES // 2, 0, False)]
        assert info["images"][0]["sop_instance_uid"] == middle.SOPInstanceUID
        rgb = _png(c, f"/jobs/{job_id}/keyimages/0.png")
        assert not _red(rgb).any()
        # The middle slice's own gradient (offset 5 * index): brighter than the first slice's.
        assert np.array_equal(rgb[..., 0], rgb[..., 2])
        advance(api_node, job_id, JobState.RUNNING, JobState.DONE)
        assert c.get(f"/jobs/{job_id}/keyimages").json()["message"] == "no findings; middle slice shown"
