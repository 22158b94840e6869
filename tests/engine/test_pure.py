"""Pure functions with known answers: normalisation, scores, threshold, post-processing, findings."""

from __future__ import annotations

import numpy as np
import pytest

from worker.engine.postprocess import clean_mask, extract_findings, study_score
from worker.engine.preprocess import (
    PreprocessConfig,
    PreprocessError,
    context_stack,
    erode_mm,
    foreground_mask,
    from_model_grid,
    normalize,
    to_model_grid,
)
from worker.engine.scoring import (
    ScoringConfig,
    calibrate_threshold,
    fuse,
    intensity_outlier,
    median_smooth,
    pixel_zscore,
    residual_map,
    ssim_map,
    to_unit,
)
from worker.engine.volume import Volume


def test_ct_window_normalisation() -> None:
    cfg = PreprocessConfig(ct_window=(40.0, 80.0), clip=(-0.5, 2.0))
    a = np.array([[[0.0, 40.0, 80.0, 1000.0, -1000.0]]], np.float32)
    fg = np.ones_like(a, bool)
    out = normalize(a, fg, "CT", cfg)
    np.testing.assert_allclose(out[0, 0], [0.0, 0.5, 1.0, 2.0, -0.5])


def test_mr_percentile_and_zscore_normalisation() -> None:
    a = np.zeros((1, 10, 101), np.float32)
    a[0, 2:8, :] = np.arange(101, dtype=np.float32)
    fg = a > 0
    fg[0, 2:8, 0] = True
    out = normalize(a, fg, "MR", PreprocessConfig(mr_percentiles=(0.0, 100.0)))
    assert out[0, 5, 0] == pytest.approx(0.0) and out[0, 5, 100] == pytest.approx(1.0)
    assert out[0, 5, 50] == pytest.approx(0.5)
    assert np.all(out[~fg] == 0)
    z = normalize(a, fg, "MR", PreprocessConfig(mr_method="zscore", clip=(-10, 10)))
    assert z[fg].mean() == pytest.approx(0.0, abs=1e-5) and z[fg].std() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(PreprocessError):
        normalize(np.ones((1, 4, 4), np.float32), np.ones((1, 4, 4), bool), "MR", PreprocessConfig())


def test_foreground_mask_fills_and_keeps_largest() -> None:
    a = np.zeros((3, 40, 40), np.float32)
    yy, xx = np.mgrid[:40, :40]
    ring = ((yy - 20) ** 2 + (xx - 20) ** 2 < 15**2) & ((yy - 20) ** 2 + (xx - 20) ** 2 > 9**2)
    a[:, ring] = 100.0
    a[:, 1:5, 1:5] = 100.0  # small disconnected speck (survives the opening)
    m = foreground_mask(a, "MR", PreprocessConfig())
    assert m[1, 20, 20]  # hole filled
    assert not m[1, 1, 1]  # speck removed
    with pytest.raises(PreprocessError):
        foreground_mask(np.full((2, 8, 8), -1000.0, np.float32), "CT", PreprocessConfig())


def test_erode_mm_is_anisotropic() -> None:
    m = np.zeros((5, 30, 30), bool)
    m[:, 5:25, 5:25] = True
    e = erode_mm(m, (5.0, 1.0, 1.0), 3.0)  # 3 px in-plane, 0 through-plane
    assert e[0, 8:22, 8:22].all() and not e[0, 7, 10] and e.any(axis=(1, 2)).all()


def test_residual_ssim_and_unit_map() -> None:
    x = np.zeros((2, 16, 16), np.float32)
    r = x.copy()
    r[1, 4, 4] = 0.5
    np.testing.assert_allclose(residual_map(x, r).max(), 0.5)
    assert residual_map(x, x).max() == 0
    assert np.abs(ssim_map(x, x)).max() < 1e-6 and ssim_map(x, r)[1, 4, 4] > 0.1
    np.testing.assert_allclose(to_unit(np.array([0.0, 1.0, 2.0, 9.0]), 2.0), [0.0, 0.25, 0.5, 1.0])


