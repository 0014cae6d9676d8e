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
    # without ranking: the same counts and rates, the threshold-free metrics left undefined
    quick = M.binary_metrics(y, p, t, ranking=False)
    ranked = ("roc_auc", "pr_auc", "recall_at_fpr_1pct", "recall_at_fpr_0.1pct")
    assert all(np.isnan(quick[k]) for k in ranked)
    assert {k: v for k, v in quick.items() if k not in ranked} == {k: v for k, v in m.items() if k not in ranked}


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


# ------------------------------------------------------------------------------------------ per-language policy


def _policy_data():
    """Validation scores of five languages: en dominates (and sets the global threshold near 0.7); ko spam
    scores low (its own threshold is lower, with enough ham to show a 1% FPR); zh likewise but with only
    150 ham rows (lowering is held back); other scores high (its own threshold is higher); ja is rare."""
    rng = np.random.default_rng(3)
    parts = {  # lang: (ham scores, spam scores)
        "en": (rng.uniform(0.0, 0.7, 3000), rng.uniform(0.5, 1.0, 1000)),
        "ko": (rng.uniform(0.0, 0.3, 400), rng.uniform(0.2, 0.6, 200)),
        "zh": (np.append(rng.uniform(0.0, 0.35, 149), 0.45), rng.uniform(0.3, 0.7, 100)),
        "other": (rng.uniform(0.5, 0.9, 200), rng.uniform(0.85, 1.0, 50)),
        "ja": (rng.uniform(0.0, 0.5, 30), rng.uniform(0.5, 1.0, 5)),
    }
    y, p, langs = [], [], []
    for lang, (ham, spam) in parts.items():
        y += [0] * len(ham) + [1] * len(spam)
        p += list(ham) + list(spam)
        langs += [lang] * (len(ham) + len(spam))
    return np.array(y), np.round(np.array(p), 6), np.array(langs)


def test_threshold_policy_per_language_with_fallbacks_and_the_lowering_guard():
    y, p, langs = _policy_data()
    pol = M.threshold_policy(y, p, langs, "max_recall_at_fpr", 0.01, min_ham=100, min_spam=20)
    default = pol["default"]
    assert default == pytest.approx(M.choose_threshold(y, p, "max_recall_at_fpr", 0.01))
    assert pol["global"]["threshold"] == default and pol["rule"] == "max_recall_at_fpr"
    assert pol["min_rows"] == {"ham": 100, "spam": 20, "ham_to_lower": 300}
    assert set(pol["by_lang"]) == {"en", "ko", "zh", "other"}
    by = pol["by_lang"]
    L = pol["languages"]

    def own(lang, target=0.01):
        m = langs == lang
        return M.choose_threshold(y[m], p[m], "max_recall_at_fpr", target)

    # ko: enough ham (400 >= 300) to lower its threshold to its own choice, and it catches more spam
    assert by["ko"] == pytest.approx(own("ko")) and by["ko"] < default
    ko = langs == "ko"
    assert M.binary_metrics(y[ko], p[ko], by["ko"])["recall"] > M.binary_metrics(y[ko], p[ko], default)["recall"]
    assert L["ko"]["scope"] == "lang:ko" and L["ko"]["ham"] == 400 and L["ko"]["spam"] == 200
    assert L["ko"]["val_fpr"] <= 0.01
    # other: its own threshold is higher than the global one; raising is never held back (200 ham < 300)
    assert by["other"] == pytest.approx(own("other")) and by["other"] > default
    # zh: its own threshold (1 of 150 ham flagged) is below the global one with < 300 ham, so it is chosen
    # again with no validation ham flagged at all: just above its highest ham (0.45)
    assert by["zh"] == pytest.approx(own("zh", 0.0)) and own("zh") < by["zh"] < default
    assert 0.45 < by["zh"] and L["zh"]["val_fpr"] == 0.0 and "lowered only as far as" in L["zh"]["reason"]
    assert L["zh"]["own_threshold"] == pytest.approx(own("zh"))
    # ja: too few rows -> the global threshold, with the reason and its counts
    assert "ja" not in by
    assert L["ja"]["scope"] == "global" and L["ja"]["threshold"] == default
    assert (L["ja"]["ham"], L["ja"]["spam"]) == (30, 5)
    assert "too few validation rows (30 ham, 5 spam" in L["ja"]["reason"]
    # the policy is what serving applies, and it is plain JSON
    import json

    from serving import thresholds as TH

    assert TH.validate(json.loads(json.dumps(pol)))["by_lang"] == by
    labels, per_row, scopes = TH.apply(pol, p, langs)
    assert scopes[int(np.flatnonzero(langs == "ja")[0])] == "global"
    assert np.array_equal(labels, (p >= per_row).astype(int))
    assert np.all(per_row[ko] == by["ko"])


