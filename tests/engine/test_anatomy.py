"""Generated heads from the MNI template and the lesions put into them."""

from __future__ import annotations

import numpy as np
import pytest

from worker.engine.anatomy import CONTRASTS, SubjectConfig, Tissue, load_template, make_subject, tissue_means
from worker.engine.lesions import LESION_KINDS, inject_into_volume, make_lesion_subject, size_class

# coarse grids keep each subject well under a second
SMALL = SubjectConfig(inplane_spacing=(1.8, 2.0), slice_thickness=(4.0, 6.0), partial_coverage=0.0)


def test_template_is_real_anatomy() -> None:
    tpl = load_template()
    brain = tpl.maps[tpl.BRAIN] > 0.5
    ml = brain.sum() / 1000.0  # 1 mm voxels
    assert 1200 < ml < 2200, ml
    gm, wm = tpl.maps[tpl.GM][brain], tpl.maps[tpl.WM][brain]
    t1 = tpl.maps[tpl.T1][brain]
    # T1: white matter brighter than grey matter in the template itself
    assert np.median(t1[wm > 0.9]) > np.median(t1[gm > 0.9]) + 0.2
    # the extra-cerebral shell grows outside the brain's hull, which holds the whole brain
    assert (tpl.maps[tpl.DIST][brain] <= 0).all()
    assert (tpl.maps[tpl.DIST] > 10).any()


def test_template_is_in_the_dicom_patient_frame() -> None:
    """Array axes (z, y, x) run superior, posterior, left (LPS), as a DICOM axial series: the
    cerebellum (the brain's lowest slices) lies behind the brain's centre."""
    tpl = load_template()
    brain = tpl.maps[tpl.BRAIN] > 0.5
    zs = np.nonzero(brain.any(axis=(1, 2)))[0]
    inferior = np.argwhere(brain[zs[0]:zs[0] + 25])
    assert inferior[:, 1].mean() > tpl.center[1] + 15


def test_subject_is_deterministic_and_distinct() -> None:
    a, b, c = make_subject(7, SMALL), make_subject(7, SMALL), make_subject(8, SMALL)
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    assert a.volume.shape != c.volume.shape or not np.array_equal(a.volume.array, c.volume.array)
    assert a.params["contrast"] in CONTRASTS
    assert not a.mask.any()


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_contrast_order_follows_the_sequence(contrast: str) -> None:
    seen: dict[str, float] = {}

    def spy(t: Tissue) -> tuple[np.ndarray, list[object]]:
        for k in ("wm", "gm", "csf"):
            seen[k] = float(np.median(t.image[t.probs[k] > 0.9])) if (t.probs[k] > 0.9).any() else float("nan")
        return t.image, []

    s = make_subject(3, SMALL, contrast=contrast, lesion_fn=spy)
    assert s.params["contrast"] == contrast
    if contrast == "t1":
        assert seen["wm"] > seen["gm"] > seen["csf"]
    elif contrast == "t2":
        assert seen["csf"] > seen["gm"] > seen["wm"]
    elif contrast == "flair":
        assert seen["gm"] > seen["wm"] > seen["csf"]
    else:
        assert seen["gm"] > seen["wm"]


def test_geometry_follows_the_configuration() -> None:
    cfg = SubjectConfig(inplane_spacing=(1.0, 1.2), slice_thickness=(5.0, 6.0), partial_coverage=1.0)
    s = make_subject(11, cfg)
    sz, sy, sx = s.volume.spacing
    assert 1.0 <= sy <= 1.2 and sy == sx
    assert 5.0 <= sz <= 6.6
    lo, hi = s.params["coverage_mm"]
    assert hi - lo < 150  # a slab, not the whole brain
    brain_ml = s.brain.sum() * s.volume.voxel_volume_mm3 / 1000.0
    assert 100 < brain_ml < 2000


def test_unknown_contrast_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown contrast"):
        tissue_means("t7", np.random.default_rng(0))


@pytest.mark.parametrize("kind", list(LESION_KINDS))
def test_each_lesion_kind_has_an_exact_mask_inside_the_brain(kind: str) -> None:
    s = make_lesion_subject(21, SMALL, contrast="flair", kinds={kind: 1.0}, n=(1, 1))
    assert s.lesions and s.mask.any()
    assert not (s.mask & ~s.brain).any()
    les = s.lesions[0]
    assert les.kind == kind
    assert les.volume_ml == pytest.approx(les.mask.sum() * s.volume.voxel_volume_mm3 / 1000.0)
    assert les.to_dict()["size"] == size_class(les.volume_ml)
    # mean change of the noise-free image inside the mask, relative to white matter
    assert les.contrast > 0.05


def test_flair_white_matter_hyperintensities_are_bright() -> None:
    s = make_lesion_subject(5, SMALL, contrast="flair", kinds={"wmh": 1.0}, n=(1, 1))
    a = s.volume.array
    assert np.median(a[s.mask]) > 1.15 * np.median(a[s.brain & ~s.mask])


def test_unknown_lesion_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown lesion kind"):
        make_lesion_subject(1, SMALL, kinds={"abscess": 1.0})


def test_injection_into_a_real_series_changes_only_its_mask() -> None:
    s = make_subject(9, SMALL)
    vol, mask = inject_into_volume(s.volume, s.brain, np.random.default_rng(0))
    assert mask.any() and not (mask & ~s.brain).any()
    changed = np.abs(vol.array - s.volume.array) > 1e-3
    assert changed[mask].mean() > 0.9
    assert not changed[~s.brain].any()