def test_intensity_outlier_and_zscore() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 0.01, (1, 20, 20)).astype(np.float32)
    x[0, 10, 10], x[0, 5, 5] = 1.0, 0.0
    region = np.ones_like(x, bool)
    bright = intensity_outlier(x, region, "bright")
    dark = intensity_outlier(x, region, "dark")
    both = intensity_outlier(x, region, "both")
    assert bright[0, 10, 10] > 20 and bright[0, 5, 5] == 0
    assert dark[0, 5, 5] > 20 and dark[0, 10, 10] == 0
    np.testing.assert_allclose(both, np.maximum(bright, dark))
    z = pixel_zscore(np.full((1, 2, 2), 0.7, np.float32), np.full((1, 2, 2), 0.5), np.full((1, 2, 2), 0.1))
    np.testing.assert_allclose(z, 2.0, rtol=1e-6)


def test_median_removes_isolated_voxel() -> None:
    s = np.zeros((5, 9, 9), np.float32)
    s[2, 4, 4] = 1.0
    assert median_smooth(s, (3, 3, 3)).max() == 0
    s[1:4, 3:6, 3:6] = 1.0
    assert median_smooth(s, (3, 3, 3))[2, 4, 4] == 1.0


def test_calibrated_threshold_hits_target_fpr() -> None:
    rng = np.random.default_rng(1)
    normal = rng.normal(size=200_000)
    t = calibrate_threshold(normal, 0.005)
    assert np.mean(normal > t) == pytest.approx(0.005, abs=2e-4)
    assert calibrate_threshold(np.arange(1000.0), 0.01) == 990.0
    with pytest.raises(ValueError):
        calibrate_threshold(normal, 1.5)
    with pytest.raises(ValueError):
        calibrate_threshold(np.array([]), 0.01)


def test_fuse_combined() -> None:
    comps = {"residual": np.array([1.0, 2.0]), "intensity:both": np.array([3.0, 0.0])}
    cfg = ScoringConfig(method="combined", scales={"residual": 2.0, "intensity:both": 3.0}, combine_weight=0.5)
    np.testing.assert_allclose(fuse(comps, cfg), [0.5 + 0.5, 1.0])
    with pytest.raises(ValueError):
        fuse({"residual": comps["residual"]}, cfg)


def test_clean_mask_removes_small_fills_holes_and_sorts() -> None:
    m = np.zeros((6, 20, 20), bool)
    m[1:5, 2:9, 2:9] = True
    m[2:4, 4:7, 4:7] = False  # enclosed cavity
    m[1:3, 12:15, 12:15] = True  # 18 voxels
    m[5, 18, 18] = True  # 1 voxel
    lab, n = clean_mask(m, (2.0, 1.0, 1.0), min_volume_mm3=20.0, closing=False)
    assert n == 2
    assert (lab == 1).sum() == 4 * 7 * 7  # cavity filled, largest first
    assert (lab == 2).sum() == 18
    assert lab[5, 18, 18] == 0
    lab2, n2 = clean_mask(m, (2.0, 1.0, 1.0), min_volume_mm3=40.0)
    assert n2 == 1


def test_findings_geometry() -> None:
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # x-index → patient y
    vol = Volume(np.zeros((4, 10, 12), np.float32), spacing=(3.0, 2.0, 1.5), origin=(10.0, 20.0, 30.0),
                 direction=direction)
    lab = np.zeros(vol.shape, np.int32)
    lab[1:3, 2:5, 6:8] = 1  # centre index (1.5, 3, 6.5)
    amap = np.zeros(vol.shape, np.float32)
    amap[1:3, 2:5, 6:8] = 0.6
    amap[2, 3, 7] = 0.9
    (f,) = extract_findings(lab, amap, vol)
    assert f.voxel_count == 12 and f.volume_mm3 == pytest.approx(12 * 9.0)
    assert f.bbox_zyx == (1, 2, 6, 2, 4, 7)
    # x index 6.5*1.5 mm along patient y; y index 3*2 mm along patient x; z 1.5*3 mm along z
    np.testing.assert_allclose(f.centroid_patient, (10.0 + 6.0, 20.0 + 9.75, 30.0 + 4.5))
    assert f.max_score == pytest.approx(0.9) and f.mean_score == pytest.approx((11 * 0.6 + 0.9) / 12)
    assert extract_findings(np.zeros_like(lab), amap, vol) == []


def test_study_score() -> None:
    s = np.zeros(1000)
    s[:10] = 4.0
    assert study_score(s, 2.0, 10) == pytest.approx(2.0)
    assert study_score(s, 2.0, 20) == pytest.approx(1.0)