def test_threshold_policy_off_or_minimums_unmet_is_the_global_threshold():
    y, p, langs = _policy_data()
    off = M.threshold_policy(y, p, langs, per_language=False)
    assert off["by_lang"] == {} and off["per_language"] is False
    assert all(v["scope"] == "global" and "per_language_thresholds=false" in v["reason"] for v in off["languages"].values())
    strict = M.threshold_policy(y, p, langs, min_ham=5000, min_spam=20)
    assert strict["by_lang"] == {} and strict["default"] == off["default"]
    with pytest.raises(ValueError, match="must be >= 0"):
        M.threshold_policy(y, p, langs, min_ham=-1)


def _draw(rng, n_ham, n_spam):
    y = np.r_[np.zeros(n_ham, dtype=int), np.ones(n_spam, dtype=int)]
    return y, np.r_[rng.beta(2, 8, n_ham), rng.beta(8, 2, n_spam)]


def test_threshold_spread_brackets_the_choice_and_narrows_with_more_validation_rows():
    rng = np.random.default_rng(3)
    small, large = _draw(rng, 400, 200), _draw(rng, 8000, 4000)
    widths = []
    for y, p in (small, large):
        chosen = M.threshold_choice(y, p, target_fpr=0.01)["threshold"]
        s = M.threshold_spread(y, p, target_fpr=0.01, resamples=100)
        assert s["low"] <= s["median"] <= s["high"] and s["resamples"] == 100 and s["level"] == 0.9
        assert s["low"] <= chosen <= s["high"]
        widths.append(s["high"] - s["low"])
    # 20x the rows: the order statistic the rule picks is pinned down far better
    assert widths[1] < widths[0] / 2
    # deterministic per seed, and another seed draws other resamples
    y, p = small
    assert M.threshold_spread(y, p, resamples=50, seed=1) == M.threshold_spread(y, p, resamples=50, seed=1)
    assert M.threshold_spread(y, p, resamples=50, seed=1) != M.threshold_spread(y, p, resamples=50, seed=2)


def test_threshold_spread_off_one_class_or_bad_arguments():
    y, p = _draw(np.random.default_rng(4), 50, 20)
    assert M.threshold_spread(y, p, resamples=0) is None
    assert M.threshold_spread(np.zeros(10, dtype=int), np.linspace(0, 1, 10), resamples=20) is None
    with pytest.raises(ValueError, match="resamples must be >= 0"):
        M.threshold_spread(y, p, resamples=-1)
    with pytest.raises(ValueError, match="level in"):
        M.threshold_spread(y, p, resamples=10, level=1.0)


def test_threshold_policy_carries_the_global_spread_and_says_it():
    y, p, langs = _policy_data()
    policy = M.threshold_policy(y, p, langs, spread_resamples=40)
    spread = policy["global"]["spread"]
    assert spread["resamples"] == 40 and spread["low"] <= policy["default"] <= spread["high"]
    text = M.spread_text(policy["global"])
    assert text.startswith("90% of 40 validation resamples choose") and f"{spread['high']:.4g}" in text
    assert M.threshold_policy(y, p, langs)["global"]["spread"] is None
    assert M.spread_text(M.threshold_policy(y, p, langs)["global"]) == ""


