"""Classification metrics for spam scores: threshold choice, per-group metrics, tables, MLflow names.

numpy + scikit-learn only, so training, evaluation, the baseline and the benchmarks score alike.

Conventions
- `p_spam` is the spam probability; a message is flagged spam iff `p_spam >= threshold` (as in serving).
  `threshold` is a float or per-row thresholds (an array): per-language thresholds (`threshold_policy`,
  applied by serving/thresholds.py) give each row the threshold of its language.
- A ratio that is 0/0 is NaN, never a made-up 0 or 1: a group with no spam has no recall, a group with one
  class has no ROC AUC. Nothing here raises on such groups.
- `grouped_metrics` keys are scopes: "overall", "source=<corpus>", "lang=<tag>". MLflow does not allow '='
  in metric names, so `to_mlflow_metrics` writes a scope as "source.<corpus>" / "lang.<tag>":
  `test/overall/f1`, `test/source.uci_sms/recall_at_fpr_1pct`, `val/lang.zh/pr_auc`.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

# The metrics logged for every scope (DESIGN §4), in table order.
METRIC_NAMES = (
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "pr_auc",
    "fpr",
    "recall_at_fpr_1pct",
    "recall_at_fpr_0.1pct",
)
# Counts logged beside them, so a per-source number can be read with its sample size.
COUNT_NAMES = ("support", "positives")
THRESHOLD_RULES = ("best_f1", "max_recall_at_fpr")


class ThresholdWarning(UserWarning):
    """The threshold rule could not be met on validation; a fallback threshold was used."""


# ------------------------------------------------------------------------------------------ helpers


def _arrays(y_true, p_spam) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(p_spam, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but p_spam has {p.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (ham) or 1 (spam), got {sorted(set(np.unique(y).tolist()))}")
    if not np.isfinite(p).all():
        raise ValueError("p_spam contains NaN or infinite values")
    return y, p


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def recall_at_fpr(y_true, p_spam, max_fpr: float) -> float:
    """The highest recall reachable by any threshold whose false-positive rate is <= `max_fpr`
    (threshold-free operating point; NaN when a class is missing). With fewer than 1/max_fpr ham rows
    this is the recall with zero false positives."""
    y, p = _arrays(y_true, p_spam)
    if y.min(initial=1) == y.max(initial=0):
        return math.nan
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max())


# ------------------------------------------------------------------------------------------ threshold


def _lower_midpoint(scores_desc: np.ndarray, t: float) -> float:
    """Half-way between score `t` and the next lower distinct validation score: flags exactly the same
    validation rows as `t`, but a score that moves by float rounding (PyTorch vs ONNX, fp32 vs int8) no
    longer flips its label. The lowest score is returned as is."""
    lower = scores_desc[scores_desc < t]
    return float((t + lower[0]) / 2.0) if lower.size else float(t)


def _group_fprs(y: np.ndarray, p: np.ndarray, w: np.ndarray, groups: np.ndarray,
                thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At each threshold of `thr`, the mean and the highest over the groups of each group's (weighted) ham FPR.
    Rows whose group is None count in no group."""
    rates = []
    for g in sorted({x for x in groups[y == 0].tolist() if x is not None}):
        ham = (y == 0) & (groups == g)
        order = np.argsort(p[ham])  # ascending
        ps, ws = p[ham][order], w[ham][order]
        above = np.r_[np.cumsum(ws[::-1])[::-1], 0.0]  # weight of the ham at index >= i
        rates.append(above[np.searchsorted(ps, thr, side="left")] / ws.sum())
    if not rates:
        return np.zeros(thr.size), np.zeros(thr.size)
    return np.mean(rates, axis=0), np.max(rates, axis=0)