def test_model_grid_round_trip_is_aligned() -> None:
    vol = Volume(np.zeros((3, 45, 70), np.float32), spacing=(5.0, 1.1, 0.7), origin=(1.0, 2.0, 3.0),
                 direction=np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    yy, xx = np.mgrid[:45, :70]
    smooth = np.sin(yy / 9.0) + np.cos(xx / 13.0)
    arr = np.repeat(smooth[None], 3, 0).astype(np.float32)
    m = to_model_grid(vol, arr, (32, 32))
    back = from_model_grid(vol, m)
    assert back.shape == vol.shape
    assert np.abs(back - arr)[:, 2:-2, 2:-2].max() < 0.05
    # a box maps back onto the same pixels (centroid within half a pixel)
    box = np.zeros(vol.shape, np.float32)
    box[:, 20:30, 40:60] = 1.0
    b = from_model_grid(vol, to_model_grid(vol, box, (32, 32))) > 0.5
    np.testing.assert_allclose(np.argwhere(b).mean(0), np.argwhere(box > 0).mean(0), atol=0.5)


def test_context_stack_edges() -> None:
    img = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    st = context_stack(img, 1)
    assert st.shape == (4, 3, 2, 2)
    np.testing.assert_array_equal(st[:, :, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])


def test_volume_index_to_patient() -> None:
    v = Volume(np.zeros((2, 3, 4)), spacing=(2.0, 3.0, 4.0), origin=(1.0, 1.0, 1.0))
    np.testing.assert_allclose(v.index_to_patient((1, 1, 1)), (5.0, 4.0, 3.0))
    img = v.to_sitk()
    np.testing.assert_allclose(img.TransformContinuousIndexToPhysicalPoint((1.0, 1.0, 1.0)), (5.0, 4.0, 3.0))
    with pytest.raises(ValueError):
        Volume(np.zeros((3, 3)))


def test_edge_aware_residual_and_smoothing() -> None:
    x = np.zeros((1, 16, 16), np.float32)
    recon = np.zeros_like(x)
    recon[:, :, 8:] = 1.0  # a vertical edge in the reconstruction
    x[:, :, :] = recon + 0.1
    plain = residual_map(x, recon)
    aware = residual_map(x, recon, edge_weight=10.0)
    np.testing.assert_allclose(plain, 0.1, rtol=1e-6)
    assert aware[0, 4, 8] < 0.05 and aware[0, 4, 2] == pytest.approx(0.1)
    spike = np.zeros((9, 15, 15), np.float32)
    spike[4, 7, 7] = 1.0
    sm = median_smooth(spike, (1, 1, 1), sigma=1.0)
    assert sm.sum() == pytest.approx(1.0, rel=1e-3) and sm.max() < 0.2


def test_combined_with_pixel_zscore_keys() -> None:
    from worker.engine.scoring import component_keys

    assert component_keys(ScoringConfig(method="combined", combine_with="pixel_zscore", polarity="bright")) == [
        "residual", "pixel_zscore:bright"]
    with pytest.raises(ValueError):
        ScoringConfig.from_dict({"method": "combined", "combine_with": "nope"})


def test_feature_residual_and_combined_with_feature_keys() -> None:
    from worker.engine.scoring import component_keys, feature_residual

    rng = np.random.default_rng(3)
    f = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(feature_residual(f, f), np.zeros((2, 5, 6), np.float32))
    g = f.copy()
    g[1, :, 2, 3] += np.array([1.0, -2.0, 3.0, 0.0], np.float32)  # mean |difference| over 4 channels = 1.5
    r = feature_residual(f, g)
    assert r.dtype == np.float32 and r.shape == (2, 5, 6)
    assert r[1, 2, 3] == pytest.approx(1.5) and np.count_nonzero(r) == 1
    with pytest.raises(ValueError):
        feature_residual(f, f[:, :3])
    with pytest.raises(ValueError):
        feature_residual(f[0], f[0])
    assert component_keys(ScoringConfig(method="combined", combine_with="feature")) == ["residual", "feature"]
    cfg = ScoringConfig.from_dict({"method": "combined", "combine_with": "feature", "combine_weight": 0.25,
                                   "scales": {"residual": 2.0, "feature": 4.0}})
    np.testing.assert_allclose(fuse({"residual": np.array([2.0]), "feature": np.array([8.0])}, cfg), [1.5])
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ScoringConfig.from_dict({"method": "combined", "combine_with": "feature", "combine_weight": bad})


def _clean_mask_full_volume(mask: np.ndarray, spacing: tuple[float, float, float], min_mm3: float) -> np.ndarray:
    """Reference: the same operations on the whole volume (no bounding-box crop)."""
    from scipy import ndimage as ndi

    st = ndi.generate_binary_structure(2, 1)[None]
    m = ndi.binary_closing(np.pad(mask, 1), structure=st)[1:-1, 1:-1, 1:-1] | mask
    m = ndi.binary_fill_holes(m)
    lab, n = ndi.label(m, structure=np.ones((3, 3, 3), bool))
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    keep = counts * float(np.prod(spacing)) >= min_mm3
    keep[0] = False
    return keep[lab]


@pytest.mark.parametrize("seed", range(6))
def test_clean_mask_crop_matches_full_volume(seed: int) -> None:
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    m = ndi.gaussian_filter(rng.random((12, 40, 48)), 1.5) > 0.55 - 0.01 * seed
    if seed % 2:
        m[:, :, 0] |= rng.random((12, 40)) > 0.5  # touches the volume border
    m[5, 10:20, 10:20] = True
    m[5, 13:16, 13:16] = False  # an enclosed hole
    labels, n = clean_mask(m, (2.0, 1.0, 1.0), 20.0)
    assert np.array_equal(labels > 0, _clean_mask_full_volume(m, (2.0, 1.0, 1.0), 20.0))
    sizes = np.bincount(labels.ravel())[1:]
    assert len(sizes) == n and np.all(np.diff(sizes) <= 0)
    assert clean_mask(np.zeros((3, 4, 5), bool), (1.0, 1.0, 1.0), 0.0)[1] == 0


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_3d_and_cross_closing_match_scipy(seed: int) -> None:
    from scipy import ndimage as ndi

    from worker.engine.morphology import dilate_2d, erode_2d
    from worker.engine.postprocess import fill_holes_3d

    rng = np.random.default_rng(seed)
    st = ndi.generate_binary_structure(2, 1)[None]
    for shape in [(6, 20, 24), (1, 5, 5), (3, 1, 7), (2, 2, 2)]:
        m = ndi.gaussian_filter(rng.random(shape), 1.0) > rng.uniform(0.4, 0.6)
        m[:, 0, :] |= rng.random((shape[0], shape[2])) > 0.5  # touches a face
        assert np.array_equal(fill_holes_3d(m), ndi.binary_fill_holes(m)), shape
        assert np.array_equal(dilate_2d(m, square=False), ndi.binary_dilation(m, structure=st)), shape
        assert np.array_equal(erode_2d(m, square=False), ndi.binary_erosion(m, structure=st)), shape
        sq = np.ones((1, 3, 3), bool)
        assert np.array_equal(erode_2d(m, square=True), ndi.binary_erosion(m, structure=sq)), shape
        assert np.array_equal(dilate_2d(m, square=True), ndi.binary_dilation(m, structure=sq)), shape
    shell = np.zeros((7, 7, 7), bool)
    shell[1:6, 1:6, 1:6] = True
    shell[3, 3, 3] = False  # an enclosed cavity is filled
    assert fill_holes_3d(shell)[3, 3, 3] and fill_holes_3d(np.ones((2, 2, 2), bool)).all()


def test_study_score_uses_the_top_voxels_even_when_few_are_positive() -> None:
    s = np.zeros((4, 8, 8), np.float32)
    s[0, 0, :3] = [4.0, 2.0, 3.0]
    assert study_score(s, 1.0, 2) == pytest.approx(3.5)
    assert study_score(s, 2.0, 5) == pytest.approx(9.0 / 5 / 2)  # pads with zeros
    neg = -np.ones((2, 2, 2), np.float32)
    assert study_score(neg, 1.0, 3) == pytest.approx(-1.0)


def test_context_stride_and_strided_stack() -> None:
    from worker.engine.preprocess import context_stride

    assert context_stride(1.0, 4.0) == 4 and context_stride(4.0, 4.0) == 1 and context_stride(6.0, 4.0) == 1
    assert context_stride(1.5, 4.0) == 3 and context_stride(2.0, None) == 1
    with pytest.raises(ValueError):
        context_stride(0.0, 4.0)
    img = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    st = context_stack(img, 1, 3)
    assert st.shape == (10, 3, 2, 2)
    assert st[5, :, 0, 0].tolist() == [2.0, 5.0, 8.0] and st[1, :, 0, 0].tolist() == [0.0, 1.0, 4.0]
    with pytest.raises(ValueError):
        context_stack(img, 1, 0)


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_2d_matches_scipy_per_slice(seed: int) -> None:
    from scipy import ndimage as ndi

    from worker.engine.preprocess import fill_holes_2d

    rng = np.random.default_rng(seed)
    m = ndi.gaussian_filter(rng.random((6, 30, 34)), 1.2) > 0.5
    m[2, 5:15, 5:15] = True
    m[2, 8:11, 8:11] = False  # a hole
    m[3, 0:10, 0:10] = True
    m[3, 0:4, 0:4] = False  # touches the border: not a hole
    expected = np.stack([ndi.binary_fill_holes(s) for s in m])
    assert np.array_equal(fill_holes_2d(m), expected)
    assert fill_holes_2d(np.ones((2, 3, 3), bool)).all()


@pytest.mark.parametrize("seed", range(4))
def test_open_2d_matches_scipy_opening(seed: int) -> None:
    from scipy import ndimage as ndi

    from worker.engine.preprocess import open_2d

    rng = np.random.default_rng(seed)
    for shape in [(3, 17, 23), (1, 3, 3), (2, 1, 9), (2, 2, 2), (4, 40, 5)]:
        m = rng.random(shape) < rng.uniform(0.3, 0.9)
        m[:, 0, :] = True  # set pixels on the slice border: the outside counts as background
        assert np.array_equal(open_2d(m), ndi.binary_opening(m, structure=np.ones((1, 3, 3), bool))), shape


def _reference_foreground(array: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The foreground rule on the whole volume with scipy's own operators."""
    from scipy import ndimage as ndi

    m = array > cfg.fg_fraction * float(np.percentile(array, 99.0))
    m = ndi.binary_opening(m, structure=np.ones((1, 3, 3), bool))
    m = np.stack([ndi.binary_fill_holes(s) for s in m])
    lab, n = ndi.label(m)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes)) if n > 1 else m


