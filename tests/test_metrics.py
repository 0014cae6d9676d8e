"""training.metrics against scikit-learn and hand-computed cases; training.plots writes real PNGs
(plots has no test file of its own: it is a thin layer over these metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from training import metrics as M


@pytest.fixture
def scores():
    rng = np.random.default_rng(7)
    n = 800
    y = (rng.random(n) < 0.35).astype(int)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.18, n), 0, 1)
    p = np.round(p, 3)  # ties, as real fp16/int8 scores have
    return y, p


def test_binary_metrics_match_sklearn(scores):
    y, p = scores
    t = 0.5
    m = M.binary_metrics(y, p, t)
    pred = (p >= t).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert m["support"] == len(y) and m["positives"] == y.sum() and m["negatives"] == len(y) - y.sum()
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["fpr"] == pytest.approx(fp / (fp + tn))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))


def test_recall_at_fpr_brute_force(scores):
    y, p = scores
    for max_fpr in (0.0, 0.001, 0.01, 0.1):
        best = 0.0
        for t in np.unique(p):
            pred = p >= t
            fpr = (pred & (y == 0)).sum() / (y == 0).sum()
            if fpr <= max_fpr:
                best = max(best, (pred & (y == 1)).sum() / y.sum())
        assert M.recall_at_fpr(y, p, max_fpr) == pytest.approx(best)
    m = M.binary_metrics(y, p, 0.5)
    assert m["recall_at_fpr_1pct"] == pytest.approx(M.recall_at_fpr(y, p, 0.01))
    assert m["recall_at_fpr_0.1pct"] == pytest.approx(M.recall_at_fpr(y, p, 0.001))


def test_hand_computed_tiny_case():
    # scores sorted: 0.95 S, 0.9 H, 0.8 S, 0.4 H, 0.35 S, 0.1 H
    y = [1, 0, 1, 0, 1, 0]
    p = [0.95, 0.9, 0.8, 0.4, 0.35, 0.1]
    m = M.binary_metrics(y, p, 0.5)  # flags 0.95 S, 0.9 H, 0.8 S
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["fpr"] == pytest.approx(1 / 3)
    assert m["recall_at_fpr_1pct"] == pytest.approx(1 / 3)  # only 0.95 can be flagged with no false alarm
    # ROC AUC by pair counting: S>H pairs: 0.95 beats 3, 0.8 beats 2, 0.35 beats 1 -> 6 of 9
    assert m["roc_auc"] == pytest.approx(6 / 9)


def test_best_f1_threshold_hand_case():
    y = [1, 0, 1, 0, 1, 0]
    p = [0.95, 0.9, 0.8, 0.4, 0.35, 0.1]
    # candidates (flag >= t): 0.95 -> F1 .5; 0.9 -> .4; 0.8 -> .667; 0.4 -> .571; 0.35 -> .75; 0.1 -> .667
    choice = M.threshold_choice(y, p, "best_f1")
    assert choice["met"] and choice["val_f1"] == pytest.approx(0.75)
    # half-way between the chosen score 0.35 and the next lower one 0.1: same rows flagged, robust to rounding
    assert choice["threshold"] == pytest.approx(0.225)
    assert M.choose_threshold(y, p, "best_f1") == pytest.approx(0.225)


def test_best_f1_is_the_brute_force_optimum(scores):
    y, p = scores
    t = M.choose_threshold(y, p, "best_f1")
    best = max(f1_score(y, (p >= c).astype(int)) for c in np.unique(p))
    assert f1_score(y, (p >= t).astype(int)) == pytest.approx(best)


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.2])
def test_max_recall_at_fpr_respects_the_constraint(scores, target):
    y, p = scores
    choice = M.threshold_choice(y, p, "max_recall_at_fpr", target)
    t = choice["threshold"]
    pred = p >= t
    fpr = (pred & (y == 0)).sum() / (y == 0).sum()
    recall = (pred & (y == 1)).sum() / y.sum()
    assert choice["met"]
    assert fpr <= target
    assert recall == pytest.approx(M.recall_at_fpr(y, p, target))  # the highest reachable recall
    assert choice["val_fpr"] == pytest.approx(fpr) and choice["val_recall"] == pytest.approx(recall)


def test_max_recall_at_fpr_hand_case():
    y = [1, 0, 1, 0, 1, 0]
    p = [0.95, 0.9, 0.8, 0.4, 0.35, 0.1]
    # FPR <= 0: only 0.95 (recall 1/3); FPR <= 1/3: down to 0.8 (recall 2/3)
    assert M.choose_threshold(y, p, "max_recall_at_fpr", 0.0) == pytest.approx((0.95 + 0.9) / 2)
    assert M.choose_threshold(y, p, "max_recall_at_fpr", 0.34) == pytest.approx((0.8 + 0.4) / 2)


def test_fallback_when_no_threshold_meets_the_target():
    # the top-scored message is ham: every threshold that flags any spam has FPR >= 1/2
    y = [0, 1, 0]
    p = [0.9, 0.2, 0.1]
    with pytest.warns(M.ThresholdWarning, match="no threshold reaches FPR"):
        choice = M.threshold_choice(y, p, "max_recall_at_fpr", 0.01)
    assert not choice["met"] and "lowest-FPR" in choice["note"]
    # the lowest FPR that flags anything is 1/2, and at that FPR the spam at 0.2 can be caught too
    assert choice["threshold"] == pytest.approx((0.2 + 0.1) / 2)
    assert choice["val_fpr"] == pytest.approx(0.5) and choice["val_recall"] == 1.0


def test_one_class_validation_falls_back_to_half():
    with pytest.warns(M.ThresholdWarning, match="no threshold can be chosen"):
        assert M.choose_threshold([0, 0, 0], [0.1, 0.2, 0.3], "best_f1") == 0.5


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="threshold rule"):
        M.choose_threshold([0, 1], [0.1, 0.9], "median")
    with pytest.raises(ValueError, match="labels must be 0"):
        M.binary_metrics([0, 2], [0.1, 0.9], 0.5)
    with pytest.raises(ValueError, match="2 values but p_spam has 3"):
        M.binary_metrics([0, 1], [0.1, 0.9, 0.3], 0.5)


def test_one_class_groups_are_nan_not_errors():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.7, 0.8, 0.9, 0.2, 0.3])
    g = M.grouped_metrics(y, p, 0.5, {"source": ["ham_only", "ham_only", "spam_only", "spam_only", "mix", "mix"],
                                      "lang": ["en"] * 6})
    assert list(g) == ["overall", "source=ham_only", "source=mix", "source=spam_only", "lang=en"]
    ham = g["source=ham_only"]
    assert math.isnan(ham["roc_auc"]) and math.isnan(ham["recall"]) and ham["fpr"] == 0.5
    spam = g["source=spam_only"]
    assert math.isnan(spam["fpr"]) and math.isnan(spam["pr_auc"]) and spam["recall"] == 1.0
    assert sum(g[k]["support"] for k in g if k.startswith("source=")) == g["overall"]["support"]
    assert g["lang=en"]["f1"] == g["overall"]["f1"]


def test_mlflow_names_are_valid_and_skip_nan():
    from mlflow.utils.validation import _validate_metric_name

    y = np.array([0, 1, 0, 1, 0])
    p = np.array([0.2, 0.9, 0.4, 0.6, 0.1])
    g = M.grouped_metrics(y, p, 0.5, {"source": ["uci_sms", "uci_sms", "weird name+x", "weird name+x", "hamonly"],
                                      "lang": ["zh", "zh", "en", "en", "en"]})
    names = M.to_mlflow_metrics(g, "test")
    for name in names:
        _validate_metric_name(name)  # raises on a character MLflow rejects
    assert names["test/overall/f1"] == pytest.approx(g["overall"]["f1"])
    assert names["test/source.uci_sms/recall_at_fpr_0.1pct"] == pytest.approx(g["source=uci_sms"]["recall_at_fpr_0.1pct"])
    assert "test/source.weird name_x/f1" in names and "test/lang.zh/pr_auc" in names
    assert "test/source.hamonly/roc_auc" not in names  # NaN: one class only
    assert "test/source.hamonly/fpr" in names
    assert M.metric_name("validation", "lang=ja", "f1") == "val/lang.ja/f1"
    assert set(M.to_mlflow_metrics(g, "val", counts=False)) >= {f"val/overall/{m}" for m in M.METRIC_NAMES}


def test_metrics_table_markdown():
    g = M.grouped_metrics([0, 1, 1], [0.1, 0.8, 0.9], 0.5, {"source": ["a", "b", "b"]})
    table = M.metrics_table(g)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| scope | rows | spam | precision")
    assert len(lines) == 2 + len(g)
    assert lines[2].startswith("| overall | 3 | 2 | 1.0000 | 1.0000 | 1.0000 | 0.0000 | 1.0000")
    assert "| source=a | 1 | 0 | n/a | n/a |" in table  # no spam: precision and recall undefined


def test_plots_are_valid_pngs(tmp_path, scores):
    import matplotlib.image as mpimg

    from training import plots as P

    y, p = scores
    src = np.where(np.arange(len(y)) % 3 == 0, "uci_sms", np.where(np.arange(len(y)) % 3 == 1, "zh_sms", "enron"))
    lang = np.where(src == "zh_sms", "zh", "en")
    paths = P.evaluation_plots(y, p, 0.5, {"source": src, "lang": lang}, tmp_path / "plots", prefix="test")
    assert [x.name for x in paths] == ["test_pr_curve.png", "test_roc_curve.png", "test_confusion.png",
                                       "test_f1_by_group.png", "test_score_hist.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert img[..., :3].std() > 0.01  # something was drawn
    # a single-class group and no groups at all still plot
    one = P.pr_curve([1, 1, 0], [0.9, 0.8, 0.1], tmp_path / "pr.png", {"source": ["a", "a", "b"]})
    assert one.exists()
    assert P.f1_bars(M.grouped_metrics([0, 1], [0.2, 0.7], 0.5), tmp_path / "f1.png").exists()
