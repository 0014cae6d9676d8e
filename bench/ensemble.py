"""Figure ensemble: would the model averaged with the TF-IDF baseline beat both? Measured, not shipped.

    python -m bench.run --only ensemble [--run <run>] [--bundle <dir>]     # after make ood (its folds' models)

Issue #10 lists "an ensemble with the TF-IDF model where it beats both" among the levers. For each weight w,
p = sigmoid(w * logit(p_model) + (1 - w) * logit(p_baseline)), its one threshold chosen on the validation split
by the config's rule (eval.threshold_rule, eval.target_fpr, eval.language_balanced_fpr) as each model's own is;
w = 1 is the model alone, w = 0 the baseline alone. Scored on the test split, on the out-of-distribution sets
(ood.unseen_ham, ood.eval_sets, ood.hard_negatives) and on each leave-one-corpus-out fold whose models `make ood`
left in <train.output_dir>-ood/<fold>/ (the fold's validation rows choose its threshold; a fold without them is
listed as skipped). The model is its bundle's graph when it has one, as in `make ood`; the baseline is the
one `make ood` compares with. Nothing here is served: a bundle carries the model only.
"""

from __future__ import annotations

import numpy as np

from bench.inputs import BenchError, Inputs, served_bundle
from training.metrics import fmt

TITLE = "Ensemble study: the model averaged with the TF-IDF baseline, by weight (not shipped)"
NEEDS = ("model",)
OPTIONS = ("bundle",)
WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
LANGS = ("zh", "ja", "ko", "en")


def combine(p_model, p_baseline, weight: float) -> np.ndarray:
    """The weighted mean of the two logits, as a probability."""
    def logit(p):
        p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))

    return 1.0 / (1.0 + np.exp(-(weight * logit(p_model) + (1 - weight) * logit(p_baseline))))


def _scored(scorers: dict, texts: list[str], labels) -> dict:
    out = {"y": np.asarray(labels, dtype=int)}
    for side, scorer in scorers.items():
        p, _thr, langs = scorer.score(texts)
        out[side], out["langs"] = p, np.asarray(langs)
    return out


def _fpr(p, threshold: float, mask) -> float | None:
    return float((p[mask] >= threshold).mean()) if mask.any() else None


def _sweep(cfg, val: dict, sets: dict[str, dict]) -> list[dict]:
    """One entry per weight: the threshold from `val`, then each set's metrics at it."""
    from training.metrics import binary_metrics, threshold_policy
    from training.ood import side_metrics

    e = cfg.eval
    rows = []
    for w in WEIGHTS:
        # the config's global rule, the languages' FPRs averaged when it says so (no unread ham: a study)
        threshold = float(threshold_policy(val["y"], combine(val["model"], val["baseline"], w), list(val["langs"]),
                                           e.threshold_rule, e.target_fpr, e.threshold_min_ham, e.threshold_min_spam,
                                           per_language=False, language_balanced=e.language_balanced_fpr,
                                           max_language_fpr=e.max_language_fpr)["default"])
        entry = {"weight": w, "threshold": threshold}
        for name, d in sets.items():
            p = combine(d["model"], d["baseline"], w)
            if name == "test" or name.startswith("fold:"):
                entry[name] = side_metrics(d["y"], p, np.full(len(p), threshold))
            elif name == "eval_sets":
                entry[name] = {lang: {"f1": binary_metrics(d["y"][m], p[m], threshold)["f1"],
                                      "fpr": _fpr(p, threshold, m & (d["y"] == 0))}
                               for lang in LANGS if (m := d["langs"] == lang).sum() >= 10}
                entry[name]["overall_fpr"] = _fpr(p, threshold, d["y"] == 0)
            else:  # ham only: FPR per language and overall
                entry[name] = {lang: _fpr(p, threshold, d["langs"] == lang) for lang in LANGS}
                entry[name]["overall"] = _fpr(p, threshold, np.ones(len(p), dtype=bool))
        rows.append(entry)
    return rows


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0, bundle: str | None = None) -> dict:
    from training import ood
    from training.config import resolve_path
    from training.data import ensure_prepared, load_splits
    from training.evaluate import _model_data, _split_rows
    from training.rows import exclude_sources

    cfg = inputs.cfg
    try:
        scorers = {"model": ood.model_scorer(cfg, inputs.model_dir, served_bundle(bundle, inputs), threads),
                   "baseline": ood.baseline_scorer(ood.find_baseline(cfg, inputs.meta))}
        data = _model_data(inputs.model_dir, inputs.meta, cfg)
        val_ds = _split_rows(inputs.model_dir, inputs.meta, cfg, "validation", data)[0]
        test_ds = _split_rows(inputs.model_dir, inputs.meta, cfg, "test", data)[0]
        files = {"unseen_ham": ood.read_rows(cfg.ood.unseen_ham, "unseen_ham"),
                 # the headline set, as in ood.json's overall / lang:* scopes of eval_sets
                 "eval_sets": ood.read_rows(cfg.ood.eval_sets[:1], "eval_sets"),
                 "hard_negatives": ood.read_rows(cfg.ood.hard_negatives, "hard_negatives")}
    except ood.OodError as e:
        raise BenchError(str(e)) from None
    val = _scored(scorers, list(val_ds["text"]), val_ds["label"])
    sets = {"test": _scored(scorers, list(test_ds["text"]), test_ds["label"])}
    for name, rows in files.items():
        if rows:
            sets[name] = _scored(scorers, [r["text"] for r in rows], [r["label"] for r in rows])
    result = {"weights": list(WEIGHTS), "rule": f"{cfg.eval.threshold_rule} at {cfg.eval.target_fpr:g}",
              "model": scorers["model"].describe, "baseline": scorers["baseline"].describe,
              "rows": {name: len(d["y"]) for name, d in {"validation": val, **sets}.items()},
              "sweep": _sweep(cfg, val, sets), "folds": [], "skipped_folds": {}}

    splits = None
    for name, fold in cfg.ood.folds.items():
        base = resolve_path(ood.fold_output_dir(cfg, name))
        model_dir, baseline_dir = base / "model", base / "baseline"
        if not (model_dir / "spamlingo.json").is_file() or not (baseline_dir / "baseline.json").is_file():
            result["skipped_folds"][name] = f"no fold model in {base} (make ood trains it)"
            continue
        if splits is None:
            ensure_prepared(cfg)
            splits = load_splits(cfg)
        fold_scorers = {"model": ood.model_dir_scorer(model_dir, cfg.eval.batch_size),
                        "baseline": ood.baseline_scorer(baseline_dir)}
        fold_val = exclude_sources(splits, list(fold.exclude))["validation"]
        rows = ood.fold_rows(cfg, fold, splits)
        fv = _scored(fold_scorers, list(fold_val["text"]), fold_val["label"])
        ft = _scored(fold_scorers, [r["text"] for r in rows], [r["label"] for r in rows])
        result["folds"].append({"fold": name, "rows": len(rows),
                                "sweep": _sweep(cfg, fv, {f"fold:{name}": ft})})
    return result


