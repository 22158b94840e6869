"""Predictor outputs on the input grid, for anisotropic, non-square, oblique series."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from worker.engine.predictor import Predictor
from worker.engine.synthetic import make_case
from worker.engine.volume import Volume


def _oblique(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 11) -> Volume:
    v = make_case(seed, anomalous=False, shape=shape, spacing=spacing).volume
    a = np.deg2rad(25.0)
    v.direction = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    v.origin = (-40.0, 12.5, 77.0)
    return v


@pytest.mark.parametrize("shape,spacing", [((12, 44, 36), (8.0, 4.5, 5.5)), ((9, 30, 50), (6.0, 6.5, 3.9))])
def test_prediction_on_input_grid(tiny_ckpt: Path, shape, spacing) -> None:
    p = Predictor.from_checkpoint(tiny_ckpt, device="auto")
    vol = _oblique(shape, spacing)
    res = p.predict(vol)
    assert res.mask.shape == shape and res.mask.dtype == bool
    assert res.anomaly_map.shape == shape and res.anomaly_map.dtype == np.float32
    assert 0.0 <= res.anomaly_map.min() and res.anomaly_map.max() <= 1.0
    assert set(res.timings) == {"preprocess", "inference", "postprocess"}
    assert res.threshold == p.scoring.threshold and np.isfinite(res.study_score)
    assert (res.mask <= (res.anomaly_map >= 0.5)).all()  # every mask voxel is above threshold before clean-up fill
    for f in res.findings:
        assert (f.bbox_zyx[3] < shape[0]) and f.voxel_count > 0


def test_mask_lands_on_the_source_pixels(tiny_ckpt: Path) -> None:
    """A bright lesion in a non-square, anisotropic, oblique series is found in place."""
    p = Predictor.from_checkpoint(tiny_ckpt, device="cpu")
    # intensity scoring without smoothing, threshold between normal tissue and
    # the lesion: the test measures geometry, not model quality or blur
    p.scoring = replace(p.scoring, method="intensity", polarity="bright", threshold=1.0, median_size=(1, 1, 1),
                        smooth_sigma=0.0)
    shape, spacing = (12, 44, 36), (8.0, 4.5, 5.5)
    vol = _oblique(shape, spacing)
    box = np.zeros(shape, bool)
    box[4:8, 18:27, 14:21] = True
    vol.array[box] = vol.array[box] * 2.0
    from scipy import ndimage as ndi

    score = p.components(vol).maps["intensity:bright"]
    near = ndi.binary_dilation(box, iterations=2)
    p.scoring.threshold = 0.5 * (float(score[~near].max()) + float(np.median(score[box])))
    res = p.predict(vol)
    inter = (res.mask & box).sum()
    dice = 2 * inter / (res.mask.sum() + box.sum())
    assert dice > 0.8, dice
    np.testing.assert_allclose(np.argwhere(res.mask).mean(0), np.argwhere(box).mean(0), atol=0.5)
    f = res.findings[0]
    expected = vol.index_to_patient(np.argwhere(box).mean(0))
    assert np.linalg.norm(np.asarray(f.centroid_patient) - expected) < max(spacing)
    assert f.volume_mm3 == pytest.approx(f.voxel_count * float(np.prod(spacing)))


def test_predict_is_deterministic(tiny_ckpt: Path) -> None:
    p = Predictor.from_checkpoint(tiny_ckpt, device="cpu")
    vol = make_case(1_000_123, shape=(12, 32, 32), spacing=(8.0, 6.0, 6.0)).volume
    a, b = p.predict(vol), p.predict(vol)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_context_neighbours_are_taken_at_the_training_distance(tiny_ckpt: Path) -> None:
    """Training stores the slice spacing; a thinner series is stacked with the same physical gap."""
    p = Predictor.from_checkpoint(tiny_ckpt, device="cpu")
    assert p.preprocess_cfg.context_mm == 8.0  # tiny_checkpoint trains on 8 mm slices
    seen: list[np.ndarray] = []

    def capture(stack: np.ndarray) -> np.ndarray:
        seen.append(stack)
        return stack[:, stack.shape[1] // 2]

    p.reconstruct = capture  # type: ignore[method-assign]
    vol = make_case(3, anomalous=False, shape=(24, 32, 32), spacing=(2.0, 6.0, 6.0)).volume
    comp = p.components(vol)
    img = comp.pre.image
    stack = seen[0]
    np.testing.assert_array_equal(stack[10, 0], img[6])  # 8 mm / 2 mm = every 4th slice
    np.testing.assert_array_equal(stack[10, 2], img[14])
    np.testing.assert_array_equal(stack[1, 0], img[0])  # edges replicate