def threshold_choice(y_true, p_spam, rule: str = "max_recall_at_fpr", target_fpr: float = 0.01,
                     sample_weight=None, fpr_groups=None, max_group_fpr: float = 0.0) -> dict:
    """Choose the decision threshold on validation scores and say how.

    Rules
    - "best_f1": the threshold with the highest F1 (ties: the higher threshold, fewer false alarms).
    - "max_recall_at_fpr": the highest recall whose validation FPR is <= `target_fpr` (ties: the higher
      threshold). When no threshold that flags any spam meets the target (e.g. the top-scored message is
      ham), it falls back to the lowest-FPR threshold that flags something and says so (`met=False`,
      `note`, plus a `ThresholdWarning`).
    A validation set with one class only cannot rank anything: 0.5 is returned with a warning.

    Returns {"threshold", "rule", "target_fpr", "met": bool, "note": str, "val_precision", "val_recall",
    "val_fpr", "val_f1"} where the val_* values are measured at the returned threshold.

    `sample_weight` (one per row) weighs the rows in every rate: the pooled ham of a `HamPool`, where a row
    stands for less than one validation row.

    `fpr_groups` (one label per row, None for a row of no group): the FPR that "max_recall_at_fpr" holds under
    `target_fpr` is the mean of each group's own FPR, so that each group (a language) counts the same however
    many ham rows it has (`eval.language_balanced_fpr`); `val_fpr_group_mean` is that mean at the threshold.
    `max_group_fpr` (> 0, with `fpr_groups`): no group's own FPR may exceed it either (`eval.max_language_fpr`);
    `val_fpr_group_max` is the highest group FPR at the threshold.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    if max_group_fpr and (fpr_groups is None or not target_fpr <= max_group_fpr < 1.0):
        raise ValueError(f"max_group_fpr needs fpr_groups and a value in [target_fpr, 1), got {max_group_fpr}")
    y, p = _arrays(y_true, p_spam)
    w = None if sample_weight is None else _weights(sample_weight, y.size)
    out = {"rule": rule, "target_fpr": float(target_fpr), "met": True, "note": ""}
    pos, neg = int(y.sum()), int(y.size - y.sum())
    if w is not None:  # the rates below are weighted; the counts in messages stay rows
        wpos, wneg = float(w[y == 1].sum()), float(w[y == 0].sum())
    else:
        wpos, wneg = pos, neg
    if pos == 0 or neg == 0:
        threshold = 0.5
        out.update(met=False, note=f"validation has {pos} spam and {neg} ham rows: no threshold can be "
                                   f"chosen, using {threshold}")
    else:
        # One candidate per distinct score: flag every row scoring >= it.
        fpr, tpr, thr = roc_curve(y, p, sample_weight=w, drop_intermediate=False)
        finite = np.isfinite(thr)  # drop roc_curve's leading +inf (flags nothing)
        fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
        tp = tpr * wpos
        fp = fpr * wneg
        if fpr_groups is not None:
            groups = np.asarray(fpr_groups, dtype=object)
            if groups.size != y.size:
                raise ValueError(f"fpr_groups has {groups.size} values for {y.size} rows")
            fpr, gmax = _group_fprs(y, p, np.ones(y.size) if w is None else w, groups, thr)
        if rule == "best_f1":
            f1 = 2 * tp / (2 * tp + fp + (wpos - tp))
            best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
            i = int(best[0])  # thresholds are descending: the first tie is the highest threshold
        else:
            ok = fpr <= target_fpr + 1e-12
            if max_group_fpr:
                ok &= gmax <= max_group_fpr + 1e-12
            feasible = np.flatnonzero(ok & (tpr > 0))
            if feasible.size:
                best_tpr = tpr[feasible].max()
                i = int(feasible[np.isclose(tpr[feasible], best_tpr, rtol=0, atol=1e-12)][0])
            else:
                lowest = np.isclose(fpr, fpr.min(), rtol=0, atol=1e-12)
                i = int(np.flatnonzero(lowest & (tpr == tpr[lowest].max()))[0])
                cap = f" with no group over {max_group_fpr:g}" if max_group_fpr else ""
                out.update(met=False, note=(
                    f"no threshold reaches FPR <= {target_fpr:g}{cap} on validation ({neg} ham rows); using the "
                    f"lowest-FPR threshold instead (FPR {fpr[i]:.4f}, recall {tpr[i]:.4f})"))
        scores_desc = np.unique(p)[::-1]
        threshold = _lower_midpoint(scores_desc, float(thr[i]))  # flags the rows thr[i] flags
        if fpr_groups is not None:
            out["val_fpr_group_mean"] = float(fpr[i])
            out["val_fpr_group_max"] = float(gmax[i])
            if max_group_fpr:
                out["max_group_fpr"] = float(max_group_fpr)
    if out["note"]:
        warnings.warn(out["note"], ThresholdWarning, stacklevel=3)
    m = binary_metrics(y, p, threshold) if w is None else weighted_rates(y, p, w, threshold)
    out.update(threshold=float(threshold), val_precision=m["precision"], val_recall=m["recall"],
               val_fpr=m["fpr"], val_f1=m["f1"])
    return out


def choose_threshold(y_true, p_spam, rule: str = "max_recall_at_fpr", target_fpr: float = 0.01) -> float:
    """The threshold of `threshold_choice` (see there): spam iff p_spam >= threshold."""
    return threshold_choice(y_true, p_spam, rule, target_fpr)["threshold"]


def threshold_spread(y_true, p_spam, rule: str = "max_recall_at_fpr", target_fpr: float = 0.01,
                     resamples: int = 200, level: float = 0.9, seed: int = 0, sample_weight=None,
                     groups=None, fpr_groups=None, max_group_fpr: float = 0.0) -> dict | None:
    """How far `threshold_choice` moves when validation is drawn again: the rule applied to `resamples`
    bootstrap resamples (ham and spam resampled apart, so each keeps its count), summarised as the
    central `level` interval and the median. At a strict FPR target the threshold is one of the few
    highest ham scores (0.5% of 3,000 ham: the 15th), so it moves with whichever ham happen to be in
    validation; a wide interval says the target asks more than the validation split can pin down.
    Deterministic per `seed`. None when `resamples` is 0 or a class is missing.
    With `sample_weight`, the rows keep their weights and the ham are resampled within each of their `groups`
    (the sources of a pooled ham set), so each group keeps its count. `fpr_groups`, `max_group_fpr`: as in
    `threshold_choice`."""
    if resamples < 0 or not 0.0 < level < 1.0:
        raise ValueError(f"resamples must be >= 0 and level in (0, 1), got {resamples} and {level}")
    y, p = _arrays(y_true, p_spam)
    w = np.ones(y.size) if sample_weight is None else _weights(sample_weight, y.size)
    g = np.zeros(y.size, dtype=object) if groups is None else np.asarray([str(x) for x in groups], dtype=object)
    fg = None if fpr_groups is None else np.asarray(fpr_groups, dtype=object)
    if resamples == 0 or not (y == 0).any() or not (y == 1).any():
        return None
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero((y == 0) & (g == k)) for k in sorted(set(g[y == 0].tolist()))]
    strata.append(np.flatnonzero(y == 1))
    found = np.empty(resamples)
    with warnings.catch_warnings():  # a resample that misses the target says so in its own choice only
        warnings.simplefilter("ignore", ThresholdWarning)
        for i in range(resamples):
            idx = np.concatenate([rng.choice(rows, rows.size) for rows in strata])
            found[i] = threshold_choice(y[idx], p[idx], rule, target_fpr,
                                        None if sample_weight is None else w[idx],
                                        None if fpr_groups is None else fg[idx], max_group_fpr)["threshold"]
    tail = (1.0 - level) / 2.0
    low, median, high = np.quantile(found, [tail, 0.5, 1.0 - tail])
    return {"low": float(low), "median": float(median), "high": float(high), "level": float(level),
            "resamples": int(resamples), "seed": int(seed)}


# Rule of three: with n ham rows and no false positive among them, the 95% upper bound on the FPR is about
# 3/n. A language with fewer than 3/target_fpr validation ham rows cannot show that its FPR is under the
# target, so its threshold may go below the global one only as far as it flags none of its validation ham.
LOWER_HAM_FACTOR = 3.0


def _clean(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def threshold_policy(y_val, p_val, langs: Sequence[str], rule: str = "max_recall_at_fpr",
                     target_fpr: float = 0.01, min_ham: int = 100, min_spam: int = 20, *,
                     per_language: bool = True, raise_only: bool = False, spread_resamples: int = 0,
                     pool: "HamPool | None" = None, language_balanced: bool = False,
                     max_language_fpr: float = 0.0) -> dict:
    """The threshold policy (serving/thresholds.py) chosen on validation scores.

    - `default`: `threshold_choice` on every validation row (the global threshold, as without languages).
    - `by_lang[lang]`: for each language tag with at least `min_ham` ham and `min_spam` spam validation
      rows (at least 1 of each), the same rule on that language's rows only. Guards:
      * the rule not met on the language's rows (`met=False`): its own threshold is kept only when it is
        higher than the global one (fewer false alarms), else the language falls back to the global one;
      * lowering: when its own threshold is below the global one and the language has fewer than
        `ceil(LOWER_HAM_FACTOR / target_fpr)` validation ham rows (300 at 1%: too few to show a 1% FPR),
        the threshold is chosen again with target FPR 0 on its rows (it flags none of its validation ham)
        and used only while still below the global one; otherwise the language falls back to the global
        threshold. Raising a threshold above the global one is never held back (it only removes alarms).
    - `raise_only`: a language's own threshold is used only when it is above the global one (it can only
      remove alarms of that language); a lower one falls back to the global threshold.
    - Languages below the minimum (or all, with `per_language=False`) use the global threshold.
    `languages[lang]` records every language of the validation split: ham and spam counts, `scope`
    ("lang:<tag>" or "global"), the threshold it gets, `reason`, and validation precision/recall/FPR of
    that language at that threshold. `global` is the global `threshold_choice`, with `spread`: the
    `threshold_spread` of the global threshold over `spread_resamples` resamples (None when 0). NaN is
    written as None.

    `pool` (a `HamPool`): ham the model never read joins the validation rows, weighted so that each source
    keeps its share of validation ham; every rate is then weighted, the counts are rows, and `global["pool"]`
    says what was pooled.

    `language_balanced`: the global rule holds the mean of the languages' FPRs under `target_fpr` instead of
    the FPR of all ham together, each language with at least `min_ham` ham rows (pooled rows included)
    counting the same; the ham of smaller languages counts in no mean. `global["fpr_languages"]` lists the
    languages averaged; with fewer than two such languages it is empty and all ham counts together, as
    without the option, under which the largest language's ham (English e-mail) sets the one threshold.
    `max_language_fpr` (> 0, with `language_balanced`): no averaged language's own FPR may exceed it either, so
    that languages the model finds easy cannot lend their share of the mean to another one.
    """
    from serving.thresholds import GLOBAL, lang_scope

    if max_language_fpr and not language_balanced:
        raise ValueError("max_language_fpr caps the languages' own FPRs: it needs language_balanced")
    if min_ham < 0 or min_spam < 0:
        raise ValueError(f"min_ham and min_spam must be >= 0, got {min_ham} and {min_spam}")
    y, p = _arrays(y_val, p_val)
    lang_arr = np.asarray([str(x) for x in langs], dtype=object)
    if lang_arr.size != y.size:
        raise ValueError(f"langs has {lang_arr.size} values for {y.size} rows")
    w = groups = None
    if pool is not None:
        y, p, lang_arr, w, groups = pool.join(y, p, lang_arr)
    fpr_groups = None
    if language_balanced:
        big = {g for g in set(lang_arr[y == 0].tolist()) if int(((lang_arr == g) & (y == 0)).sum()) >= min_ham}
        if len(big) < 2:  # nothing to balance: every ham row counts together, as without the option
            big = set()
        else:
            fpr_groups = np.asarray([g if g in big else None for g in lang_arr.tolist()], dtype=object)
    cap = max_language_fpr if fpr_groups is not None else 0.0
    choice = threshold_choice(y, p, rule, target_fpr, w, fpr_groups, cap)
    choice["spread"] = threshold_spread(y, p, rule, target_fpr, spread_resamples, sample_weight=w, groups=groups,
                                        fpr_groups=fpr_groups, max_group_fpr=cap)
    if language_balanced:
        choice["fpr_languages"] = sorted(big)
    if pool is not None:
        choice["pool"] = pool.describe()
    default = choice["threshold"]
    ham_to_lower = math.inf if target_fpr <= 0 else math.ceil(LOWER_HAM_FACTOR / target_fpr - 1e-9)
    need_ham, need_spam = max(1, int(min_ham)), max(1, int(min_spam))
    by_lang: dict[str, float] = {}
    languages: dict[str, dict] = {}
    for lang in sorted(set(lang_arr.tolist())):
        mask = lang_arr == lang
        yl, pl = y[mask], p[mask]
        wl = None if w is None else w[mask]
        spam = int(yl.sum())
        ham = int(yl.size - spam)
        threshold, reason, own, mine_used = default, "", None, False
        if not per_language:
            reason = "per-language thresholds are off (eval.per_language_thresholds=false)"
        elif ham < need_ham or spam < need_spam:
            reason = (f"too few validation rows ({ham} ham, {spam} spam; a threshold of its own needs "
                      f">= {need_ham} ham and >= {need_spam} spam)")
        else:
            with warnings.catch_warnings():  # a note per language goes into `reason`, not a warning each
                warnings.simplefilter("ignore", ThresholdWarning)
                mine = threshold_choice(yl, pl, rule, target_fpr, wl)
                own = mine["threshold"]
                if not mine["met"]:
                    if own > default:
                        threshold, mine_used = own, True
                        reason = f"{mine['note']}; kept as it is above the global threshold"
                    else:
                        reason = f"{mine['note']}; not below the global threshold: global used"
                elif own >= default or (ham >= ham_to_lower and not raise_only):
                    threshold, mine_used, reason = own, True, f"{rule} on its own validation rows"
                elif raise_only:
                    reason = (f"{rule} on its own rows gave {own:.6g}, below the global threshold: global used "
                              "(eval.per_language_lower=false)")
                else:
                    strict = threshold_choice(yl, pl, "max_recall_at_fpr", 0.0, wl)
                    if strict["met"] and strict["threshold"] < default:
                        threshold, mine_used = strict["threshold"], True
                        reason = (f"{rule} on its own rows gave {own:.6g}, below the global threshold with only "
                                  f"{ham} ham rows (< {ham_to_lower}): lowered only as far as no validation "
                                  "ham of it is flagged")
                    else:
                        reason = (f"{rule} on its own rows gave {own:.6g}, below the global threshold with only "
                                  f"{ham} ham rows (< {ham_to_lower}), and no lower threshold flags none of its "
                                  "validation ham: global used")
        scope = GLOBAL
        if mine_used:
            by_lang[lang] = float(threshold)
            scope = lang_scope(lang)
        m = binary_metrics(yl, pl, threshold) if wl is None else weighted_rates(yl, pl, wl, threshold)
        languages[lang] = {"ham": ham, "spam": spam, "scope": scope, "threshold": float(threshold),
                           "own_threshold": _clean(own), "reason": reason,
                           "val_precision": _clean(m["precision"]), "val_recall": _clean(m["recall"]),
                           "val_fpr": _clean(m["fpr"])}
    return {
        "default": float(default),
        "by_lang": by_lang,
        "rule": rule,
        "target_fpr": float(target_fpr),
        "min_rows": {"ham": int(min_ham), "spam": int(min_spam),
                     "ham_to_lower": None if math.isinf(ham_to_lower) else int(ham_to_lower)},
        "per_language": bool(per_language),
        "raise_only": bool(raise_only),
        "language_balanced": bool(language_balanced),
        "max_language_fpr": float(max_language_fpr),
        "languages": languages,
        "global": {k: _clean(v) for k, v in choice.items()},
    }


def config_threshold_policy(ecfg, y_val, p_val, langs: Sequence[str], pool: "HamPool | None" = None) -> dict:
    """`threshold_policy` with the settings of an `eval` config section (training, evaluation, baseline)."""
    return threshold_policy(y_val, p_val, langs, ecfg.threshold_rule, ecfg.target_fpr, ecfg.threshold_min_ham,
                            ecfg.threshold_min_spam, per_language=ecfg.per_language_thresholds,
                            raise_only=not ecfg.per_language_lower,
                            spread_resamples=ecfg.threshold_spread_resamples, pool=pool,
                            language_balanced=ecfg.language_balanced_fpr, max_language_fpr=ecfg.max_language_fpr)


@dataclass
class HamPool:
    """Ham the model never read, scored, to choose the threshold on together with validation
    (`eval.threshold_unread_ham`): at a strict FPR target the threshold is one of the few highest validation ham
    scores (0.5% of 2,935: the 15th), and more ham pins it down. Each ham row of a source, validation or
    pooled, weighs c / (c + u) (c validation and u pooled ham rows of the source), so every source keeps the
    share of validation ham it has and the rule means what it meant on validation alone."""
    p: np.ndarray  # the pooled rows' spam probabilities
    sources: list[str]
    langs: list[str]
    val_sources: list[str]  # one per validation row (the weights need each source's validation ham count)
    origin: str = "training rows the model did not read"
    rows_read: dict | None = None  # the caps whose complement the pooled rows are (training.rows.rows_read)

    def join(self, y, p, langs):
        """(y, p, langs, weights, groups) of validation followed by the pooled ham."""
        vs = np.asarray(self.val_sources, dtype=object)
        ps = np.asarray(self.sources, dtype=object)
        if vs.size != y.size:
            raise ValueError(f"val_sources has {vs.size} values for {y.size} validation rows")
        y2 = np.r_[y, np.zeros(len(self.p), dtype=np.int64)]
        p2 = np.r_[p, np.asarray(self.p, dtype=np.float64)]
        src = np.r_[vs, ps]
        w = np.ones(y2.size)
        for s in set(ps.tolist()):
            c = int(((vs == s) & (y == 0)).sum())
            u = int((ps == s).sum())
            # a source with no validation ham has no share to keep: its pooled rows weigh nothing
            w[(src == s) & (y2 == 0)] = c / (c + u)
        return y2, p2, np.r_[langs, np.asarray(self.langs, dtype=object)], w, src

    def describe(self) -> dict:
        counts: dict[str, int] = {}
        for s in self.sources:
            counts[str(s)] = counts.get(str(s), 0) + 1
        return {"rows": len(self.sources), "by_source": dict(sorted(counts.items())), "origin": self.origin,
                **({"rows_read": self.rows_read} if self.rows_read is not None else {})}


def weighted_rates(y, p, w, threshold) -> dict:
    """precision, recall, f1 and fpr at `threshold` with each row counted `w` times (`HamPool`)."""
    y, p = _arrays(y, p)
    pred = p >= _row_thresholds(threshold, y.size)
    tp, fp = float(w[pred & (y == 1)].sum()), float(w[pred & (y == 0)].sum())
    fn, neg = float(w[~pred & (y == 1)].sum()), float(w[y == 0].sum())
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "fpr": _ratio(fp, neg)}


def _weights(sample_weight, n: int) -> np.ndarray:
    w = np.asarray(sample_weight, dtype=np.float64).ravel()
    if w.size != n or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"sample_weight must be {n} finite values >= 0")
    return w


def spread_text(choice: Mapping) -> str:
    """`threshold_choice`'s spread in words ("" when it has none), for the lines that print a threshold."""
    s = choice.get("spread")
    if not s:
        return ""
    of = "resamples of validation and the unread ham" if choice.get("pool") else "validation resamples"
    return (f"{s['level']:.0%} of {s['resamples']} {of} choose {s['low']:.4g}-{s['high']:.4g} "
            f"(median {s['median']:.4g})")


