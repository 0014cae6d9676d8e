"""Figure probe: does the fine-tuned head or do its features limit transfer? A study, not shipped.

    python -m bench.run --only probe [--run <run>]        # after make ood (its folds' models)

The brief's clue was a logistic regression on *frozen* multilingual-e5-small features that held its false
alarms on unseen Chinese e-mail where the fine-tuned model of the time did not. This study asks the same of the
current recipe, by ranking alone (ROC-AUC, PR-AUC: no threshold), on rows each model never trained on:
- model: the model as trained (its own head, on its own, WiSE-FT-interpolated, features);
- refit: a logistic regression fitted again on those same features, of the rows the model trained on (its
  `rows_read`), standardised, at inverse regularisation C (PROBE_C below);
- frozen: the same regression on the pretrained encoder's features (the model's encoder interpolated all the
  way back, alpha 0), the frozen-feature probe; absent for a backbone without pretrained weights;
- baseline: the TF-IDF model `make ood` compares with, where it is on disk.
Scopes: the run on the held-out scam set (the first file of ood.eval_sets) and on the test split, and each
leave-one-corpus-out fold whose models `make ood` left in <train.output_dir>-ood/<fold>/ on its held-out rows.
Training augmentation (train.augment) is not replayed: the probes read the capped rows as they are.
"""

from __future__ import annotations

import copy
import sys

import numpy as np

from bench.inputs import BenchError, Inputs
from training.metrics import fmt

TITLE = "Probe study: the model's own head against a logistic regression on its features or the pretrained ones"
NEEDS = ("model",)
# Stronger than the LP stage's 1.0: on the default run's five folds, 0.1 ranked each held-out corpus at least as
# well as 1.0 did, refit and frozen alike (frozen: 0.005-0.034 better on each), measured once.
PROBE_C = 0.1
SIDES = ("model", "refit", "frozen", "baseline")


def _ranking(y: np.ndarray, p: np.ndarray | None) -> dict | None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if p is None:
        return None
    if y.min() == y.max():
        return {"roc_auc": None, "pr_auc": None}
    return {"roc_auc": float(roc_auc_score(y, p)), "pr_auc": float(average_precision_score(y, p))}


class Features:
    """Mean-pooled features of one model directory (and of its encoder reset to `pretrained` weights), by text."""

    def __init__(self, model_dir, batch_size: int, pretrained: dict | None):
        import torch

        from training.evaluate import load_model
        from training.interpolate import interpolate
        from training.modeling import pooling_of

        self.model, self.encoder, self.meta = load_model(model_dir)
        if pooling_of(self.model) != "mean":
            raise BenchError(f"{model_dir}: the probe study reads mean-pooled features (model.pooling=mean)")
        self.mask = bool(self.meta["text"].get("mask_digits", True))
        self.batch_size = batch_size
        self.pretrained = None
        if pretrained is not None:  # the backbone's weights, loaded once for the run and every fold
            self.pretrained = copy.deepcopy(self.model)
            interpolate(self.pretrained, pretrained, 0.0)
        with torch.no_grad():  # the head: two logits, their difference is the log-odds of spam
            weight = self.model.classifier.weight.detach().float().cpu().numpy()
            bias = self.model.classifier.bias.detach().float().cpu().numpy()
        self.head = (weight[1] - weight[0], float(bias[1] - bias[0]))

    def of(self, texts: list[str], which: str = "model") -> np.ndarray:
        from serving.text import normalize
        from training.modeling import pooled_features

        ids = [e.input_ids for e in self.encoder.encode_batch([normalize(t, self.mask) for t in texts])]
        model = self.model if which == "model" else self.pretrained
        return pooled_features(model, self.encoder, ids, self.batch_size, desc=f"{which} features")


