"""Synthetic phantoms and anomalies."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from worker.engine.synthetic import ANOMALY_KINDS, inject_anomalies, make_case, make_phantom


def test_deterministic_and_varied() -> None:
    a, b, c = make_case(5), make_case(5), make_case(6)
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.volume.array, c.volume.array)
    assert a.volume.array.dtype == np.float32 and a.volume.modality == "MR"


def test_normal_has_no_mask_and_anatomy() -> None:
    case = make_case(1, anomalous=False)
    assert not case.mask.any() and not case.anomalies
    _, lab = make_phantom(np.random.default_rng(0))
    assert {1, 2, 3, 5} <= set(np.unique(lab).tolist())


def test_every_kind_changes_the_image_inside_its_mask() -> None:
    rng = np.random.default_rng(0)
    img, lab = make_phantom(rng)
    for kind in ANOMALY_KINDS:
        out, gt, (an,) = inject_anomalies(img, lab, np.random.default_rng(1), n=1, kinds={kind: 1.0})
        assert an.kind == kind and gt.sum() == an.voxel_count > 10
        assert np.abs(out - img)[gt].mean() > 0.01
        assert np.abs(out - img)[~np.pad(gt, 0)].max() < 0.6
    with pytest.raises(ValueError):
        inject_anomalies(img, lab, rng, kinds={"nope": 1.0})


def test_most_anomalies_defeat_intensity_thresholding() -> None:
    cases = [make_case(1_000_000 + i) for i in range(24)]
    anomalies = [a for c in cases for a in c.anomalies]
    kinds = Counter(a.kind for a in anomalies)
    assert len(kinds) >= 4
    assert sum(not a.intensity_detectable for a in anomalies) >= 0.5 * len(anomalies)
    assert all(c.mask.any() for c in cases)


def test_per_anomaly_voxels_make_up_the_case_mask() -> None:
    import numpy as np

    from worker.engine.synthetic import make_case

    for seed in range(1_000_000, 1_000_006):
        c = make_case(seed)
        union = np.zeros(c.mask.size, bool)
        for a in c.anomalies:
            assert len(a.voxels) == a.voxel_count
            union[a.voxels] = True
        assert np.array_equal(union.reshape(c.mask.shape), c.mask)


def test_anomaly_masks_split_the_case_mask() -> None:
    for seed in range(1_000_000, 1_000_008):
        c = make_case(seed)
        masks = c.anomaly_masks()
        assert len(masks) == len(c.anomalies)
        union = np.zeros(c.mask.shape, bool)
        for a, m in zip(c.anomalies, masks):
            assert m.shape == c.mask.shape and m.dtype == bool and int(m.sum()) == a.voxel_count
            union |= m
        assert np.array_equal(union, c.mask)
    assert make_case(1_500_000, anomalous=False).anomaly_masks() == []


def test_held_out_test_set_is_unchanged() -> None:
    """The published quality figures are measured on these volumes: the generator must keep its draws."""
    import hashlib

    h = hashlib.sha256()
    for seed, anomalous in ((1_000_000, True), (1_000_001, True), (1_000_002, True), (1_500_000, False)):
        c = make_case(seed, anomalous=anomalous)
        h.update(c.volume.array.tobytes())
        h.update(c.mask.tobytes())
    assert h.hexdigest() == "8ef7b5fa668f385b87aeee0e88c2bc18c539c47f9a45657c1a34cc5b402f3ec7"