@pytest.mark.parametrize("seed", range(4))
def test_foreground_mask_on_its_bounding_box_equals_whole_volume(seed: int) -> None:
    """The clean-up runs on the mask's bounding box; the result must not depend on it,
    also when the head touches the image border or slices are empty."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random((8, 48, 56)), (0.7, 1.5, 1.5))
    a = np.where(field > np.quantile(field, 0.55), 100.0, 0.0).astype(np.float32)
    a += rng.normal(0.0, 2.0, a.shape).astype(np.float32)
    a[0] = 0.0  # an empty end slice
    if seed % 2:
        a[:, :, :3] = 100.0  # bright band on the left border
    else:
        a = np.pad(a, ((0, 0), (5, 7), (4, 6)))  # a head inside the field of view: the box is a crop
    cfg = PreprocessConfig()
    ref = _reference_foreground(a, cfg)
    assert ndi.label(a > 50)[1] > 1 and 0.05 < ref.mean() < 0.9  # several blobs, holes, a real choice
    assert np.array_equal(foreground_mask(a, "MR", cfg), ref)


def test_from_model_grid_single_pass_equals_linear_with_nearest_edges() -> None:
    """The padded single resampling gives what linear + nearest-neighbour edge filling gave."""
    import SimpleITK as sitk

    from worker.engine.preprocess import _model_geometry, _resample, from_model_grid

    rng = np.random.default_rng(3)
    for shape, spacing in (((5, 40, 30), (4.0, 1.1, 0.9)), ((3, 50, 50), (2.0, 0.7, 0.7))):
        vol = Volume(np.zeros(shape, np.float32), spacing, (-10.0, 4.0, 30.0), np.eye(3), "MR", {})
        a = np.deg2rad(20.0)
        vol.direction = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        arr = (rng.random((shape[0], 16, 16)) + 0.1).astype(np.float32)
        sp, org = _model_geometry(vol, (16, 16))
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(sp)
        img.SetOrigin(org)
        img.SetDirection(tuple(vol.direction.reshape(-1)))
        args = (tuple(vol.spacing[::-1]), vol.origin, vol.shape[::-1], tuple(vol.direction.reshape(-1)))
        ref = _resample(img, *args, True)
        near = _resample(img, *args, False)
        ref[ref == 0] = near[ref == 0]
        np.testing.assert_allclose(from_model_grid(vol, arr), ref, atol=1e-5)
