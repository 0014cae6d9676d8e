"""The spam-threshold policy: one global threshold plus per-language ones, defined once for every step.

A policy is chosen on validation by `training.metrics.threshold_policy`, stored as `"thresholds"` in a
model directory's spamlingo.json (DESIGN §3) and a bundle's bundle.json (§5), and applied here by
serving, evaluation and the export's parity gates alike:

    {"default": 0.73,                 # the global threshold (also stored as the old "threshold" key)
     "by_lang": {"ko": 0.41},         # languages with enough validation rows for a threshold of their own
     "rule": "max_recall_at_fpr", "target_fpr": 0.01,
     "min_rows": {"ham": 100, "spam": 20, "ham_to_lower": 300},
     "language_balanced": false,      # true: `default` holds the mean of the languages' FPRs at target_fpr
     "max_language_fpr": 0.0,         # > 0: and no language's own FPR over it (training.metrics.threshold_policy)
     "languages": {"ko": {"ham": 812, "spam": 240, "scope": "lang:ko", "threshold": 0.41, "reason": ...},
                   "ja": {"ham": 35, "spam": 4, "scope": "global", "threshold": 0.73, "reason": ...}},
     "global": {... training.metrics.threshold_choice of the whole validation split}}

Only `default` and `by_lang` decide labels; the rest records how they were chosen. A text is spam iff its
spam probability >= the threshold of its language tag (`serving.text.language_tag`: zh/ja/ko/en/mixed/
other) when `by_lang` has one ("lang:<tag>" scope), else >= `default` ("global" scope). A model or bundle
written before per-language thresholds has only `threshold`: `from_manifest` turns it into a policy
with an empty `by_lang`, which labels exactly as before. numpy only: serving imports neither torch nor
transformers.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from serving.text import LANGS

GLOBAL = "global"


def lang_scope(lang: str) -> str:
    """The scope string of a language's own threshold: "lang:ko"."""
    return f"lang:{lang}"


def _threshold_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # a spam probability (NaN fails this too)
        raise ValueError(f"{where} must be a probability in [0, 1], got {value}")
    return value


def from_threshold(threshold: float, rule: str | None = None, target_fpr: float | None = None) -> dict:
    """The policy of a single threshold (no per-language ones): what a model or bundle without a
    `thresholds` entry is served with."""
    return {"default": _threshold_value(threshold, "threshold"), "by_lang": {}, "rule": rule or "",
            "target_fpr": target_fpr, "min_rows": {}, "languages": {}}


def validate(policy: Any) -> dict:
    """Check a policy read from JSON; returns it with `default` and `by_lang` values as floats.
    Raises ValueError naming the bad entry."""
    if not isinstance(policy, Mapping):
        raise ValueError(f"'thresholds' must be an object, got {type(policy).__name__}")
    if "default" not in policy:
        raise ValueError("'thresholds' has no 'default' threshold")
    by_lang = policy.get("by_lang") or {}
    if not isinstance(by_lang, Mapping):
        raise ValueError(f"'thresholds.by_lang' must be an object, got {type(by_lang).__name__}")
    unknown = sorted(set(by_lang) - set(LANGS))
    if unknown:
        raise ValueError(f"'thresholds.by_lang' has unknown language tag(s) {unknown} (known: {', '.join(LANGS)})")
    out = dict(policy)
    out["default"] = _threshold_value(policy["default"], "'thresholds.default'")
    out["by_lang"] = {lang: _threshold_value(v, f"'thresholds.by_lang.{lang}'") for lang, v in by_lang.items()}
    return out


def from_manifest(meta: Mapping) -> dict:
    """The policy of a spamlingo.json or bundle.json: its `thresholds` (validated), else one built from
    its single `threshold` (older models and bundles)."""
    if meta.get("thresholds") is not None:
        policy = validate(meta["thresholds"])
        if "threshold" in meta and not math.isclose(float(meta["threshold"]), policy["default"],
                                                    rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"'threshold' ({meta['threshold']}) differs from 'thresholds.default' "
                             f"({policy['default']})")
        return policy
    if "threshold" not in meta:
        raise ValueError("neither 'thresholds' nor 'threshold' is given")
    return from_threshold(meta["threshold"], meta.get("threshold_rule"), meta.get("target_fpr"))


def threshold_for(policy: Mapping, lang: str) -> tuple[float, str]:
    """(threshold, scope) for a text of language tag `lang`: ("lang:<tag>") its own, else the global one."""
    own = (policy.get("by_lang") or {}).get(lang)
    if own is not None:
        return float(own), lang_scope(lang)
    return float(policy["default"]), GLOBAL


def thresholds_for(policy: Mapping, langs: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Per-row thresholds (float64 array) and scopes of rows with language tags `langs`."""
    cache: dict[str, tuple[float, str]] = {}
    pairs = [cache.setdefault(str(x), threshold_for(policy, str(x))) for x in langs]
    return np.array([t for t, _ in pairs], dtype=np.float64), [s for _, s in pairs]


def apply(policy: Mapping, p_spam, langs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Vectorised labels: (is_spam as int 0/1, the threshold each row got, its scope)."""
    p = np.asarray(p_spam, dtype=np.float64).ravel()
    thresholds, scopes = thresholds_for(policy, langs)
    if thresholds.shape != p.shape:
        raise ValueError(f"{p.size} probabilities but {thresholds.size} language tags")
    return (p >= thresholds).astype(np.int64), thresholds, scopes


def describe(policy: Mapping) -> str:
    """One line: "global 0.73; lang:ko 0.41, lang:zh 0.88" (or "global 0.73" without per-language ones)."""
    text = f"global {float(policy['default']):.6g}"
    by_lang = policy.get("by_lang") or {}
    if by_lang:
        text += "; " + ", ".join(f"{lang_scope(k)} {float(v):.6g}" for k, v in sorted(by_lang.items()))
    return text
