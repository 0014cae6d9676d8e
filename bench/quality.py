"""Figure quality: spam F1 and ROC-AUC on the test split, overall, per source and per language, for
- the trained model in PyTorch: the test metrics its training run logged (training.train scores the model
  directory as written at its stored threshold), or, for a model without a run in this store, measured
  now by training.evaluate.evaluate_model_dir;
- its bundle's int8 graph, measured now through serving.inference.Classifier (the serving path);
- the TF-IDF baseline: the newest finished baseline run on the same data (logged test metrics), trained
  first by training.baseline when there is none (not with --quick).
And how far the bundle's scores move with their batch-mates: a seeded sample of test rows scored one at a
time against the same rows in the batches of 64 above (max and 99th-percentile |Δp|, labels that change at
the shipped thresholds). The int8 graph quantises some activations with one scale per batch tensor, so a
message's score depends a little on what it is batched with (the server batches concurrent requests).
"""

from __future__ import annotations


from bench.inputs import Inputs, load_split, run_config
from training.metrics import fmt, metric_name

TITLE = "Quality on the test split: PyTorch model vs int8 bundle vs TF-IDF baseline"
NEEDS = ("model", "bundle", "data")
METRICS = ("f1", "roc_auc")
KEEP = ("f1", "roc_auc", "precision", "recall", "support", "positives")
BATCH_SAMPLE = 400  # rows scored alone for the batch-invariance figure (40 with --quick)


def _slim(grouped: dict) -> dict:
    return {scope: {k: m.get(k) for k in KEEP} for scope, m in grouped.items()}


def _baseline(inputs: Inputs, scopes: list[str], quick: bool) -> tuple[dict | None, dict]:
    """Test metrics of the TF-IDF baseline on the model's data: the newest finished baseline run with the
    model's data_hash and threshold rule (else the newest one with that rule, flagged), trained first (not with
    --quick) when there is none and the run's config prepares the same data."""
    from mlflow import MlflowClient

    from training.baseline import find_runs, run_baseline, same_rule_config
    from training.config import resolve_path

    want = inputs.meta.get("data_hash")
    run, runs = find_runs(inputs.cfg, inputs.meta)
    trained = False
    if run is None:
        cfg, cfg_source = run_config(inputs)
        same_data = inputs.data_dir is not None and \
            resolve_path(cfg.data.output_dir).resolve() == inputs.data_dir.resolve()
        if not quick and same_data:
            print(f"no baseline run on data {str(want)[:12]} with the model's threshold rule: training one with "
                  f"{cfg_source}", flush=True)
            run = MlflowClient().get_run(run_baseline(same_rule_config(cfg, inputs.meta)).run_id)
            trained = True
        elif runs:
            run = runs[0]
        else:
            why = "--quick" if quick else "the run's config does not prepare the model's data"
            return None, {"note": f"no baseline run with the model's threshold rule in experiment "
                                  f"'{inputs.cfg.tracking.experiment}' and none trained ({why}): run `make "
                                  "baseline` with the model's config"}
    out = logged_test_metrics(run, scopes)
    info = {"run_id": run.info.run_id, "run_name": run.info.run_name, "trained_by_bench": trained,
            "data_hash": run.data.tags.get("data_hash")}
    if want and info["data_hash"] != want:
        info["note"] = (f"baseline run {run.info.run_id[:8]} used data {str(info['data_hash'])[:12]}, the model "
                        f"{want[:12]}: their test splits differ")
    return out, info


def logged_test_metrics(run, scopes: list[str]) -> dict:
    """{scope: {metric: value}} of a run's logged `test/<scope>/<metric>` metrics (training.metrics names)."""
    out = {}
    for scope in scopes:
        vals = {k: run.data.metrics.get(metric_name("test", scope, k)) for k in KEEP}
        if any(v is not None for v in vals.values()):
            out[scope] = vals
    return out