def _f(v, spec: str = ".3f", scale: float = 1.0) -> str:
    return fmt(None if v is None else v * scale, spec)


def render(result: dict) -> str:
    out = [f"Threshold rule {result['rule']} on validation, per weight w of the model (1 = the model alone, "
           f"0 = the baseline alone). Model: {result['model']}; baseline: {result['baseline']}. Rows: "
           + ", ".join(f"{k} {v}" for k, v in result["rows"].items()) + ".", "",
           "| w | threshold | test F1 | test FPR | unseen ham FPR zh / ja / ko / en | held-out F1 ja / ko / zh "
           "| held-out ham FPR ja / ko / zh | hard-negative FPR |",
           "|---:|---:|---:|---:|---|---|---|---:|"]
    for e in result["sweep"]:
        un, ev, hard = e.get("unseen_ham", {}), e.get("eval_sets", {}), e.get("hard_negatives", {})
        out.append(f"| {e['weight']:g} | {e['threshold']:.3f} | {_f(e['test']['f1'])} | "
                   f"{_f(e['test']['fpr'], '.2f', 100)}% | "
                   + " / ".join(_f(un.get(lang), ".1f", 100) for lang in LANGS) + "% | "
                   + " / ".join(_f((ev.get(lang) or {}).get("f1")) for lang in ("ja", "ko", "zh")) + " | "
                   + " / ".join(_f((ev.get(lang) or {}).get("fpr"), ".1f", 100) for lang in ("ja", "ko", "zh"))
                   + f"% | {_f(hard.get('overall'), '.1f', 100)}% |")
    if result["folds"]:
        out += ["", "Leave-one-corpus-out folds (F1 / ROC-AUC / FPR on the held-out rows):", "",
                "| fold | rows | " + " | ".join(f"w = {w:g}" for w in result["weights"]) + " |",
                "|---|---:|" + "---|" * len(result["weights"])]
        for fold in result["folds"]:
            cells = [f"{_f(m['f1'])} / {_f(m['roc_auc'])} / {_f(m['fpr'], '.1f', 100)}%"
                     for m in (e[f"fold:{fold['fold']}"] for e in fold["sweep"])]
            out.append(f"| {fold['fold']} | {fold['rows']} | " + " | ".join(cells) + " |")
    for name, why in result["skipped_folds"].items():
        out.append(f"\nFold {name} skipped: {why}.")
    return "\n".join(out) + "\n"