def test_threshold_policy_raise_only_keeps_only_the_higher_thresholds():
    y, p, langs = _policy_data()
    both = M.threshold_policy(y, p, langs, min_ham=100, min_spam=20)
    up = M.threshold_policy(y, p, langs, min_ham=100, min_spam=20, raise_only=True)
    assert up["default"] == both["default"] and up["raise_only"] is True and both["raise_only"] is False
    # other's own threshold is above the global one: kept; ko's and zh's are below: the global one is used
    assert up["by_lang"] == {k: v for k, v in both["by_lang"].items() if v >= both["default"]}
    assert set(up["by_lang"]) == {"other"} and up["by_lang"]["other"] == both["by_lang"]["other"]
    assert up["languages"]["ko"]["scope"] == "global" and "per_language_lower=false" in up["languages"]["ko"]["reason"]
    assert up["languages"]["ko"]["own_threshold"] == pytest.approx(both["by_lang"]["ko"])
    # the config section drives it the same way
    from training.config import EvalConfig

    cfg = EvalConfig(per_language_thresholds=True, per_language_lower=False)
    assert M.config_threshold_policy(cfg, y, p, langs)["by_lang"] == up["by_lang"]


def test_threshold_policy_not_met_keeps_only_a_higher_own_threshold():
    # ko's top-scored row is ham: the rule (FPR 0) cannot be met on its rows
    y = np.array([0] * 200 + [1] * 40 + [0] * 120 + [1] * 25)
    p = np.concatenate([np.linspace(0.0, 0.6, 200), np.linspace(0.7, 1.0, 40),
                        np.append(np.linspace(0.0, 0.2, 119), 0.99), np.linspace(0.5, 0.9, 25)])
    langs = np.array(["en"] * 240 + ["ko"] * 145)
    pol = M.threshold_policy(y, p, langs, "max_recall_at_fpr", 0.0, min_ham=100, min_spam=20)
    ko = pol["languages"]["ko"]
    # the global threshold sits above ko's 0.99 ham; ko's fallback (lowest-FPR) threshold is below it
    assert "no threshold reaches FPR" in ko["reason"] and "global used" in ko["reason"]
    assert ko["own_threshold"] < pol["default"] and "ko" not in pol["by_lang"] and ko["scope"] == "global"


def test_grouped_metrics_with_per_row_thresholds():
    y = np.array([1, 1, 0, 0])
    p = np.array([0.6, 0.4, 0.5, 0.3])
    langs = ["a", "b", "a", "b"]
    single = M.grouped_metrics(y, p, 0.45, {"lang": langs})
    assert single["overall"]["f1"] == pytest.approx(0.5) and single["lang=b"]["recall"] == 0.0
    per_row = np.array([0.55, 0.35, 0.55, 0.35])  # a: 0.55, b: 0.35
    g = M.grouped_metrics(y, p, per_row, {"lang": langs})
    assert g["overall"]["f1"] == 1.0 and g["overall"]["fpr"] == 0.0
    assert g["lang=b"]["recall"] == 1.0 and g["lang=a"]["fpr"] == 0.0
    assert g["lang=a"]["threshold"] == 0.55 and math.isnan(g["overall"]["threshold"])
    assert M.binary_metrics(y, p, np.full(4, 0.45))["threshold"] == 0.45
    with pytest.raises(ValueError, match="3 per-row thresholds for 4 rows"):
        M.grouped_metrics(y, p, per_row[:3])


