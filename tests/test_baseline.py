"""training.baseline end to end: the real smoke config shrunk (a few hundred rows of the real corpora,
prepared into tmp_path), a real MLflow store, the saved pipeline reloaded and re-scored."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from training import baseline as B
from training.config import load_config


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return load_config("configs/smoke.yaml", [
        f"data.output_dir={tmp_path / 'data'}",
        f"train.output_dir={tmp_path / 'run'}",
        "data.corpora.uci_sms.cap=150", "data.corpora.zh_sms.cap=150",
        "data.corpora.spamassassin.cap=80", "data.corpora.enron.cap=80",
        "data.validation_fraction=0.25", "data.test_fraction=0.25",
        "eval.threshold_rule=max_recall_at_fpr", "eval.target_fpr=0.05",
        "eval.max_language_fpr=0",  # the default's 1% cap on each language sits under this mean of 5%
        "tracking.experiment=baseline-test",
    ])


def test_baseline_end_to_end(cfg, tmp_path, capsys):
    from datasets import load_from_disk

    settings = B.BaselineSettings(ngram_min=1, ngram_max=3, max_features=20_000, max_chars=1000)
    out = B.run_baseline(cfg, settings, config_path="configs/smoke.yaml")
    assert "| source=zh_sms |" in capsys.readouterr().out

    # the run: kind, status, DESIGN §4 metric names, threshold, artifacts
    run = MlflowClient().get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["spamlingo.kind"] == "baseline"
    assert run.data.tags["data_hash"]
    assert run.data.params["baseline.ngram_max"] == "3" and run.data.params["eval.target_fpr"] == "0.05"
    m = run.data.metrics
    for name in ("test/overall/f1", "test/overall/pr_auc", "test/overall/recall_at_fpr_0.1pct",
                 "test/source.uci_sms/f1", "test/source.zh_sms/roc_auc", "test/lang.zh/precision",
                 "val/overall/recall", "threshold", "model/size_mb", "model/parameters"):
        assert name in m, name
    assert m["threshold"] == pytest.approx(out.threshold)
    assert m["test/overall/f1"] == pytest.approx(out.test["overall"]["f1"])
    arts = {a.path for a in MlflowClient().list_artifacts(out.run_id)}
    assert {"baseline", "config.yaml", "metrics.md", "metrics_val.md", "plots"} <= arts
    assert {"baseline/model.joblib", "baseline/baseline.json"} == {
        a.path for a in MlflowClient().list_artifacts(out.run_id, "baseline")}

    # the threshold rule holds on validation
    choice = out.threshold_choice
    assert choice["met"] and choice["val_fpr"] <= 0.05

    # real corpora are easy for character n-grams even with a few hundred rows
    assert out.test["overall"]["roc_auc"] > 0.9

    # the saved pipeline takes raw text and reproduces the logged test scores
    pipe, info = B.load_pipeline(tmp_path / "run" / "baseline")
    assert info["threshold"] == out.threshold and info["mlflow_run_id"] == out.run_id
    test = load_from_disk(str(tmp_path / "data" / "dataset"))["test"]
    p = pipe.predict_proba(list(test["text"]))[:, 1]
    pred = p >= info["threshold"]
    y = np.asarray(test["label"])
    tp, fp, fn = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    assert m["test/overall/f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_the_baseline_reads_the_transformers_augmented_rows(cfg, tmp_path, capsys):
    from dataclasses import replace

    from training.data import load_splits
    from training.evasion import PERTURBATIONS

    settings = B.BaselineSettings(ngram_min=1, ngram_max=2, max_features=5_000, max_chars=300)
    plain_run = B.run_baseline(cfg, settings).run_id
    plain = capsys.readouterr().out
    aug = replace(cfg, train=replace(cfg.train, augment={"zh_traditional": 1.0}))
    aug_run = B.run_baseline(aug, settings).run_id
    augmented = capsys.readouterr().out
    train = load_splits(cfg)["train"]
    changed = sum(PERTURBATIONS["zh_traditional"](t, None) != t for t in train["text"])
    assert changed > 0 and f" {len(train)} train / " in plain and f" {len(train) + changed} train / " in augmented
    # a comparison picks the baseline that read the same rows as the model, not the newest on the data
    meta = {"data_hash": MlflowClient().get_run(plain_run).data.tags["data_hash"],
            "threshold_rule": "max_recall_at_fpr", "target_fpr": 0.05, "thresholds": {"language_balanced": True}}
    assert B.find_runs(cfg, meta)[0].info.run_id == plain_run
    assert B.find_runs(aug, meta)[0].info.run_id == aug_run


def test_a_capped_baseline_pools_the_unread_ham_and_an_uncapped_one_has_none(cfg):
    from training.config import with_overrides

    settings = B.BaselineSettings(ngram_min=1, ngram_max=2, max_features=5_000, max_chars=300)
    pooled = with_overrides(cfg, ["eval.threshold_unread_ham=true", "train.max_rows_per_source=40"])
    capped = B.run_baseline(pooled, settings, capped=True).threshold_choice
    assert capped["pool"]["rows"] > 0 and capped["val_fpr"] <= 0.05 + 1e-9
    assert "pool" not in B.run_baseline(pooled, settings).threshold_choice  # it read every training row


def test_prepare_texts_cuts_head_and_tail():
    text = "A" * 100 + "B" * 100 + "C" * 100
    (cut,) = B.prepare_texts([text], max_chars=30)
    assert cut == "A" * 20 + " " + "C" * 10
    assert B.prepare_texts(["Call ０９０ now\u200b"], mask_digits=True) == ["Call xxx now"]


def test_bad_settings_are_one_line_errors(cfg, capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--config", "configs/smoke.yaml", "--ngram", "4,2"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --ngram must be MIN,MAX with 1 <= MIN <= MAX <= 8, got 4,2")
    with pytest.raises(SystemExit):
        B.main(["--config", "configs/smoke.yaml", "eval.threshold_rule=median"])
    assert "eval.threshold_rule must be one of best_f1, max_recall_at_fpr" in capsys.readouterr().err



def test_a_pipeline_saved_by_the_command_loads_in_another_process(tmp_path):
    """`python -m training.baseline` runs this module as __main__: the pipeline it saves must name its text
    function by its importable path, or `make ood` / `make bench` (other processes) cannot load it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(B.__file__).resolve().parent.parent
    overrides = [f"data.output_dir={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'run'}",
                 "data.corpora.uci_sms.cap=60", "data.corpora.zh_sms.cap=60", "data.corpora.spamassassin.cap=40",
                 "data.corpora.enron.cap=40", "data.corpora.cjk_seed.cap=40", "data.corpora.licensed_ham.cap=20",
                 "eval.target_fpr=0.05", "eval.max_language_fpr=0", "tracking.experiment=baseline-cli"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    subprocess.run([sys.executable, "-m", "training.baseline", "--config", "configs/smoke.yaml", *overrides],
                   cwd=root, env=env, check=True, capture_output=True, timeout=600)
    pipe, info = B.load_pipeline(tmp_path / "run" / "baseline")
    assert pipe.named_steps["prepare"].func.__module__ == "training.baseline"
    p = pipe.predict_proba(["恭喜您中奖了！点击链接领取", "are we still on for lunch?"])[:, 1]
    assert p.shape == (2,) and info["thresholds"]["default"] == info["threshold"]


def test_a_comparison_finds_the_baseline_with_the_models_threshold_rule(cfg, tmp_path):
    """ood and bench compare a model with the baseline whose threshold was chosen by the model's rule, never
    with the newest baseline on the data whatever its rule; ood trains one with that rule when none exists."""
    from training.config import with_overrides
    from training.ood import find_baseline

    settings = B.BaselineSettings(ngram_min=1, ngram_max=2, max_features=5_000, max_chars=500)
    at_5 = B.run_baseline(cfg, settings)
    at_10 = B.run_baseline(with_overrides(cfg, ["eval.target_fpr=0.1"]), settings)  # newer, another rule
    data_hash = MlflowClient().get_run(at_5.run_id).data.tags["data_hash"]

    def meta(fpr):  # the smoke config's rule averages the languages' FPRs (eval.language_balanced_fpr), so do these
        return {"data_hash": data_hash, "threshold_rule": "max_recall_at_fpr", "target_fpr": fpr,
                "thresholds": {"language_balanced": True}}

    run, same = B.find_runs(cfg, meta(0.05))
    assert run.info.run_id == at_5.run_id and [r.info.run_id for r in same] == [at_5.run_id]
    assert B.find_runs(cfg, meta(0.1))[0].info.run_id == at_10.run_id
    assert B.find_runs(cfg, {**meta(0.05), "data_hash": "0" * 64})[0] is None  # other data
    assert B.find_runs(cfg, meta(0.02)) == (None, [])
    # a threshold set by hand (no rule): the config's rule
    assert B.find_runs(cfg, {**meta(0.02), "threshold_rule": "fixed"})[0].info.run_id == at_5.run_id
    # the FPR of all ham together, or the mean of the languages' own (eval.language_balanced_fpr), is part of the
    # rule: a model whose threshold held the FPR of all ham (one from before the option) gets a baseline that did too
    pooled = {**meta(0.05), "thresholds": {}}
    assert B.find_runs(cfg, pooled) == (None, [])
    old = B.run_baseline(B.same_rule_config(cfg, pooled), settings)
    assert B.load_pipeline(old.model_path.parent)[1]["thresholds"]["language_balanced"] is False
    assert B.find_runs(cfg, pooled)[0].info.run_id == old.run_id
    assert B.find_runs(cfg, meta(0.05))[0].info.run_id == at_5.run_id
    # so is the cap on each language's FPR (eval.max_language_fpr): no baseline here was chosen under one
    capped = {**meta(0.05), "thresholds": {"language_balanced": True, "max_language_fpr": 0.1}}
    assert B.find_runs(cfg, capped) == (None, [])
    assert B.same_rule_config(cfg, capped).eval.max_language_fpr == 0.1

    # a model at a rule no baseline has: ood trains one at that rule (the config's own is 0.05)
    before = len(MlflowClient().search_runs([MlflowClient().get_experiment_by_name("baseline-test").experiment_id]))
    path = find_baseline(cfg, meta(0.02))
    _, info = B.load_pipeline(path)
    assert info["target_fpr"] == 0.02 and info["data_hash"] == data_hash
    assert len(MlflowClient().search_runs([MlflowClient().get_experiment_by_name("baseline-test").experiment_id])) \
        == before + 1
    assert B.find_runs(cfg, meta(0.02))[0] is not None