def _pytorch(inputs: Inputs, scopes: list[str], n_rows: int, threads: int) -> tuple[dict, str]:
    """The trained model's test metrics: those its training run logged (training.train scores the model
    directory as written, on this split, at this threshold), else measured now by training.evaluate. A model
    whose thresholds were chosen again since (`make threshold`: they differ from those the run's test metrics were
    scored at, tracking.SCORED_AT_TAG, a per-language one included) is measured now."""
    if inputs.run_id and inputs.meta.get("data_hash"):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from serving.thresholds import describe
        from training import tracking
        from training.evaluate import model_policy

        try:
            tracking.setup(inputs.cfg)
            run = MlflowClient().get_run(inputs.run_id)
        except MlflowException:
            run = None
        scored_at = run.data.tags.get(tracking.SCORED_AT_TAG + "test") if run is not None else None
        if scored_at is not None:
            same_threshold = scored_at == describe(model_policy(inputs.meta))
        else:  # a run logged before the tag: its last global threshold, and whether make threshold ran
            logged_threshold = run.data.metrics.get("threshold") if run is not None else None
            same_threshold = (logged_threshold is not None and inputs.meta.get("threshold") is not None
                              and abs(logged_threshold - float(inputs.meta["threshold"])) < 1e-9
                              and "spamlingo.rethreshold" not in run.data.tags)
        if same_threshold and run.data.tags.get("data_hash") == inputs.meta["data_hash"]:
            logged = logged_test_metrics(run, scopes)
            if (logged.get("overall") or {}).get("support") == n_rows:
                return logged, f"logged by training run {inputs.run_id}"
    import torch

    from training.evaluate import evaluate_model_dir

    torch.set_num_threads(threads)
    result = evaluate_model_dir(inputs.model_dir, inputs.cfg, "test", log=False, progress=True)
    return _slim(result.grouped), "measured now (training.evaluate.evaluate_model_dir)"


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0) -> dict:
    import numpy as np

    from serving.bundle import load_bundle
    from serving.inference import Classifier
    from serving.thresholds import thresholds_for
    from training import metrics as M

    notes = {}
    test = load_split(inputs, "test")
    labels = np.asarray(test["label"], dtype=int)
    bundle = load_bundle(inputs.bundle_dir)
    variant = "int8" if bundle.has("int8") else "fp32"
    if variant != "int8":
        notes["onnx"] = f"the bundle has no int8 graph ({bundle.int8.get('reason') or 'not exported'}): fp32 shown"
    clf = Classifier(bundle, variant=variant, threads=threads, batch_size=64)
    p = clf.predict_proba(list(test["text"]))
    groups = {"source": list(test["source"]), "lang": list(test["lang"])}
    # each row at its language's threshold, as the server labels it (serving/thresholds.py)
    onnx = _slim(M.grouped_metrics(labels, p, thresholds_for(clf.policy, groups["lang"])[0], groups))
    scopes = list(onnx)  # overall, source=..., lang=...

    alone = _batch_invariance(clf, list(test["text"]), p, thresholds_for(clf.policy, groups["lang"])[0],
                              BATCH_SAMPLE // 10 if quick else BATCH_SAMPLE, seed)
    torch_metrics, how = _pytorch(inputs, scopes, len(labels), threads)
    models = {"pytorch": {"threshold": inputs.meta.get("threshold"), "metrics": torch_metrics, "source": how},
              f"onnx_{variant}": {"threshold": clf.threshold, "metrics": onnx,
                                  "source": "measured now (serving.inference.Classifier)"}}
    base, info = _baseline(inputs, scopes, quick)
    if base is not None:
        models["baseline"] = {"threshold": None, "metrics": base, "source": f"logged by baseline run {info['run_id']}"}
    if info.get("note"):
        notes["baseline"] = info["note"]
    return {"rows": int(len(labels)), "scopes": scopes, "models": models, "baseline_run": info, "notes": notes,
            "batch_invariance": {"variant": variant, **alone}}


def _batch_invariance(clf, texts: list[str], p_batched, thresholds, n: int, seed: int) -> dict:
    """Rows of `texts` scored one at a time against their batched scores `p_batched`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(texts), size=min(n, len(texts)), replace=False))
    alone = np.array([clf.predict_proba([texts[i]])[0] for i in idx])
    diff = np.abs(alone - np.asarray(p_batched)[idx])
    thr = np.asarray(thresholds)[idx]
    flips = int(((alone >= thr) != (np.asarray(p_batched)[idx] >= thr)).sum())
    return {"rows": int(len(idx)), "batch_size": 64, "max_abs_diff": float(diff.max()),
            "p99_abs_diff": float(np.quantile(diff, 0.99)), "median_abs_diff": float(np.median(diff)),
            "label_changes": flips}


_NAMES = {"pytorch": "PyTorch", "onnx_int8": "int8 bundle", "onnx_fp32": "fp32 bundle", "baseline": "TF-IDF baseline"}


def render(result: dict) -> str:
    models = result["models"]
    names = list(models)
    onnx = next(m for n, m in models.items() if n.startswith("onnx_"))["metrics"]
    head = "| scope | rows | spam | " + " | ".join(f"{_NAMES.get(n, n)} {lab}" for n in names
                                                 for lab in ("F1", "ROC-AUC")) + " |"
    lines = [f"{result['rows']} test rows; each model at its own threshold (PyTorch and bundle: the one chosen on "
             "validation at training time). n/a: undefined for that group (e.g. no spam in it).", "", head,
             "|---|---:|---:|" + "---:|" * (2 * len(names))]
    for scope in result.get("scopes", list(onnx)):
        m = onnx[scope]
        cells = [fmt(models[n]["metrics"].get(scope, {}).get(k)) for n in names for k in METRICS]
        label = scope.replace("source=", "source ").replace("lang=", "lang ")
        lines.append(f"| {label} | {m.get('support', '')} | {m.get('positives', '')} | " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        if models[n].get("source"):
            lines.append(f"- {_NAMES.get(n, n)}: {models[n]['source']}.")
    b = result.get("baseline_run") or {}
    if b.get("trained_by_bench"):
        lines.append(f"- The baseline run {b['run_id']} was trained by this benchmark (none existed on this data).")
    for k, v in result.get("notes", {}).items():
        lines.append(f"- {k}: {v}")
    bi = result.get("batch_invariance")
    if bi:
        lines.append(f"- Batch-mates ({bi['variant']} bundle): {bi['rows']} test rows scored alone against the same rows "
                     f"in batches of {bi['batch_size']}: |Δp| max {bi['max_abs_diff']:.2g}, 99th percentile "
                     f"{bi['p99_abs_diff']:.2g}, median {bi['median_abs_diff']:.2g}; {bi['label_changes']} label(s) "
                     "changed at the shipped thresholds.")
    return "\n".join(lines)
