"""training/ood.py: each protocol on the tiny model and tiny data; the folds are built right."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from training import ood
from training.config import Config, load_config
from tests.conftest import tiny_rows

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory, tiny_data_dir):
    """The TF-IDF baseline fitted on the tiny training split, saved as training.baseline saves it."""
    from datasets import load_from_disk

    from serving.thresholds import from_threshold
    from training.baseline import BaselineSettings, build_pipeline, save_pipeline

    ds = load_from_disk(str(tiny_data_dir / "dataset"))["train"]
    pipe = build_pipeline(BaselineSettings(min_df=1))
    pipe.fit(list(ds["text"]), np.asarray(ds["label"]))
    out = tmp_path_factory.mktemp("baseline")
    save_pipeline(pipe, out, {"threshold": 0.5, "thresholds": from_threshold(0.5), "mask_digits": True})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture()
def scorers(tiny_model_dir, tiny_baseline):
    return {"model": ood.model_dir_scorer(tiny_model_dir), "baseline": ood.baseline_scorer(tiny_baseline)}


def test_unseen_ham_reports_fpr_per_language_and_script(tmp_path, scorers):
    ham = [{"text": "明天的会议改到下午三点，请准时参加", "label": "ham", "script": "simplified"},
           {"text": "明天的會議改到下午三點，請準時參加", "label": "ham", "script": "traditional"},
           {"text": "내일 몇 시에 만날까요?", "label": "ham"},
           {"text": "WIN a FREE iphone now! Click http://win.example.com to claim your prize", "label": "ham"}]
    cfg = Config()
    cfg.ood.unseen_ham = [_write_jsonl(tmp_path / "ham.jsonl", ham)]
    result = ood.unseen_ham(cfg, scorers)
    scopes = {s["scope"]: s for s in result["scopes"]}
    assert {"overall", "lang:zh", "lang:ko", "lang:en", "script:simplified", "script:traditional"} <= set(scopes)
    assert scopes["overall"]["rows"] == 4 and scopes["overall"]["spam"] == 0
    # the FPR is what the scorer says at its threshold: recompute it for the model side
    p, thr, _ = scorers["model"].score([r["text"] for r in ham])
    assert scopes["overall"]["model"]["fpr"] == pytest.approx(float((p >= thr).mean()))
    assert scopes["overall"]["model"]["f1"] is None  # undefined without spam
    # the spam-looking "ham" row is flagged by a model that learnt the templates
    assert scopes["lang:en"]["model"]["fpr"] == 1.0


def test_unseen_ham_refuses_spam_rows(tmp_path, scorers):
    cfg = Config()
    cfg.ood.unseen_ham = [_write_jsonl(tmp_path / "x.jsonl", [{"text": "hello there", "label": "spam"}])]
    with pytest.raises(ood.OodError, match="ham only"):
        ood.unseen_ham(cfg, scorers)
    cfg.ood.unseen_ham = [str(tmp_path / "missing.jsonl")]
    with pytest.raises(ood.OodError, match="does not exist"):
        ood.unseen_ham(cfg, scorers)


def test_eval_sets_score_each_language(tmp_path, scorers):
    rows = [{"text": r["text"], "label": "spam" if r["label"] else "ham"} for r in tiny_rows(seed=5)]
    cfg = Config()
    cfg.ood.eval_sets = [_write_jsonl(tmp_path / "eval.jsonl", rows)]
    result = ood.eval_sets(cfg, scorers)
    scopes = {s["scope"]: s for s in result["scopes"]}
    assert scopes["overall"]["rows"] == len(rows)
    assert scopes["overall"]["spam"] == sum(r["label"] == "spam" for r in rows)
    for lang in ("zh", "ja", "ko", "en"):
        assert scopes[f"lang:{lang}"]["model"]["roc_auc"] > 0.9  # the templates are what it learnt


def test_eval_sets_keep_the_first_files_scopes_and_add_each_further_file_as_a_set(tmp_path, scorers):
    first = [{"text": r["text"], "label": "spam" if r["label"] else "ham"} for r in tiny_rows(seed=5)]
    mail = [{"text": r["text"], "label": "spam" if r["label"] else "ham",
             "script": "hant" if i % 3 == 0 else "hans"}
            for i, r in enumerate(r for r in tiny_rows(seed=9) if r["lang"] == "zh")]
    mixed = [{"text": r["text"], "label": "spam" if r["label"] else "ham"}
             for r in tiny_rows(seed=11) if r["lang"] in ("ja", "ko")]
    cfg = Config()
    cfg.ood.eval_sets = [_write_jsonl(tmp_path / "eval.jsonl", first), _write_jsonl(tmp_path / "mail.jsonl", mail),
                         _write_jsonl(tmp_path / "jako.jsonl", mixed)]
    both = {s["scope"]: s for s in ood.eval_sets(cfg, scorers)["scopes"]}
    assert [both[f"set:jako:lang:{g}"]["rows"] for g in ("ja", "ko")] == [
        sum(r["lang"] == g for r in tiny_rows(seed=11)) for g in ("ja", "ko")]
    cfg.ood.eval_sets = cfg.ood.eval_sets[:1]
    alone = {s["scope"]: s for s in ood.eval_sets(cfg, scorers)["scopes"]}
    # the first file's scopes are what it gives alone: further files change none of the headline figures
    assert {k: v for k, v in both.items() if not k.startswith("set:")} == alone
    n_hant = sum(r["script"] == "hant" for r in mail)
    assert both["set:mail"]["rows"] == len(mail)
    assert both["set:mail"]["spam"] == sum(r["label"] == "spam" for r in mail)
    assert both["set:mail:script:hant"]["rows"] == n_hant and both["set:mail:script:hans"]["rows"] == len(mail) - n_hant
    assert not [k for k in both if k.startswith("set:mail:lang:")]  # one language: the set scope says it all
    # the set's figures are the scorer's own on those rows
    p, thr, _ = scorers["model"].score([r["text"] for r in mail])
    y = np.array([r["label"] == "spam" for r in mail])
    assert both["set:mail"]["model"]["recall"] == pytest.approx(float((p >= thr)[y].mean()))


def test_evasion_is_deterministic_and_compares_like_with_like(tmp_path, scorers, tiny_data_dir):
    from datasets import load_from_disk

    test = load_from_disk(str(tiny_data_dir / "dataset"))["test"]
    cfg = Config()
    cfg.ood.evasion_spam_rows, cfg.ood.evasion_ham_rows = 20, 20
    cfg.ood.hard_negatives = [_write_jsonl(tmp_path / "hn.jsonl", [
        {"text": "Your verification code is 482913. It expires in 5 minutes.", "label": "ham"},
        {"text": "[Web발신] 인증번호 [482913] 타인에게 알려주지 마세요", "label": "ham"}])]
    a = ood.evasion(cfg, scorers, test)
    b = ood.evasion(cfg, scorers, test)
    assert a["scopes"] == b["scopes"] and a["examples"] == b["examples"]
    scopes = {s["scope"]: s for s in a["scopes"]}
    clean = scopes["clean"]
    assert clean["rows"] == a["spam_rows"] + a["ham_rows"] and clean["spam"] == a["spam_rows"]
    fw = scopes["fullwidth"]
    # full-width forms are undone by the normaliser: the same scores as the clean spam, no recall drop
    assert fw["model"]["recall_drop"] == pytest.approx(0.0, abs=1e-9)
    for name in ("homoglyph", "zero_width", "combined"):
        s = scopes[name]
        assert s["rows"] == a["ham_rows"] + s["spam"] and 0 < s["spam"] <= a["spam_rows"]
        m = s["model"]
        assert m["recall_drop"] == pytest.approx(m["recall_clean"] - m["recall"])
    assert scopes["hard_negative_ham"]["rows"] == 2
    assert {"hard_negative_ham:lang:en", "hard_negative_ham:lang:ko"} <= set(scopes)


def test_figures_at_the_ends_of_the_thresholds_spread(tmp_path, scorers):
    """A global threshold measured with its spread also reports F1, recall and FPR at the spread's low and
    high thresholds (what threshold noise alone moves); none with per-language thresholds or no spread."""
    from dataclasses import replace

    rows = [{"text": r["text"], "label": "spam" if r["label"] else "ham"} for r in tiny_rows(seed=5)]
    cfg = Config()
    cfg.ood.eval_sets = [_write_jsonl(tmp_path / "eval.jsonl", rows)]
    model = scorers["model"]
    policy = {**model.policy, "by_lang": {}, "global": {**(model.policy.get("global") or {}),
                                                        "spread": {"low": 0.2, "high": 0.8}}}
    banded = replace(model, policy=policy)
    assert banded.band() == (0.2, 0.8)
    assert replace(model, policy={**policy, "by_lang": {"en": 0.5}}).band() is None
    assert replace(model, policy={**policy, "global": {}}).band() is None
    result = ood.eval_sets(cfg, {"model": banded, "baseline": scorers["baseline"]})
    overall = {s["scope"]: s for s in result["scopes"]}["overall"]
    ends = overall["model"]["at_spread"]
    p, _, _ = model.score([r["text"] for r in rows])
    y = np.array([r["label"] == "spam" for r in rows])
    for end, t in (("low", 0.2), ("high", 0.8)):
        assert ends[end]["threshold"] == t
        assert ends[end]["recall"] == pytest.approx(float((p[y] >= t).mean()))
        assert ends[end]["fpr"] == pytest.approx(float((p[~y] >= t).mean()))
    assert ends["low"]["recall"] >= ends["high"]["recall"] and ends["low"]["fpr"] >= ends["high"]["fpr"]
    assert "at_spread" not in overall["baseline"]  # its policy is a bare threshold
    md = ood.render({"protocols": [result]})
    low, high = ends["low"], ends["high"]
    assert f"f1 {low['f1']:.3f} → {high['f1']:.3f}, fpr {low['fpr']:.2%} → {high['fpr']:.2%}" in md


def test_render_shows_every_scope():
    proto = {"name": "eval_sets", "scopes": [{"scope": "overall", "rows": 10, "spam": 4,
                                               "model": {"f1": 0.9, "roc_auc": 0.95, "recall": 1.0, "fpr": 0.1},
                                               "baseline": {"f1": 0.5, "roc_auc": None, "recall": 0.5, "fpr": 0.0}}]}
    md = ood.render({"protocols": [proto]})
    assert "| overall | 10 (4) | 0.900 | 0.950 | 1.000 | 10.00% | — | 0.500 | — |" in md  # — : no spread


def test_render_names_each_folds_held_out_corpora_and_the_reference_fold():
    proto = {"name": "loco", "scopes": [], "fold_overrides": ["train.max_rows_per_source=500"],
             "folds": [{"fold": "email", "exclude": ["spamassassin", "enron"], "test_rows": 2000, "seconds": 349.4},
                       {"fold": "seeded", "exclude": [], "test_rows": 642, "seconds": 466.0,
                        "measured": "2026-12-07T21:05:04+00:00"}]}
    md = ood.render({"protocols": [proto]})
    assert "Fold budget: `train.max_rows_per_source=500`" in md
    assert "email (without spamassassin, enron, 2,000 rows scored, 349 s)" in md
    # a fold measured apart from the others (make ood --folds seeded, merged) says when
    assert "seeded (on every corpus: the reference fold, 642 rows scored, 466 s, measured 2026-12-07 21:05 UTC)" in md


# ------------------------------------------------------------------------------------------ folds


def _tiny_corpora(root: Path) -> dict:
    """One CSV per language of templated rows: corpora tiny_en, tiny_zh, tiny_ja, tiny_ko."""
    by_lang: dict[str, list] = {}
    for r in tiny_rows(seed=1, per_template=8):
        by_lang.setdefault(r["source"], []).append(r)
    corpora = {}
    for name, rows in by_lang.items():
        path = root / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for r in rows:
                w.writerow([r["text"], "spam" if r["label"] else "ham"])
        corpora[name] = {"path": str(path), "format": "csv"}
    return corpora


def test_exclude_sources_leaves_the_held_out_corpus_out_of_training_and_validation(tiny_data_dir):
    from datasets import load_from_disk

    from training.config import ConfigError
    from training.rows import cap_training_rows, exclude_sources

    splits = load_from_disk(str(tiny_data_dir / "dataset"))
    fold = exclude_sources(splits, ["tiny_ja"])
    assert "tiny_ja" not in set(fold["train"]["source"]) | set(fold["validation"]["source"])
    assert len(fold["test"]) == len(splits["test"])  # untouched
    capped = cap_training_rows(fold["train"], 5, 0, 13)
    assert "tiny_ja" not in set(capped["source"]) and len(capped) == 5 * 3
    with pytest.raises(ConfigError, match="no source tiny_xx"):
        exclude_sources(splits, ["tiny_xx"])


def test_a_fold_trains_without_its_corpus_and_scores_it(tmp_path, store):
    from mlflow import MlflowClient

    from training.config import CorpusConfig, FoldConfig

    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"data.output_dir={tmp_path / 'data'}", "data.mix_card=", f"train.output_dir={tmp_path / 'run'}",
        "tracking.experiment=test-ood", "model.max_length=48", "ood.fold_max_test_rows=0"])
    cfg.data.corpora = {name: CorpusConfig(path=c["path"], format="csv")
                        for name, c in _tiny_corpora(tmp_path).items()}
    cfg.ood.fold_overrides = ["train.max_steps=4", "train.evaluate_test=false"]
    cfg.train.rows_per_source = {}  # the smoke config's own caps name corpora these tiny ones replace
    cfg.data.corpora["off"] = CorpusConfig(path="nowhere.csv", enabled=False)  # defined, left out of the mix
    cfg.ood.folds = {"ja": FoldConfig(exclude=["tiny_ja", "off"])}
    result = ood.loco(cfg)
    (fold,) = result["folds"]
    assert fold["exclude"] == ["tiny_ja"]  # "off" is not in the data: nothing to leave out, no error
    # every row of the held-out corpus (all three splits) is scored, and nothing else
    n_ja = sum(1 for r in tiny_rows(seed=1, per_template=8) if r["source"] == "tiny_ja")
    top = result["scopes"][0]
    assert top["scope"] == "ja" and top["rows"] <= n_ja and top["rows"] > 0.8 * n_ja
    assert set(top) >= {"model", "baseline"} and top["model"]["roc_auc"] is not None
    # the fold's training run saw only the other three corpora
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("test-ood-ood").experiment_id], "attributes.status = 'FINISHED'")
    trained = [r for r in runs if r.data.tags.get("spamlingo.kind") == "transformer"]
    assert trained and json.loads(trained[0].data.params["train.exclude_sources"]) == ["tiny_ja"]
    from training.data import load_splits

    splits = load_splits(cfg)
    others = sum(1 for s in splits["train"]["source"] if s != "tiny_ja")
    assert trained[0].data.metrics["data/train_rows"] == others