def balance_text(choice: Mapping) -> str:
    """What `eval.language_balanced_fpr` averaged, in words ("" when it was off or had nothing to balance)."""
    langs = choice.get("fpr_languages")
    if not langs:
        return ""
    mean, cap, top = choice.get("val_fpr_group_mean"), choice.get("max_group_fpr"), choice.get("val_fpr_group_max")
    return (f"the FPR held under the target is the mean of {', '.join(langs)}'s own"
            + (f" ({mean:.4f} at this threshold)" if mean is not None else "")
            + (f", none of them over {cap:g} (the highest: {top:.4f})" if cap and top is not None else ""))


def choice_text(choice: Mapping) -> str:
    """`balance_text` and `spread_text` on one line ("" when both are empty), for one-line threshold reports."""
    return "; ".join(t for t in (balance_text(choice), spread_text(choice)) if t)


# ------------------------------------------------------------------------------------------ metrics


def _row_thresholds(threshold, n: int) -> float | np.ndarray:
    """A float threshold as is, or per-row thresholds (one per row, e.g. serving.thresholds.thresholds_for)."""
    if np.ndim(threshold) == 0:
        return float(threshold)
    t = np.asarray(threshold, dtype=np.float64).ravel()
    if t.size != n:
        raise ValueError(f"{t.size} per-row thresholds for {n} rows")
    if not np.isfinite(t).all():
        raise ValueError("thresholds contain NaN or infinite values")
    return t


