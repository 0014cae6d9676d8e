"""Evaluation plots (matplotlib, Agg backend: no display needed). Each function saves one PNG and returns
its path; `evaluation_plots` makes the whole set for one split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from training.metrics import binary_metrics, grouped_metrics, threshold_value  # noqa: E402

DPI = 110


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _curve_groups(y, p, groups: Mapping[str, Sequence] | None, key: str = "source"):
    """("overall", y, p) then one entry per value of groups[key] that has both classes."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    out = [("overall", y, p)]
    if groups and key in groups:
        v = np.asarray([str(x) for x in groups[key]])
        for value in sorted(set(v)):
            m = v == value
            if 0 < y[m].sum() < m.sum():  # a curve needs both ham and spam
                out.append((f"{key}={value}", y[m], p[m]))
    return out


def pr_curve(y_true, p_spam, path, groups: Mapping[str, Sequence] | None = None, title: str = "") -> Path:
    """Precision-recall curves, overall (thick) and per source, with average precision in the legend."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, (name, y, p) in enumerate(_curve_groups(y_true, p_spam, groups)):
        if y.min(initial=1) == y.max(initial=0):
            continue
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, lw=2.5 if i == 0 else 1.2,
                label=f"{name} (AP {average_precision_score(y, p):.3f}, n={y.size})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.02),
           title=f"Precision-recall {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def roc_plot(y_true, p_spam, path, groups: Mapping[str, Sequence] | None = None, title: str = "") -> Path:
    """ROC curves on a log FPR axis (the low-FPR end is where a spam filter lives), overall and per source,
    with the 1% and 0.1% FPR operating points marked."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, (name, y, p) in enumerate(_curve_groups(y_true, p_spam, groups)):
        if y.min(initial=1) == y.max(initial=0):
            continue
        fpr, tpr, _ = roc_curve(y, p)
        floor = 1.0 / max(1, int((y == 0).sum()))  # log axis: show FPR 0 at one false positive's worth
        ax.step(np.maximum(fpr, floor / 2), tpr, where="post", lw=2.5 if i == 0 else 1.2,
                label=f"{name} (AUC {roc_auc_score(y, p):.3f})")
    for x in (0.01, 0.001):
        ax.axvline(x, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set(xlabel="false-positive rate (log)", ylabel="recall (true-positive rate)", ylim=(0, 1.02),
           title=f"ROC {title}".strip())
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _threshold_text(threshold) -> str:
    """"threshold 0.73", or "per-language thresholds" for per-row thresholds that differ."""
    one = threshold_value(threshold)
    return "per-language thresholds" if math.isnan(one) else f"threshold {one:.3g}"


def confusion_plot(y_true, p_spam, threshold, path, title: str = "") -> Path:
    """2x2 confusion matrix at `threshold` (a float or per-row thresholds), counts and row percentages."""
    m = binary_metrics(y_true, p_spam, threshold)
    cells = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    rows = cells.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(cells / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)
    for (r, c), n in np.ndenumerate(cells):
        share = n / rows[r, 0] if rows[r, 0] else math.nan
        ax.text(c, r, f"{n}\n({share:.1%})" if rows[r, 0] else f"{n}", ha="center", va="center",
                color="white" if rows[r, 0] and share > 0.6 else "black")
    ax.set_xticks([0, 1], ["ham", "spam"])
    ax.set_yticks([0, 1], ["ham", "spam"])
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion at {_threshold_text(threshold)} {title}".strip())
    return _save(fig, path)


def f1_bars(grouped: Mapping[str, Mapping], path, title: str = "") -> Path:
    """F1 per source and per language (bars), with the overall F1 as a dashed line; n per bar."""
    panels = [(k, [s for s in grouped if s.startswith(k + "=")]) for k in ("source", "lang")]
    panels = [(k, scopes) for k, scopes in panels if scopes] or [("overall", ["overall"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    overall = grouped.get("overall", {}).get("f1", math.nan)
    for ax, (key, scopes) in zip(axes[0], panels):
        names = [s.split("=", 1)[-1] for s in scopes]
        values = [grouped[s].get("f1", math.nan) for s in scopes]
        bars = ax.bar(names, [0 if math.isnan(v) else v for v in values], color="tab:blue")
        for b, s, v in zip(bars, scopes, values):
            label = "n/a" if math.isnan(v) else f"{v:.3f}"
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01,
                    f"{label}\nn={grouped[s].get('support', '?')}", ha="center", va="bottom", fontsize=8)
        if not math.isnan(overall):
            ax.axhline(overall, color="black", ls="--", lw=1, label=f"overall {overall:.3f}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set(ylim=(0, 1.18), ylabel="F1", title=f"F1 by {key} {title}".strip())
        ax.tick_params(axis="x", rotation=20)
    return _save(fig, path)


def score_histogram(y_true, p_spam, threshold, path, title: str = "") -> Path:
    """Spam-probability histograms of ham and spam rows (log count axis) with the threshold marked (each
    distinct one, for per-row thresholds)."""
    y, p = np.asarray(y_true).astype(int), np.asarray(p_spam, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 51)
    for label, name, color in ((0, "ham", "tab:green"), (1, "spam", "tab:red")):
        if (y == label).any():
            ax.hist(p[y == label], bins=bins, alpha=0.55, color=color, label=f"{name} (n={(y == label).sum()})")
    distinct = np.unique(np.asarray(threshold, dtype=float).ravel())
    for i, t in enumerate(distinct):
        label = f"threshold {t:.3g}" if distinct.size == 1 else ("thresholds (per language)" if i == 0 else None)
        ax.axvline(t, color="black", ls="--", lw=1.2, label=label)
    ax.set_yscale("log")
    ax.set(xlabel="spam probability", ylabel="rows (log)", title=f"Scores by label {title}".strip())
    ax.legend(fontsize=8)
    return _save(fig, path)


def evaluation_plots(
    y_true,
    p_spam,
    threshold,
    groups: Mapping[str, Sequence] | None,
    out_dir: str | Path,
    prefix: str = "test",
    grouped: Mapping[str, Mapping] | None = None,
    title: str = "",
) -> list[Path]:
    """All plots of one split into out_dir: <prefix>_pr_curve.png, <prefix>_roc_curve.png,
    <prefix>_confusion.png, <prefix>_f1_by_group.png, <prefix>_score_hist.png."""
    out = Path(out_dir)
    grouped = grouped or grouped_metrics(y_true, p_spam, threshold, groups)
    label = f"({prefix}{', ' + title if title else ''})"
    return [
        pr_curve(y_true, p_spam, out / f"{prefix}_pr_curve.png", groups, label),
        roc_plot(y_true, p_spam, out / f"{prefix}_roc_curve.png", groups, label),
        confusion_plot(y_true, p_spam, threshold, out / f"{prefix}_confusion.png", label),
        f1_bars(grouped, out / f"{prefix}_f1_by_group.png", label),
        score_histogram(y_true, p_spam, threshold, out / f"{prefix}_score_hist.png", label),
    ]