def test_plots_take_per_row_thresholds(tmp_path):
    from training import plots as P

    y = np.array([0, 1, 0, 1, 0, 1])
    p = np.array([0.1, 0.9, 0.4, 0.6, 0.2, 0.7])
    t = np.array([0.5, 0.5, 0.3, 0.3, 0.5, 0.5])
    paths = P.evaluation_plots(y, p, t, {"lang": ["en", "en", "ko", "ko", "en", "en"]}, tmp_path, prefix="val")
    assert all(x.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for x in paths)


def test_a_ham_pool_keeps_each_sources_share_and_narrows_the_spread():
    """Two sources: "hard" ham scores high, "easy" ham low; validation has 300 of each. A pool of 3,000 easy
    and 1,000 hard ham must not shift the rule toward the easy source (each keeps half the weight), and pins
    the threshold down better than validation alone."""
    rng = np.random.default_rng(7)

    def ham(source, n):
        return rng.beta(2, 8, n) if source == "easy" else rng.beta(5, 5, n)

    p_val = np.r_[ham("easy", 300), ham("hard", 300), rng.beta(8, 2, 200)]
    y_val = np.r_[np.zeros(600, dtype=int), np.ones(200, dtype=int)]
    sources = ["easy"] * 300 + ["hard"] * 300 + ["spam"] * 200
    pool = M.HamPool(np.r_[ham("easy", 3000), ham("hard", 1000)], ["easy"] * 3000 + ["hard"] * 1000,
                     ["en"] * 4000, sources)
    y, p, langs, w, groups = pool.join(y_val, p_val, np.asarray(["en"] * 800, dtype=object))
    assert y.size == 4800 and (y[800:] == 0).all() and list(groups[800:802]) == ["easy", "easy"]
    # every source's ham weighs what its validation ham did: 300 each
    assert w[(groups == "easy") & (y == 0)].sum() == pytest.approx(300)
    assert w[(groups == "hard") & (y == 0)].sum() == pytest.approx(300)
    assert (w[y == 1] == 1).all()

    alone = M.threshold_policy(y_val, p_val, ["en"] * 800, target_fpr=0.02, per_language=False, spread_resamples=100)
    pooled = M.threshold_policy(y_val, p_val, ["en"] * 800, target_fpr=0.02, per_language=False,
                                spread_resamples=100, pool=pool)
    # the weighted FPR at the pooled threshold is the target's, by hand
    t = pooled["default"]
    flagged = (p >= t) & (y == 0)
    assert w[flagged].sum() / w[y == 0].sum() <= 0.02 + 1e-12
    assert pooled["global"]["val_fpr"] == pytest.approx(w[flagged].sum() / w[y == 0].sum())
    # unweighted, the 3,000 easy rows would have pulled the threshold down; weighted it stays near the
    # validation-only choice, and its spread is narrower
    plain = M.threshold_choice(y, p, target_fpr=0.02)["threshold"]
    assert plain < t and abs(t - alone["default"]) < abs(plain - alone["default"])
    sa, sp = alone["global"]["spread"], pooled["global"]["spread"]
    assert sp["high"] - sp["low"] < (sa["high"] - sa["low"]) * 0.75
    assert pooled["global"]["pool"] == {"rows": 4000, "by_source": {"easy": 3000, "hard": 1000},
                                        "origin": "training rows the model did not read"}
    assert "resamples of validation and the unread ham" in M.spread_text(pooled["global"])
    assert "pool" not in alone["global"]