def threshold_value(threshold) -> float:
    """The one threshold of a float or of per-row thresholds that are all equal; NaN when they differ."""
    t = np.asarray(threshold, dtype=np.float64).ravel()
    return float(t[0]) if t.size and (t == t[0]).all() else math.nan


def binary_metrics(y_true, p_spam, threshold, ranking: bool = True) -> dict:
    """Metrics of one group at `threshold`: a float, or an array of per-row thresholds (each row flagged
    iff its p_spam >= its threshold, as with per-language thresholds). `ranking=False` leaves the
    threshold-free metrics (roc_auc, pr_auc, recall_at_fpr_*) NaN instead of computing them.

    Returns {"support", "positives", "negatives", "tp", "fp", "tn", "fn", "threshold", "precision",
    "recall", "f1", "fpr", "accuracy", "roc_auc", "pr_auc" (average precision), "recall_at_fpr_1pct",
    "recall_at_fpr_0.1pct"}; counts are ints, the rest floats, NaN where undefined ("threshold" is NaN
    when the per-row thresholds differ).
    """
    y, p = _arrays(y_true, p_spam)
    threshold = _row_thresholds(threshold, y.size)
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    pos, neg = tp + fn, fp + tn
    two_classes = pos > 0 and neg > 0
    ranked = two_classes and ranking
    return {
        "support": int(y.size),
        "positives": pos,
        "negatives": neg,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": threshold_value(threshold),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, pos),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "fpr": _ratio(fp, neg),
        "accuracy": _ratio(tp + tn, y.size),
        "roc_auc": float(roc_auc_score(y, p)) if ranked else math.nan,
        "pr_auc": float(average_precision_score(y, p)) if ranked else math.nan,
        "recall_at_fpr_1pct": recall_at_fpr(y, p, 0.01) if ranked else math.nan,
        "recall_at_fpr_0.1pct": recall_at_fpr(y, p, 0.001) if ranked else math.nan,
    }


