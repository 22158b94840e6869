"""Reorientation to axial and the training-domain check."""

from __future__ import annotations

import numpy as np
import pytest

from worker.engine.domain import check_domain, describe, domain_record
from worker.engine.orient import to_axial
from worker.engine.volume import Volume

SAGITTAL = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)  # index x -> anterior, y -> inferior, z -> left


def test_sagittal_series_is_read_as_axial_exactly() -> None:
    rng = np.random.default_rng(0)
    vol = Volume(rng.random((5, 6, 7)).astype(np.float32), (2.0, 1.0, 1.5), (10.0, 20.0, 30.0), SAGITTAL)
    ax, o = to_axial(vol)
    np.testing.assert_allclose(ax.direction, np.eye(3), atol=1e-12)
    for idx in [(0, 0, 0), (1, 2, 3), (6, 4, 2)]:
        if any(i >= n for i, n in zip(idx, ax.shape)):
            continue
        p = ax.index_to_patient(np.array(idx, float))
        src = np.linalg.solve(vol.direction * np.array(vol.spacing[::-1]), p - np.array(vol.origin))[::-1]
        assert ax.array[idx] == vol.array[tuple(np.round(src).astype(int))]
    np.testing.assert_array_equal(o.back(ax.array), vol.array)


def test_axial_series_is_untouched() -> None:
    vol = Volume(np.zeros((3, 4, 5), np.float32))
    ax, o = to_axial(vol)
    assert o.identity and ax is vol


def test_predictor_gives_the_same_answer_on_a_sagittal_copy(tiny_ckpt) -> None:  # type: ignore[no-untyped-def]
    from worker.engine.predictor import Predictor
    from worker.engine.synthetic import make_case

    pred = Predictor.from_checkpoint(tiny_ckpt, device="cpu")
    pred.preprocess_cfg.reorient = True
    vol = make_case(3, shape=(12, 32, 32), spacing=(8.0, 6.0, 6.0)).volume
    axial = pred.components(vol)
    # the same voxels stored as a sagittal series: index x -> patient z, y -> -y, z -> x
    arr = vol.array.transpose(2, 1, 0)[:, ::-1, :]
    d = np.array([[0, 0, 1], [0, -1, 0], [1, 0, 0]], float)
    origin = vol.index_to_patient(np.array([0, vol.shape[1] - 1, 0], float))
    sag = Volume(np.ascontiguousarray(arr), (vol.spacing[2], vol.spacing[1], vol.spacing[0]), tuple(origin), d)
    ax2, o2 = to_axial(sag)
    np.testing.assert_array_equal(ax2.array, vol.array)
    comp = pred.components(sag)
    for k, m in axial.maps.items():
        np.testing.assert_allclose(o2.forward(comp.maps[k]), m, atol=1e-5)
    np.testing.assert_array_equal(o2.forward(comp.region), axial.region)


def _measures(**kw: float) -> dict[str, float]:
    base = {"slice_spacing_mm": 3.0, "inplane_spacing_mm": 0.9, "inplane_anisotropy": 1.0, "region_volume_ml": 1400.0,
            "region_extent_mm": 150.0, "intensity_median": 0.6, "intensity_iqr": 0.3}
    base.update(kw)
    return base


def test_domain_check_flags_what_training_never_saw() -> None:
    rec = domain_record([_measures(slice_spacing_mm=1.0), _measures(slice_spacing_mm=6.0)])
    assert rec["ranges"]["slice_spacing_mm"] == [1.0, 6.0]
    ok = check_domain(rec, _measures(slice_spacing_mm=4.0))
    assert ok["in_domain"] and ok["warnings"] == []
    bad = check_domain(rec, _measures(slice_spacing_mm=8.0, region_volume_ml=300.0))
    assert not bad["in_domain"]
    assert not bad["checks"]["slice_spacing_mm"]["ok"] and bad["checks"]["slice_spacing_mm"]["value"] == 8.0
    assert any(w.startswith("slice spacing 8 mm is outside the training range 1-6 mm") for w in bad["warnings"])
    assert any("brain" in w for w in bad["warnings"])
    assert check_domain(None, _measures()) == {}
    with pytest.raises(ValueError):
        domain_record([])


def test_describe_measures_a_volume() -> None:
    arr = np.zeros((10, 20, 20), np.float32)
    region = np.zeros(arr.shape, bool)
    region[2:8, 5:15, 5:15] = True
    vol = Volume(arr, (3.0, 1.0, 0.5))
    m = describe(vol, region, np.linspace(0, 1, 101))
    assert m["region_volume_ml"] == pytest.approx(600 * 1.5 / 1000)
    assert m["region_extent_mm"] == 18.0
    assert m["inplane_anisotropy"] == 2.0
    assert m["intensity_median"] == pytest.approx(0.5)