def test_language_balanced_fpr_counts_each_language_the_same():
    """English: 1,000 ham, 20 of them grey mail scoring 0.90-0.99; Japanese: 200 ham, all low. Spam scores
    0.5-0.99. At 1% the pooled rule may flag 12 ham (1% of 1,200): only 12 grey mails, threshold above the 8
    lowest. Balanced, the mean of the two FPRs may be 1%: English up to 2% = all 20 grey mails while Japanese
    flags none, so the threshold falls to just under the lowest grey mail."""
    grey = np.linspace(0.90, 0.99, 20)
    p = np.r_[grey, np.full(980, 0.05), np.full(200, 0.04), np.linspace(0.5, 0.995, 100)]
    y = np.r_[np.zeros(1200, dtype=int), np.ones(100, dtype=int)]
    langs = ["en"] * 1000 + ["ja"] * 200 + ["en"] * 100
    pooled = M.threshold_choice(y, p, target_fpr=0.01)
    assert (grey >= pooled["threshold"]).sum() == 12 and pooled["val_fpr"] == pytest.approx(12 / 1200)
    balanced = M.threshold_choice(y, p, target_fpr=0.01, fpr_groups=langs)
    flagged = np.r_[grey, np.full(1180, 0.0)] >= balanced["threshold"]
    assert flagged.sum() == 20 and balanced["threshold"] < 0.90
    assert balanced["val_fpr_group_mean"] == pytest.approx((20 / 1000 + 0 / 200) / 2)
    assert balanced["val_recall"] > pooled["val_recall"]
    # one group is the pooled rule; a row of no group (None) counts in no mean
    same = M.threshold_choice(y, p, target_fpr=0.01, fpr_groups=["x"] * 1300)
    assert same["threshold"] == pooled["threshold"]
    no_ja = M.threshold_choice(y, p, target_fpr=0.01, fpr_groups=["en"] * 1000 + [None] * 200 + ["en"] * 100)
    assert (grey >= no_ja["threshold"]).sum() == 10  # 1% of English's 1,000 ham alone
    with pytest.raises(ValueError, match="fpr_groups has 3 values"):
        M.threshold_choice(y, p, fpr_groups=["en"] * 3)


def test_max_language_fpr_keeps_an_easy_language_from_lending_its_share_of_the_mean():
    """The grey-mail data above: balanced at 1%, Japanese flags none of its ham, so English may flag 2% (all 20
    grey mails). Capped at 1.5% a language, English flags at most 15 of its 1,000 ham; the mean stays under 1%."""
    grey = np.linspace(0.90, 0.99, 20)
    p = np.r_[grey, np.full(980, 0.05), np.full(200, 0.04), np.linspace(0.5, 0.995, 100)]
    y = np.r_[np.zeros(1200, dtype=int), np.ones(100, dtype=int)]
    langs = ["en"] * 1000 + ["ja"] * 200 + ["en"] * 100
    mean_only = M.threshold_choice(y, p, target_fpr=0.01, fpr_groups=langs)
    capped = M.threshold_choice(y, p, target_fpr=0.01, fpr_groups=langs, max_group_fpr=0.015)
    assert (grey >= mean_only["threshold"]).sum() == 20 and (grey >= capped["threshold"]).sum() == 15
    assert capped["val_fpr_group_max"] == pytest.approx(0.015) and capped["max_group_fpr"] == 0.015
    assert capped["val_fpr_group_mean"] == pytest.approx(0.0075) and capped["met"]
    assert mean_only["val_fpr_group_max"] == pytest.approx(0.02) and "max_group_fpr" not in mean_only
    assert capped["val_recall"] < mean_only["val_recall"]
    # a cap no language reaches changes nothing; a cap under the target, or without groups, is refused
    assert M.threshold_choice(y, p, target_fpr=0.01, fpr_groups=langs, max_group_fpr=0.5)["threshold"] \
        == mean_only["threshold"]
    for bad in ({"max_group_fpr": 0.005, "fpr_groups": langs}, {"max_group_fpr": 0.02}):
        with pytest.raises(ValueError, match="max_group_fpr needs fpr_groups"):
            M.threshold_choice(y, p, target_fpr=0.01, **bad)
    # the policy carries the cap into the spread's resamples, the record and the summary, and export applies it again
    pol = M.threshold_policy(y, p, langs, target_fpr=0.01, per_language=False, spread_resamples=30,
                             language_balanced=True, max_language_fpr=0.015)
    assert pol["default"] == capped["threshold"] and pol["max_language_fpr"] == 0.015
    assert pol["global"]["spread"]["high"] >= pol["global"]["spread"]["low"]
    assert M.balance_text(pol["global"]).endswith("none of them over 0.015 (the highest: 0.0150)")
    from training.export import ParityData, variant_policy

    data = ParityData([""] * y.size, list(y), "validation", whole_validation=True)
    assert variant_policy(pol, data, p, langs)[0]["default"] == pol["default"]
    with pytest.raises(ValueError, match="needs language_balanced"):
        M.threshold_policy(y, p, langs, target_fpr=0.01, max_language_fpr=0.015)