def grouped_metrics(y_true, p_spam, threshold, groups: Mapping[str, Sequence] | None = None) -> dict:
    """`binary_metrics` overall and for every value of every grouping.

    threshold: a float, or per-row thresholds (an array as long as y): every scope then counts each row
    at the threshold that row got (per-language thresholds give per-source metrics too).
    groups: {"source": per-row corpus names, "lang": per-row language tags, ...} (each as long as y).
    Returns {"overall": {...}, "source=enron": {...}, "source=uci_sms": {...}, "lang=en": {...}, ...}
    with groupings in the given order and values sorted.
    """
    y, p = _arrays(y_true, p_spam)
    threshold = _row_thresholds(threshold, y.size)
    out = {"overall": binary_metrics(y, p, threshold)}
    for name, values in (groups or {}).items():
        v = np.asarray(values, dtype=object).ravel()
        if v.size != y.size:
            raise ValueError(f"group '{name}' has {v.size} values for {y.size} rows")
        for value in sorted({str(x) for x in v}):
            mask = np.array([str(x) == value for x in v], dtype=bool)
            t = threshold[mask] if isinstance(threshold, np.ndarray) else threshold
            out[f"{name}={value}"] = binary_metrics(y[mask], p[mask], t)
    return out


# ------------------------------------------------------------------------------------------ reporting

