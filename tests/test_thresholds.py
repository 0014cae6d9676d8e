"""serving.thresholds: the per-language threshold policy that serving, evaluation and export apply."""

from __future__ import annotations

import numpy as np
import pytest

from serving import thresholds as TH

POLICY = {"default": 0.7, "by_lang": {"ko": 0.3, "zh": 0.9}, "rule": "max_recall_at_fpr", "target_fpr": 0.01}


def test_threshold_for_and_apply():
    assert TH.threshold_for(POLICY, "ko") == (0.3, "lang:ko")
    assert TH.threshold_for(POLICY, "en") == (0.7, "global")
    labels, t, scopes = TH.apply(POLICY, [0.5, 0.5, 0.5, 0.95], ["ko", "en", "zh", "zh"])
    assert labels.tolist() == [1, 0, 0, 1]  # the same probability, three languages, two labels
    assert t.tolist() == [0.3, 0.7, 0.9, 0.9] and scopes == ["lang:ko", "global", "lang:zh", "lang:zh"]
    with pytest.raises(ValueError, match="2 probabilities but 1 language tags"):
        TH.apply(POLICY, [0.1, 0.2], ["en"])
    assert TH.describe(POLICY) == "global 0.7; lang:ko 0.3, lang:zh 0.9"


def test_old_manifests_get_a_single_threshold_policy():
    pol = TH.from_manifest({"threshold": 0.42, "threshold_rule": "best_f1"})
    assert pol["default"] == 0.42 and pol["by_lang"] == {} and pol["rule"] == "best_f1"
    labels, t, scopes = TH.apply(pol, np.array([0.42, 0.41]), ["ko", "en"])
    assert labels.tolist() == [1, 0] and set(scopes) == {"global"}
    assert TH.from_manifest({"threshold": 0.7, "thresholds": POLICY})["by_lang"] == {"ko": 0.3, "zh": 0.9}


@pytest.mark.parametrize("bad, says", [
    ({"by_lang": {}}, "no 'default'"),
    ({"default": "0.5"}, "must be a number"),
    ({"default": 1.5}, r"in \[0, 1\]"),
    ({"default": float("nan")}, r"in \[0, 1\]"),
    ({"default": 0.5, "by_lang": {"xx": 0.5}}, "unknown language tag"),
    ({"default": 0.5, "by_lang": {"ko": None}}, "thresholds.by_lang.ko' must be a number"),
    ({"default": 0.5, "by_lang": [0.5]}, "must be an object"),
])
def test_bad_policies_are_refused(bad, says):
    with pytest.raises(ValueError, match=says):
        TH.validate(bad)


def test_threshold_and_policy_default_must_agree():
    with pytest.raises(ValueError, match="differs from 'thresholds.default'"):
        TH.from_manifest({"threshold": 0.5, "thresholds": POLICY})