def test_threshold_policy_language_balanced_averages_the_languages_with_enough_ham():
    rng = np.random.default_rng(3)
    p = np.r_[rng.beta(2, 6, 900), rng.beta(1, 12, 150), rng.beta(1, 12, 40), rng.beta(7, 2, 200)]
    y = np.r_[np.zeros(1090, dtype=int), np.ones(200, dtype=int)]
    langs = ["en"] * 900 + ["ko"] * 150 + ["other"] * 40 + ["en"] * 200
    off = M.threshold_policy(y, p, langs, target_fpr=0.01, per_language=False, spread_resamples=50)
    on = M.threshold_policy(y, p, langs, target_fpr=0.01, per_language=False, spread_resamples=50,
                            language_balanced=True)
    g = on["global"]
    assert g["fpr_languages"] == ["en", "ko"]  # "other" has 40 ham (< min_ham 100): in no mean
    groups = [x if x != "other" else None for x in langs]
    assert on["default"] == M.threshold_choice(y, p, target_fpr=0.01, fpr_groups=groups)["threshold"]
    assert on["default"] < off["default"] and "fpr_languages" not in off["global"]
    en_fpr = ((p >= on["default"]) & (y == 0))[:900].mean()
    ko_fpr = ((p >= on["default"]) & (y == 0))[900:1050].mean()
    assert (en_fpr + ko_fpr) / 2 <= 0.01 and g["val_fpr_group_mean"] == pytest.approx((en_fpr + ko_fpr) / 2)
    assert g["spread"]["low"] <= on["default"] <= g["spread"]["high"]
    assert M.balance_text(g).startswith("the FPR held under the target is the mean of en, ko's own (0.0")
    assert M.balance_text(off["global"]) == ""
    # one language with enough ham: nothing to balance, all ham counts together
    small = M.threshold_policy(y, p, ["en"] * 900 + ["ko"] * 190 + ["en"] * 200, target_fpr=0.01,
                               per_language=False, min_ham=200, language_balanced=True)
    assert small["global"]["fpr_languages"] == [] and small["default"] == off["default"]
    # the policy records the rule, and export applies it again to a graph's own scores (training.export)
    from training.export import ParityData, variant_policy

    assert on["language_balanced"] is True and off["language_balanced"] is False
    data = ParityData([""] * y.size, list(y), "validation", whole_validation=True)
    again, why = variant_policy(on, data, p, langs)
    assert why == "" and again["default"] == on["default"] and again["global"]["fpr_languages"] == ["en", "ko"]
    assert variant_policy(off, data, p, langs)[0]["default"] == off["default"]
    # ... and its summary says which languages that graph's threshold averaged (training.parity.parity_table)
    from training.parity import parity_table

    manifest = {"parity": {"rows": y.size, "data": "validation", "fp32": {"max_abs_logit_diff": 0.0, "limit": 1e-3,
                                                                         "passed": True, "label_mismatches": 0}},
                "int8": {"status": "passed", "recipe": {"name": "plain"}}, "files": {}, "thresholds": on,
                "thresholds_by_model": {"int8": again}}
    line = next(x for x in parity_table(manifest).splitlines() if x.startswith("int8 thresholds"))
    assert "the FPR held under the target is the mean of en, ko's own" in line