_TABLE_COLUMNS = (
    ("support", "rows"),
    ("positives", "spam"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("fpr", "FPR"),
    ("roc_auc", "ROC AUC"),
    ("pr_auc", "PR AUC"),
    ("recall_at_fpr_1pct", "R@1%FPR"),
    ("recall_at_fpr_0.1pct", "R@0.1%FPR"),
)


def fmt(value, spec: str = ".4f", missing: str = "n/a") -> str:
    """A number for a report table (format spec `spec`): `missing` where it is None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _fmt(value) -> str:
    return str(int(value)) if isinstance(value, (int, np.integer)) else fmt(value)


def metrics_table(grouped: Mapping[str, Mapping]) -> str:
    """A markdown table, one row per scope ("n/a" where a metric is undefined for that group)."""
    lines = [
        "| scope | " + " | ".join(title for _, title in _TABLE_COLUMNS) + " |",
        "|---|" + "---:|" * len(_TABLE_COLUMNS),
    ]
    for scope, m in grouped.items():
        lines.append(f"| {scope} | " + " | ".join(_fmt(m.get(key)) for key, _ in _TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


_BAD_NAME_CHARS = re.compile(r"[^\w.\- /]")


def mlflow_scope(scope: str) -> str:
    """"source=uci_sms" -> "source.uci_sms"; any character MLflow rejects in a metric name -> '_'."""
    name = _BAD_NAME_CHARS.sub("_", scope.replace("=", ".", 1).replace("/", "_"))
    return name.strip(". ") or "_"


def metric_name(split: str, scope: str, metric: str) -> str:
    """The MLflow metric name `<split>/<scope>/<metric>` ("validation" is written "val")."""
    split = "val" if split == "validation" else split
    return f"{split}/{mlflow_scope(scope)}/{metric}"


def to_mlflow_metrics(grouped: Mapping[str, Mapping], split: str, counts: bool = True) -> dict[str, float]:
    """{"test/overall/f1": 0.97, "test/source.uci_sms/recall": 0.95, ...} for `mlflow.log_metrics`.

    The METRIC_NAMES of every scope (plus `support`/`positives` when `counts`); undefined (NaN) values
    are left out rather than logged as NaN.
    """
    names = METRIC_NAMES + (COUNT_NAMES if counts else ())
    out = {}
    for scope, m in grouped.items():
        for metric in names:
            value = m.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            out[metric_name(split, scope, metric)] = float(value)
    return out
