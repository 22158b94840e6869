"""``evaluate``'s optional per-study outputs (``EvalOutputs``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.engine.demo import synthetic_cases
from worker.engine.evaluate import EvalOutputs, evaluate
from worker.engine.metrics import auroc, binary_metrics
from worker.engine.predictor import Predictor


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
