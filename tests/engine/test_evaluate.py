"""``evaluate``: its optional per-study outputs (``EvalOutputs``) and its metrics on hand-made scores."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

from worker.engine.demo import synthetic_cases
from worker.engine.evaluate import EvalOutputs, evaluate
from worker.engine.metrics import auroc, binary_metrics
from worker.engine.predictor import Predictor
from worker.engine.volume import Volume


def test_evaluate_outputs_match_the_summary(tiny_ckpt: Path) -> None:
    pred = Predictor.from_checkpoint(tiny_ckpt, device="cpu")
    cases = synthetic_cases("test", 2, 1, shape=(12, 32, 32), spacing=(8.0, 6.0, 6.0))
    plain = evaluate(pred, cases)
    outs = EvalOutputs()
    res = evaluate(pred, cases, outputs=outs)
    assert res == plain  # same dictionary with or without outputs

    assert "unet" in outs.thresholds and outs.thresholds["unet"] == res["threshold"]
    assert len(outs.regions) == len(outs.truth) == len(cases)
    for key in outs.thresholds:
        assert len(outs.scores[key]) == len(outs.masks[key]) == len(outs.study_scores[key]) == len(cases)
    for (vol, gt), region, truth in zip(cases, outs.regions, outs.truth):
        assert region.shape == vol.shape and region.dtype == bool
        expected = np.zeros(vol.shape, bool) if gt is None else gt
        assert np.array_equal(truth, expected[region])

    s, t = outs.pooled("unet")
    assert auroc(s, t) == pytest.approx(res["auroc"])
    pooled_pred = np.concatenate([m[r] for m, r in zip(outs.masks["unet"], outs.regions)])
    assert binary_metrics(pooled_pred, t)["dice"] == pytest.approx(res["dice"])
    for name, b in res["baselines"].items():
        key = f"{name}:{b['polarity']}"
        bp = np.concatenate([m[r] for m, r in zip(outs.masks[key], outs.regions)])
        assert binary_metrics(bp, t)["dice"] == pytest.approx(b["dice"])
        assert outs.thresholds[key] == b["threshold"]
    with pytest.raises(KeyError):
        outs.pooled("nope")

    # the normal-study false positives are those of the reported (post-processed) masks on the whole grid
    normal = [i for i, (_, gt) in enumerate(cases) if gt is None or not gt.any()]
    assert res["n_normal"] == len(normal) == 1
    ml = [outs.masks["unet"][i].sum() * cases[i][0].voxel_volume_mm3 / 1000 for i in normal]
    assert res["normal_fp_ml_mean"] == pytest.approx(float(np.mean(ml)))
    assert res["normal_any_finding_share"] == float(ml[0] > 0)
    raw = np.concatenate([outs.scores["unet"][i] for i in normal]) >= outs.thresholds["unet"]
    assert res["normal_voxel_fpr"] == pytest.approx(float(raw.mean()))


class _StubPredictor:
    """Duck-typed :class:`Predictor` with hand-made score maps.

    Each volume comes with its foreground and its component maps (zero outside
    the foreground, as the real ones); the stub's post-processing drops
    connected components of one voxel, so the decision before and after
    post-processing differ in a known way.
    """

    def __init__(self, thresholds: dict[str, float]) -> None:
        from worker.engine.scoring import ScoringConfig

        self.scoring = ScoringConfig(method="residual", threshold=thresholds["residual"])
        self.meta = {"method_thresholds": {"residual": thresholds["residual"], "ssim": thresholds["ssim"]},
                     "baselines": {"thresholds": {"intensity:bright": thresholds["intensity:bright"]}}}
        self.cases: list[tuple[object, np.ndarray, dict[str, np.ndarray]]] = []

    def components(self, vol: object, keys: list[str]) -> SimpleNamespace:
        fg, maps = next((f, m) for v, f, m in self.cases if v is vol)
        assert set(keys) <= set(maps)
        return SimpleNamespace(maps={k: maps[k] for k in keys}, pre=SimpleNamespace(fg_source=fg))

    def finalize(self, vol: object, score: np.ndarray,
                 thr: float) -> tuple[np.ndarray, np.ndarray, list[object], float]:
        from scipy import ndimage as ndi

        labels, _ = ndi.label(score >= thr)
        keep = np.bincount(labels.ravel()) >= 2
        keep[0] = False
        return keep[labels], np.clip(score / (2 * thr), 0, 1), [], float(score.max())


SHAPE = (4, 6, 6)
SPACING = (2.5, 2.0, 2.0)  # 10 mm3 a voxel: 100 voxels = 1 mL


def _case(stub: _StubPredictor, gt: np.ndarray | None, residual_on: list[tuple[slice, ...]],
          fg: np.ndarray | None = None,
          ssim_on: list[tuple[slice, ...]] | None = None) -> tuple[Volume, np.ndarray | None]:
    vol = Volume(np.zeros(SHAPE, np.float32), spacing=SPACING)
    fg = np.ones(SHAPE, bool) if fg is None else fg
    res = np.zeros(SHAPE, np.float32)
    for sl in residual_on:
        res[sl] = 1.0
    ssim = res.copy() if ssim_on is None else np.zeros(SHAPE, np.float32)
    for sl in ssim_on or []:
        ssim[sl] = 1.0
    assert not (res[~fg].any() or ssim[~fg].any())
    stub.cases.append((vol, fg, {"residual": res, "ssim": ssim, "intensity:bright": np.zeros(SHAPE, np.float32)}))
    return vol, gt


def _hand_made() -> tuple[_StubPredictor, list[tuple[Volume, np.ndarray | None]]]:
    stub = _StubPredictor({"residual": 0.5, "ssim": 0.5, "intensity:bright": 2.0})
    gt = np.zeros(SHAPE, bool)
    gt[0:2, 0:2, 0:2] = True  # 8 voxels
    fg_small = np.zeros(SHAPE, bool)
    fg_small[:, 1:5, 1:5] = True  # 64 voxels
    line = (slice(1, 2), slice(2, 3), slice(1, 4))  # 3 voxels inside fg_small
    cases = [
        _case(stub, gt.copy(), [(slice(0, 2), slice(0, 2), slice(0, 2))]),  # Dice 1
        _case(stub, gt.copy(), [(slice(0, 1), slice(0, 2), slice(0, 2))]),  # 4 of 8 found: Dice 2/3
        # normal: a 4-voxel component (kept) and an isolated voxel (dropped by post-processing)
        _case(stub, None, [(slice(0, 1), slice(0, 2), slice(0, 2)), (slice(3, 4), slice(5, 6), slice(5, 6))],
              ssim_on=[]),
        # normal given as an all-false mask, nothing above threshold, smaller evaluated region
        _case(stub, np.zeros(SHAPE, bool), [], fg=fg_small, ssim_on=[line]),
        # normal: a 10-voxel component
        _case(stub, None, [(slice(0, 2), slice(0, 5), slice(0, 1))], ssim_on=[]),
    ]
    return stub, cases


def test_normal_false_positives_and_per_study_dice_exact() -> None:
    stub, cases = _hand_made()
    res = evaluate(cast(Predictor, stub), cases)
    assert res["n_studies"] == 5 and res["n_abnormal"] == 2 and res["n_normal"] == 3
    # U-Net (residual): FP volumes of the normals 0.04, 0 and 0.1 mL
    assert res["normal_fp_ml_mean"] == pytest.approx(0.14 / 3)
    assert res["normal_fp_ml_median"] == pytest.approx(0.04)
    assert res["normal_fp_ml_p95"] == pytest.approx(0.04 + 0.9 * (0.1 - 0.04))  # linear interpolation
    assert res["normal_any_finding_share"] == pytest.approx(2 / 3)
    # before post-processing: 5 + 0 + 10 positive of 144 + 64 + 144 evaluated voxels
    assert res["normal_voxel_fpr"] == pytest.approx(15 / 352)
    # per abnormal study Dice (1 and 2/3) vs pooled over all studies (tp 12, fn 4, fp 4 + 10 on the normals)
    assert res["dice_per_study_mean"] == pytest.approx(5 / 6)
    assert res["dice"] == pytest.approx(24 / 42)
    # abnormal study scores (1, 1) vs normal (1, 0, 1)
    assert res["study_auroc"] == pytest.approx(2 / 3)
    assert res["methods"]["residual"] == {k: v for k, v in res.items() if k in res["methods"]["residual"]}

    ssim = res["methods"]["ssim"]  # only the 3-voxel line on the second normal
    assert ssim["n_normal"] == 3
    assert ssim["normal_fp_ml_mean"] == pytest.approx(0.01)
    assert ssim["normal_fp_ml_median"] == 0.0
    assert ssim["normal_fp_ml_p95"] == pytest.approx(0.9 * 0.03)
    assert ssim["normal_any_finding_share"] == pytest.approx(1 / 3)
    assert ssim["normal_voxel_fpr"] == pytest.approx(3 / 352)
    assert ssim["dice_per_study_mean"] == pytest.approx(5 / 6)

    base = res["baselines"]["intensity"]  # nothing above its threshold anywhere
    assert base["polarity"] == "bright" and base["n_normal"] == 3
    assert base["normal_fp_ml_mean"] == base["normal_fp_ml_median"] == base["normal_fp_ml_p95"] == 0.0
    assert base["normal_any_finding_share"] == 0.0 and base["normal_voxel_fpr"] == 0.0
    assert base["dice_per_study_mean"] == 0.0
    assert res["baseline"]["normal_fp_ml_mean"] == 0.0


def test_normal_metrics_are_none_without_normals_and_dice_without_abnormals() -> None:
    stub, cases = _hand_made()
    res = evaluate(cast(Predictor, stub), cases[:2])
    assert res["n_normal"] == 0 and res["study_auroc"] is None
    for key in ("normal_fp_ml_mean", "normal_fp_ml_median", "normal_fp_ml_p95", "normal_any_finding_share",
                "normal_voxel_fpr"):
        assert key in res and res[key] is None
        assert res["methods"]["ssim"][key] is None and res["baselines"]["intensity"][key] is None
    assert res["dice_per_study_mean"] == pytest.approx(5 / 6)

    res = evaluate(cast(Predictor, stub), cases[2:])
    assert res["n_abnormal"] == 0 and res["n_normal"] == 3 and res["dice_per_study_mean"] is None
    assert res["normal_voxel_fpr"] == pytest.approx(15 / 352)
