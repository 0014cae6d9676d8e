"""training.evaluate with the tiny trained model (tests/conftest.py) and a real MLflow store in tmp_path."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from training import evaluate as E
from training import tracking as T
from training.config import load_config
from training.metrics import binary_metrics


@pytest.fixture
def cfg(store, request, tmp_path):
    return load_config("configs/smoke.yaml", [f"tracking.experiment={request.node.name}",
                                              f"data.output_dir={tmp_path / 'nodata'}", "eval.batch_size=7"])


def _texts_labels(data_dir: Path, split: str):
    from datasets import load_from_disk

    ds = load_from_disk(str(data_dir / "dataset"))[split]
    return list(ds["text"]), np.asarray(ds["label"]), ds


def test_predict_proba_order_and_batching(tiny_model_dir, tiny_data_dir):
    import torch

    model, encoder, meta = E.load_model(tiny_model_dir, device="cpu")
    texts, labels, _ = _texts_labels(tiny_data_dir, "test")
    texts = texts[:40]
    batched = E.predict_proba(model, encoder, texts, batch_size=7, progress=False)
    # one at a time, no padding, straight through the model: the reference
    one = []
    with torch.no_grad():
        for t in texts:
            ids, mask = encoder.pad(encoder.encode_batch([t]))
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
            one.append(torch.softmax(logits.double(), -1)[0, 1].item())
    np.testing.assert_allclose(batched, one, atol=1e-5)
    assert batched.dtype == np.float64 and ((batched >= 0) & (batched <= 1)).all()
    # raw text is normalised first: full-width digits and a zero-width space change nothing
    raw = E.predict_proba(model, encoder, ["WIN a FREE iphone now！ Click http://win.example.com to claim your\u200b prize"],
                          progress=False, mask_digits=True)
    norm = E.predict_proba(model, encoder, ["WIN a FREE iphone now! Click http://win.example.com to claim your prize"],
                           progress=False)
    assert raw[0] == pytest.approx(norm[0], abs=1e-9)
    model.train()
    E.predict_proba(model, encoder, texts[:3], progress=False)
    assert model.training  # the caller's mode is restored
    assert E.predict_proba(model, encoder, [], progress=False).shape == (0,)


def test_evaluate_model_dir_logs_a_new_eval_run(tiny_model_dir, tiny_data_dir, cfg, capsys):
    res = E.evaluate_model_dir(tiny_model_dir, cfg, progress=False)
    _, labels, ds = _texts_labels(tiny_data_dir, "test")
    assert res.split == "test" and res.threshold == 0.5
    np.testing.assert_array_equal(res.labels, labels)
    expected = binary_metrics(labels, res.p_spam, 0.5)
    assert res.grouped["overall"]["f1"] == pytest.approx(expected["f1"])
    assert res.grouped["overall"]["roc_auc"] > 0.7  # the fixture model mostly separates its templates
    assert {f"source={s}" for s in set(ds["source"])} | {f"lang={x}" for x in set(ds["lang"])} | {"overall"} == set(res.grouped)
    assert "| source=tiny_zh |" in capsys.readouterr().out
    run = MlflowClient().get_run(res.mlflow_run_id)
    assert run.data.tags["spamlingo.kind"] == "eval" and run.info.status == "FINISHED"
    assert run.data.tags["spamlingo.model_dir"] == str(tiny_model_dir)
    assert run.data.tags["data_hash"] == "tiny-test-fixture"
    assert run.data.metrics["test/overall/f1"] == pytest.approx(expected["f1"])
    assert run.data.metrics["test/lang.ja/pr_auc"] == pytest.approx(res.grouped["lang=ja"]["pr_auc"])
    arts = {a.path for a in MlflowClient().list_artifacts(res.mlflow_run_id)}
    assert {"metrics.md", "plots", "config.yaml"} <= arts


def test_evaluate_logs_into_the_models_own_run(tiny_model_dir, cfg, tmp_path):
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    with T.start_run(cfg, "transformer") as run:
        pass
    meta = json.loads((model_dir / "spamlingo.json").read_text())
    meta["mlflow_run_id"] = run.info.run_id
    (model_dir / "spamlingo.json").write_text(json.dumps(meta))
    res = E.evaluate_model_dir(model_dir, cfg, split="validation", progress=False)
    assert res.mlflow_run_id == run.info.run_id
    r = MlflowClient().get_run(run.info.run_id)
    assert r.info.status == "FINISHED"  # reopened and closed again as it was
    assert r.data.metrics["val/overall/f1"] == pytest.approx(res.grouped["overall"]["f1"])
    assert "metrics_val.md" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["body", "is_spam", "origin"])
        w.writerows(rows)
    return path


def test_cli_data_file_logs_an_eval_run(tiny_model_dir, cfg, tmp_path, capsys):
    rows = [("恭喜您中奖了!点击链接领取手机大奖,限时优惠", "spam", "shop"),
            ("明天公司的会议改到下午三点,请准时参加", "ham", "shop"),
            ("WIN a FREE laptop now! Click http://win.example.com to claim your prize", "spam", "mail"),
            ("Can you pick up some bread on your way home?", "ham", "mail"),
            ("축하합니다! 여행 당첨되셨습니다. 지금 링크를 눌러 상품을 받으세요", "1", "mail"),
            ("明日の会議は何時に集合しますか?", "0", "shop")]
    data = _write_csv(tmp_path / "mine.csv", rows)
    args = ["--config", "configs/smoke.yaml", "--run", str(tiny_model_dir), "--data", str(data),
            "--text-column", "body", "--label-column", "is_spam", "--source-column", "origin",
            f"tracking.experiment={cfg.tracking.experiment}"]
    assert E.main(args) == 0
    out = capsys.readouterr().out
    assert "| source=mail | 3 | 2 |" in out and "| source=shop | 3 | 1 |" in out
    run = T.newest_run(cfg, "eval")
    assert run is not None and run.info.run_name == "eval-mine"
    assert run.data.tags["spamlingo.data_file"] == str(data.resolve())
    assert run.data.tags["data_hash"] == E.file_hash(data)
    assert run.data.metrics["data/overall/support"] == 6
    assert {"data/source.mail/f1", "data/lang.zh/fpr", "data/lang.ko/recall"} <= set(run.data.metrics)
    res = E.evaluate_file(tiny_model_dir, data, cfg, text="body", label="is_spam", source="origin", log=False,
                          progress=False)
    assert run.data.metrics["data/overall/f1"] == pytest.approx(res.grouped["overall"]["f1"])


@pytest.mark.parametrize("extra, message", [
    (["--run", "/no/such/model"], "neither a model directory nor an MLflow run id"),
    (["--data", "/no/such.csv"], "no such file"),
    (["--data", "BAD_COLUMN"], "text_col"),
    (["eval.batch_size=0"], "eval.batch_size must be >= 1, got 0"),  # was range() ValueError traceback
    (["eval.threshold_min_ham=-1"], "eval.threshold_min_ham must be >= 0, got -1"),
    (["eval.threshold_min_spam=-5"], "eval.threshold_min_spam must be >= 0, got -5"),
    (["eval.threshold_spread_resamples=-1"], "eval.threshold_spread_resamples must be >= 0, got -1"),
    (["eval.max_language_fpr=0.001"], "eval.max_language_fpr=0.001 caps each language's FPR"),  # under the target
    (["eval.max_language_fpr=0.5", "eval.language_balanced_fpr=false"], "it needs that on"),
])
def test_cli_user_mistakes_are_one_line(tiny_model_dir, cfg, tmp_path, capsys, extra, message):
    if "BAD_COLUMN" in extra:
        extra = ["--data", str(_write_csv(tmp_path / "x.csv", [("hello", "ham", "a")])), "--text-column", "text_col"]
    args = ["--config", "configs/smoke.yaml", "--no-log"]
    if "--run" not in extra:
        args += ["--run", str(tiny_model_dir)]
    with pytest.raises(SystemExit) as e:  # overrides last, as `make eval ... ARGS=` passes them
        E.main(args + extra + [f"tracking.experiment={cfg.tracking.experiment}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_no_runs_yet_says_train_first(cfg, capsys):
    with pytest.raises(SystemExit):
        E.main(["--config", "configs/smoke.yaml", f"tracking.experiment={cfg.tracking.experiment}"])
    assert "make train" in capsys.readouterr().err


def test_broken_model_dir_is_a_clear_error(tiny_model_dir, cfg, tmp_path):
    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    (broken / "model.safetensors").unlink()
    with pytest.raises(E.EvaluateError, match="cannot load the model"):
        E.load_model(broken)
    (broken / "spamlingo.json").write_text("{not json")
    with pytest.raises(E.EvaluateError, match="not valid JSON"):
        E.evaluate_model_dir(broken, cfg)


def _with_policy(model_dir: Path, dest: Path, by_lang: dict) -> Path:
    out = Path(shutil.copytree(model_dir, dest))
    meta = json.loads((out / "spamlingo.json").read_text())
    meta["thresholds"] = {"default": meta["threshold"], "by_lang": by_lang, "rule": "test", "target_fpr": 0.01,
                          "languages": {"ja": {"reason": "too few validation rows (3 ham, 1 spam; ...)"}}}
    (out / "spamlingo.json").write_text(json.dumps(meta))
    return out


def test_evaluate_applies_the_per_language_thresholds(tiny_model_dir, cfg, tmp_path, capsys):
    """The same model, the same scores: with a ko threshold above every ko score and a zh threshold of 0,
    ko rows turn ham and zh rows spam, the other languages keep the global threshold; the printed table
    says which threshold applied per language. The old model dir (no `thresholds`) is the global one."""
    old = E.evaluate_model_dir(tiny_model_dir, cfg, log=False, progress=False)
    assert set(old.scopes) == {"global"} and np.all(old.thresholds == 0.5) and old.policy["by_lang"] == {}
    assert {"lang=ko", "lang=zh", "lang=en", "lang=ja"} <= set(old.grouped)
    capsys.readouterr()
    new_dir = _with_policy(tiny_model_dir, tmp_path / "model", {"ko": 1.0, "zh": 0.0})
    new = E.evaluate_model_dir(new_dir, cfg, log=False, progress=False)
    np.testing.assert_allclose(new.p_spam, old.p_spam, atol=1e-12)
    out = capsys.readouterr().out
    assert "| ko |" in out and "| 1 | lang:ko |" in out and "| 0 | lang:zh |" in out
    assert "| ja |" in out and "| global | too few validation rows" in out
    assert "thresholds global 0.5; lang:ko 1, lang:zh 0" in out
    from datasets import load_from_disk

    rows = load_from_disk(str(json.loads((tiny_model_dir / "spamlingo.json").read_text())["data_dir"] + "/dataset"))["test"]
    lang = np.asarray(rows["lang"])
    assert [s for s, x in zip(new.scopes, lang) if x == "ko"] == ["lang:ko"] * int((lang == "ko").sum())
    ko, zh = lang == "ko", lang == "zh"
    assert old.p_spam[ko].max() < 1.0
    # a ko spam row flagged under the global threshold is ham under its own; zh ham rows turn spam
    assert old.grouped["lang=ko"]["recall"] > 0 and new.grouped["lang=ko"]["recall"] == 0.0
    assert new.grouped["lang=zh"]["fpr"] == 1.0 and new.grouped["lang=zh"]["recall"] == 1.0
    for scope in ("lang=en", "lang=ja"):
        assert new.grouped[scope]["f1"] == old.grouped[scope]["f1"]
    # overall and per-source metrics count every row at the threshold it got
    expected = binary_metrics(new.labels, new.p_spam, np.where(ko, 1.0, np.where(zh, 0.0, 0.5)))
    assert new.grouped["overall"]["f1"] == pytest.approx(expected["f1"])
    assert new.grouped["source=tiny_zh"]["fpr"] == 1.0
    assert new.grouped["overall"]["f1"] != pytest.approx(old.grouped["overall"]["f1"])


def test_evaluate_file_applies_the_per_language_thresholds(tiny_model_dir, cfg, tmp_path):
    data = _write_csv(tmp_path / "mine.csv", [
        ("축하합니다! 여행 당첨되셨습니다. 지금 링크를 눌러 상품을 받으세요", "spam", "a"),
        ("WIN a FREE laptop now! Click http://win.example.com to claim your prize", "spam", "a"),
        ("明天公司的会议改到下午三点,请准时参加", "ham", "a")])
    kw = dict(text="body", label="is_spam", source="origin", log=False, progress=False)
    old = E.evaluate_file(tiny_model_dir, data, cfg, **kw)
    assert old.p_spam[0] >= 0.5 and old.p_spam[2] < 0.5  # the fixture model gets these right
    new = E.evaluate_file(_with_policy(tiny_model_dir, tmp_path / "model", {"ko": 1.0, "zh": 0.0}), data, cfg, **kw)
    assert new.scopes == ["lang:ko", "global", "lang:zh"] and new.thresholds.tolist() == [1.0, 0.5, 0.0]
    assert old.grouped["lang=ko"]["recall"] == 1.0 and new.grouped["lang=ko"]["recall"] == 0.0
    assert old.grouped["lang=zh"]["fpr"] == 0.0 and new.grouped["lang=zh"]["fpr"] == 1.0


def test_model_dir_with_a_bad_policy_is_a_clear_error(tiny_model_dir, tmp_path):
    bad = _with_policy(tiny_model_dir, tmp_path / "model", {"ko": 1.7})
    with pytest.raises(E.EvaluateError, match=r"invalid thresholds: 'thresholds.by_lang.ko' must be a probability"):
        E.read_meta(bad)


def test_rethreshold_chooses_the_policy_again_and_evaluation_uses_it(tiny_model_dir, tmp_path, capsys):
    import json
    import shutil

    from training.config import load_config
    from training.evaluate import evaluate_model_dir, read_meta, rethreshold

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    assert read_meta(model_dir)["threshold"] == 0.5  # the fixture's fixed threshold
    cfg = load_config("configs/smoke.yaml", ["eval.target_fpr=0.0", "eval.per_language_thresholds=false"])
    policy = rethreshold(model_dir, cfg, log=False, progress=False)
    meta = json.loads((model_dir / "spamlingo.json").read_text(encoding="utf-8"))
    assert meta["threshold"] == policy["default"] == meta["thresholds"]["default"] != 0.5
    assert meta["thresholds"]["by_lang"] == {} and meta["target_fpr"] == 0.0
    assert "thresholds global 0.5 -> global" in capsys.readouterr().out
    # the validation split flags no ham at the new threshold (target FPR 0), and evaluation reads it
    res = evaluate_model_dir(model_dir, cfg, "validation", log=False, progress=False)
    assert res.threshold == policy["default"] and res.grouped["overall"]["fpr"] == 0.0