def probe_scopes(feats: Features, train_texts: list[str], train_labels, sets: dict[str, tuple[list, list]],
                 baseline=None, C: float = PROBE_C, seed: int = 13) -> list[dict]:
    """One entry per set: its rows and spam, and each side's ranking of it (None for a side not measured)."""
    from training.modeling import fit_probe

    y_train = np.asarray(train_labels, dtype=int)
    fitted = {"refit": fit_probe(feats.of(train_texts), y_train, C, "balanced", seed)[:2]}
    if feats.pretrained is not None:
        fitted["frozen"] = fit_probe(feats.of(train_texts, "frozen"), y_train, C, "balanced", seed)[:2]
    def log_odds(x, head):  # ranked as float64 log-odds: a float32 probability rounds confident rows to ties
        return x.astype(np.float64) @ np.asarray(head[0], dtype=np.float64) + head[1]

    out = []
    for name, (texts, labels) in sets.items():
        y = np.asarray(labels, dtype=int)
        x = feats.of(texts)
        sides = {"model": log_odds(x, feats.head), "refit": log_odds(x, fitted["refit"])}
        sides["frozen"] = log_odds(feats.of(texts, "frozen"), fitted["frozen"]) if "frozen" in fitted else None
        sides["baseline"] = baseline.proba(texts) if baseline is not None else None
        out.append({"scope": name, "rows": int(y.size), "spam": int(y.sum()), "train_rows": int(y_train.size),
                    **{side: _ranking(y, p) for side, p in sides.items()}})
        print(f"[probe] {name}: " + ", ".join(f"{s} {fmt((out[-1][s] or {}).get('roc_auc'), '.3f')}"
                                              for s in SIDES), file=sys.stderr, flush=True)
    return out


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0) -> dict:
    import torch

    from training import ood
    from training.config import resolve_path
    from training.data import ensure_prepared, load_splits
    from training.evaluate import _model_data, _split_rows
    from training.interpolate import InterpolateError, pretrained_state
    from training.rows import exclude_sources, rows_kept, rows_read

    torch.set_num_threads(max(1, threads))
    cfg = inputs.cfg
    bs, cache = cfg.eval.batch_size, cfg.model.cache_dir
    result = {"C": PROBE_C, "scopes": [], "skipped_folds": {}, "frozen_skipped": None, "baseline_skipped": None}

    def train_rows(meta: dict, train_split):
        rows = rows_kept(meta.get("rows_read") or rows_read(cfg, train_split), train_split)
        return list(rows["text"]), list(rows["label"])

    try:
        held_out = ood.read_rows(cfg.ood.eval_sets[:1], "eval_sets") if cfg.ood.eval_sets else []
    except ood.OodError as e:
        raise BenchError(str(e)) from None
    try:  # a study: without a baseline run its column stays empty instead of training one here
        baseline = ood.baseline_scorer(ood.find_baseline(cfg, inputs.meta, train_if_missing=False))
    except ood.OodError as e:
        baseline, result["baseline_skipped"] = None, str(e)
    try:
        pretrained = pretrained_state(inputs.meta["backbone"], cache)
    except InterpolateError as e:
        pretrained, result["frozen_skipped"] = None, str(e)
    feats = Features(inputs.model_dir, bs, pretrained)
    data = _model_data(inputs.model_dir, inputs.meta, cfg)  # the run's own splits
    test = _split_rows(inputs.model_dir, inputs.meta, cfg, "test", data)[0]
    sets = {"run:test": (list(test["text"]), list(test["label"]))}
    if held_out:
        sets["run:eval_sets"] = ([r["text"] for r in held_out], [r["label"] for r in held_out])
    run_train = _split_rows(inputs.model_dir, inputs.meta, cfg, "train", data)[0]
    result["scopes"] += probe_scopes(feats, *train_rows(inputs.meta, run_train), sets, baseline)

    splits = None
    for name, fold in cfg.ood.folds.items():
        base = resolve_path(ood.fold_output_dir(cfg, name))
        if not (base / "model" / "spamlingo.json").is_file():
            result["skipped_folds"][name] = f"no fold model in {base} (make ood trains it)"
            continue
        if splits is None:  # the folds were trained on the config's data, as make ood prepares it
            ensure_prepared(cfg)
            splits = load_splits(cfg)
        fold_feats = Features(base / "model", bs, pretrained)
        rows = ood.fold_rows(cfg, fold, splits)
        fold_baseline = (ood.baseline_scorer(base / "baseline") if (base / "baseline" / "baseline.json").is_file()
                         else None)
        result["scopes"] += probe_scopes(
            fold_feats, *train_rows(fold_feats.meta, exclude_sources(splits, list(fold.exclude))["train"]),
            {f"fold:{name}": ([r["text"] for r in rows], [r["label"] for r in rows])}, fold_baseline)
    return result


def render(result: dict) -> str:
    def cell(m):
        return "-" if not m else f"{fmt(m['roc_auc'], '.3f')} / {fmt(m['pr_auc'], '.3f')}"

    out = [f"Ranking (ROC-AUC / PR-AUC) of rows each model never trained on. model: as trained; refit: logistic "
           f"regression (C {result['C']:g}) on the model's own mean-pooled features of its training rows; frozen: "
           "the same on the pretrained encoder's features; baseline: TF-IDF on the same rows.", "",
           "| scope | rows (spam) | training rows | model | refit | frozen | baseline |",
           "|---|---:|---:|---|---|---|---|"]
    for s in result["scopes"]:
        out.append(f"| {s['scope']} | {s['rows']} ({s['spam']}) | {s['train_rows']} | "
                   + " | ".join(cell(s.get(side)) for side in SIDES) + " |")
    if result.get("baseline_skipped"):
        out.append(f"\nNo baseline column for the run: {result['baseline_skipped']}")
    if result.get("frozen_skipped"):
        out.append(f"\nNo frozen probe: {result['frozen_skipped']}")
    for name, why in result["skipped_folds"].items():
        out.append(f"\nFold {name} skipped: {why}.")
    return "\n".join(out) + "\n"
