"""Metric implementations against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from worker.engine.metrics import auroc, average_precision, binary_metrics, confusion, pr_curve, roc_curve


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pos_rate", [0.5, 0.05, 0.0005])
def test_ranking_metrics_match_sklearn(seed: int, pos_rate: float) -> None:
    rng = np.random.default_rng(seed)
    n = 20000
    truth = rng.random(n) < pos_rate
    truth[0] = True
    truth[1] = False
    score = rng.normal(size=n) + 1.5 * truth
    assert auroc(score, truth) == pytest.approx(skm.roc_auc_score(truth, score), abs=1e-12)
    assert average_precision(score, truth) == pytest.approx(skm.average_precision_score(truth, score), abs=1e-12)


def test_ranking_metrics_with_heavy_ties() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random(5000) < 0.1
    score = np.round(rng.random(5000) + 0.3 * truth, 1)  # few distinct values
    assert auroc(score, truth) == pytest.approx(skm.roc_auc_score(truth, score), abs=1e-12)
    assert average_precision(score, truth) == pytest.approx(skm.average_precision_score(truth, score), abs=1e-12)
    fpr, tpr, _ = roc_curve(score, truth)
    sfpr, stpr, _ = skm.roc_curve(truth, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sfpr)
    np.testing.assert_allclose(tpr, stpr)
    prec, rec, _ = pr_curve(score, truth)
    sp, sr, _ = skm.precision_recall_curve(truth, score, drop_intermediate=False)
    np.testing.assert_allclose(prec[::-1], sp[:-1])
    np.testing.assert_allclose(rec[::-1], sr[:-1])


def test_extreme_imbalance_large() -> None:
    rng = np.random.default_rng(4)
    n = 2_000_000
    truth = np.zeros(n, bool)
    truth[rng.choice(n, 7, replace=False)] = True
    score = rng.random(n).astype(np.float32)
    score[truth] += 0.9
    assert auroc(score, truth) == pytest.approx(skm.roc_auc_score(truth, score), abs=1e-9)
    assert average_precision(score, truth) == pytest.approx(skm.average_precision_score(truth, score), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.random((20, 30, 30)) < 0.01
    pred = (rng.random(truth.shape) < 0.02) | (truth & (rng.random(truth.shape) < 0.7))
    m = binary_metrics(pred, truth)
    t, p = truth.ravel(), pred.ravel()
    assert m["sensitivity"] == pytest.approx(skm.recall_score(t, p))
    assert m["precision"] == pytest.approx(skm.precision_score(t, p))
    assert m["f1"] == pytest.approx(skm.f1_score(t, p))
    assert m["dice"] == pytest.approx(skm.f1_score(t, p))
    assert m["specificity"] == pytest.approx(skm.recall_score(~t, ~p))
    tn, fp, fn, tp = skm.confusion_matrix(t, p).ravel()
    assert confusion(pred, truth) == (tp, fp, fn, tn)


def test_degenerate_cases() -> None:
    empty = np.zeros(10, bool)
    m = binary_metrics(empty, empty)
    assert m["dice"] == 1.0 and m["precision"] == 0.0 and m["specificity"] == 1.0
    with pytest.raises(ValueError):
        auroc(np.arange(10.0), empty)
    with pytest.raises(ValueError):
        average_precision(np.arange(10.0), empty)
    with pytest.raises(ValueError):
        confusion(np.zeros(3, bool), np.zeros(4, bool))
