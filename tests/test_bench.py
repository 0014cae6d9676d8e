"""bench.run --quick on the tiny model and bundle fixtures: each figure in its own process, real ONNX
Runtime sessions, a real spamlingo-serve subprocess on 127.0.0.1, JSON results and the generated report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run as bench_run

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("quality", "speed_engines", "speed_server", "size")


def _bench(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, tiny_model_dir, tiny_bundle):
    out = tmp_path_factory.mktemp("bench")
    # quality looks for a baseline run: in an empty store of its own, never the repository's ./mlruns.
    proc = _bench("--run", str(tiny_model_dir), "--bundle", str(tiny_bundle), "--quick",
                  "--only", ",".join(FIGURES), "--threads", "1",
                  "--results", str(out / "results"), "--markdown", str(out / "BENCH.md"),
                  env={"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc.stdout


def _load(out: Path, figure: str) -> dict:
    return json.loads((out / "results" / f"{figure}.json").read_text(encoding="utf-8"))


def test_each_figure_written_with_its_command_and_machine(quick_results):
    out, stdout = quick_results
    for i, figure in enumerate(FIGURES, 1):
        rec = _load(out, figure)
        assert rec["figure"] == figure and rec["quick"] is True
        assert rec["command"].startswith(f"python -m bench.run --only {figure} ") and "--quick" in rec["command"]
        assert rec["machine"]["cores"] >= 1 and rec["versions"]["onnxruntime"]
        assert rec["threads"] == 1
        assert f"[{i}/{len(FIGURES)}] {figure} done" in stdout


def test_size_matches_the_files(quick_results, tiny_bundle, tiny_model_dir):
    out, _ = quick_results
    r = _load(out, "size")["result"]
    mb = 1024 * 1024
    for name in ("model.onnx", "tokenizer.json"):
        assert r["bundle_files_mb"][name] == pytest.approx((tiny_bundle / name).stat().st_size / mb)
    on_disk = sum(p.stat().st_size for p in tiny_bundle.iterdir() if p.is_file()) / mb
    assert r["bundle_total_mb"] == pytest.approx(on_disk)
    assert r["model_dir_total_mb"] == pytest.approx(
        sum(p.stat().st_size for p in tiny_model_dir.iterdir() if p.is_file()) / mb)
    if r["models"].get("int8"):
        assert 0 < r["int8_over_fp32"] < 1  # a quantised graph is smaller


def test_speed_engines_side_by_side(quick_results):
    out, _ = quick_results
    r = _load(out, "speed_engines")["result"]
    assert r["cells"], r
    for cell in r["cells"]:
        assert {"pytorch_eager", "onnx_fp32"} <= set(cell["engines"])
        assert cell["engines"]["pytorch_eager"]["speedup_vs_eager"] == pytest.approx(1.0)
        for st in cell["engines"].values():
            assert st["texts_per_s"] > 0 and st["calls"] >= 2
            assert st["ms_per_batch_p90"] >= st["ms_per_batch_p50"] > 0


def test_server_vs_raw(quick_results):
    out, _ = quick_results
    r = _load(out, "speed_server")["result"]
    assert set(r["latency"]) == {"1", "8", "32"}
    for c, lat in r["latency"].items():
        assert lat["ok"] == lat["requests"] and not lat["errors"], (c, lat)
        assert lat["p99_ms"] >= lat["p50_ms"] > 0
    tp = r["throughput"]
    assert tp["server_texts_per_s"] > 0 and tp["raw_texts_per_s"] > 0
    assert tp["server_over_raw"] == pytest.approx(tp["server_texts_per_s"] / tp["raw_texts_per_s"])
    assert "--host 127.0.0.1" in r["server_command"]


def test_quality_pytorch_vs_bundle(quick_results, tiny_model_dir):
    from datasets import load_from_disk

    out, _ = quick_results
    r = _load(out, "quality")["result"]
    meta = json.loads((tiny_model_dir / "spamlingo.json").read_text(encoding="utf-8"))
    test = load_from_disk(str(Path(meta["data_dir"]) / "dataset"))["test"]
    assert r["rows"] == len(test)
    assert r["scopes"][0] == "overall" and {f"lang={x}" for x in set(test["lang"])} <= set(r["scopes"])
    onnx = next(v for k, v in r["models"].items() if k.startswith("onnx_"))
    torch_m = r["models"]["pytorch"]
    assert "measured now" in torch_m["source"]  # the fixture model has no MLflow run
    assert onnx["metrics"]["overall"]["support"] == len(test)
    # The bundle passed export's parity gates: it scores (almost) like the PyTorch model it came from.
    assert abs(onnx["metrics"]["overall"]["f1"] - torch_m["metrics"]["overall"]["f1"]) <= 0.05
    assert "baseline" not in r["models"] and "make baseline" in r["notes"]["baseline"]


def test_quality_says_how_far_scores_move_with_their_batch_mates(quick_results, tiny_model_dir, tiny_bundle):
    import numpy as np
    from datasets import load_from_disk

    from serving.bundle import load_bundle
    from serving.inference import Classifier

    out, _ = quick_results
    bi = _load(out, "quality")["result"]["batch_invariance"]
    meta = json.loads((tiny_model_dir / "spamlingo.json").read_text(encoding="utf-8"))
    texts = list(load_from_disk(str(Path(meta["data_dir"]) / "dataset"))["test"]["text"])
    assert bi["rows"] == min(40, len(texts)) and bi["batch_size"] == 64  # --quick: 40 rows
    assert 0 <= bi["median_abs_diff"] <= bi["p99_abs_diff"] <= bi["max_abs_diff"] and 0 <= bi["label_changes"] <= bi["rows"]
    # the same rows (seed 0) scored here, alone and in the figure's batches of 64, give the same largest move
    clf = Classifier(load_bundle(tiny_bundle), variant=bi["variant"], threads=1, batch_size=64)
    idx = np.sort(np.random.default_rng(0).choice(len(texts), size=bi["rows"], replace=False))
    batched = clf.predict_proba(texts)[idx]
    alone = np.array([clf.predict_proba([texts[i]])[0] for i in idx])
    assert np.isclose(np.abs(alone - batched).max(), bi["max_abs_diff"], rtol=1e-6, atol=1e-9)


def test_markdown_generated_from_the_results(quick_results):
    out, _ = quick_results
    md = (out / "BENCH.md").read_text(encoding="utf-8")
    for figure in FIGURES:
        rec = _load(out, figure)
        assert f"## {rec['title']}" in md
        assert f"Reproduce: `{rec['command']}`" in md
    assert "## Machine and versions" in md and "onnxruntime" in md
    assert "--quick run" in md
    assert "server/raw" in md and "ONNX Runtime fp32" in md
    # The report is a pure function of the JSON files: rebuilding it gives the same text.
    again = out / "AGAIN.md"
    assert bench_run.main(["--render-only", "--results", str(out / "results"), "--markdown", str(again)]) == 0
    assert again.read_text(encoding="utf-8") == md


def test_missing_inputs_name_the_make_command(tmp_path, tiny_model_dir):
    proc = _bench("--run", str(tmp_path / "nope"), "--only", "size", "--results", str(tmp_path / "r"),
                  "--markdown", str(tmp_path / "B.md"), timeout=120)
    assert proc.returncode != 0
    assert "neither a model directory nor an MLflow run id" in proc.stderr and "make train" in proc.stderr
    assert "Traceback" not in proc.stderr

    store = tmp_path / "no_store" / "mlflow.db"
    proc = _bench("--only", "size", "--results", str(tmp_path / "r"), "--markdown", str(tmp_path / "B.md"),
                  env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}, timeout=120)
    assert proc.returncode != 0 and "no MLflow store" in proc.stderr and "make train" in proc.stderr
    assert not store.exists()

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inherit: {ROOT / 'configs' / 'smoke.yaml'}\nexport:\n  output_dir: {tmp_path / 'no_bundles'}\n")
    proc = _bench("--config", str(cfg), "--run", str(tiny_model_dir), "--only", "size", "--results",
                  str(tmp_path / "r"), "--markdown", str(tmp_path / "B.md"), timeout=120)
    assert proc.returncode != 0
    assert "make export" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_only_accepts_figures_and_groups():
    # a plain make bench: every figure but ood, whose folds train models (make ood runs it)
    assert bench_run.select("") == [f for f in bench_run.FIGURES if f not in ("ood", "ensemble", "probe")]
    assert bench_run.select("ood") == ["ood"]
    assert bench_run.select("speed,size") == ["speed_engines", "speed_server", "speed_training", "size"]
    with pytest.raises(bench_run.BenchError, match="unknown figure 'fast'"):
        bench_run.select("fast")


def test_quality_reads_the_training_runs_logged_metrics(tmp_path, monkeypatch, tiny_model_dir):
    """A model with an MLflow run on the same data: its logged test metrics are the PyTorch column, and
    they are what training.evaluate measures on the model directory."""
    import shutil

    import mlflow

    from bench.inputs import Inputs
    from bench.quality import _pytorch
    from training import tracking
    from training.config import load_config
    from training.evaluate import evaluate_model_dir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("configs/smoke.yaml", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    meta = json.loads((model_dir / "spamlingo.json").read_text(encoding="utf-8"))
    fresh = evaluate_model_dir(model_dir, cfg, "test", log=False, progress=False)
    from datasets import load_from_disk

    test = load_from_disk(str(Path(meta["data_dir"]) / "dataset"))["test"]
    with tracking.start_run(cfg, "transformer", run_name="tiny", data_hash=meta["data_hash"]) as run:
        tracking.log_evaluation(fresh.labels, fresh.p_spam, fresh.thresholds,
                                {"source": list(test["source"]), "lang": list(test["lang"])}, "test", plots=False,
                                policy=fresh.policy)
    meta["mlflow_run_id"] = run.info.run_id
    (model_dir / "spamlingo.json").write_text(json.dumps(meta), encoding="utf-8")
    scopes = list(fresh.grouped)

    logged, how = _pytorch(Inputs(cfg, model_dir, meta), scopes, len(test), threads=1)
    assert how == f"logged by training run {run.info.run_id}"
    for scope in scopes:
        for k in ("f1", "roc_auc", "support"):
            want = fresh.grouped[scope][k]
            if want == want:  # NaN metrics are not logged
                assert logged[scope][k] == pytest.approx(want), (scope, k)

    # Another split size (e.g. a re-prepared dataset): the logged numbers do not apply, measure again.
    _, how = _pytorch(Inputs(cfg, model_dir, meta), scopes, len(test) + 1, threads=1)
    assert how.startswith("measured now")
    # Thresholds chosen again since training (make threshold, with or without logging it): the logged test
    # metrics are at the old ones, measure again; a per-language threshold alone counts too.
    policy = json.loads(json.dumps(fresh.policy))
    moved = {**meta, "threshold": policy["default"] + 0.01, "thresholds": {**policy, "default": policy["default"] + 0.01}}
    again, how = _pytorch(Inputs(cfg, model_dir, moved), scopes, len(test), threads=1)
    assert how.startswith("measured now")
    assert again["overall"]["support"] == len(test)
    korean = {**meta, "thresholds": {**policy, "by_lang": {**policy["by_lang"], "ko": 0.25}}}
    _, how = _pytorch(Inputs(cfg, model_dir, korean), scopes, len(test), threads=1)
    assert how.startswith("measured now")
    # make threshold logged (threshold metric and its tag) but the test metrics were logged again at the new
    # thresholds (make eval): they apply.
    with tracking.resume_run(run.info.run_id, cfg):
        mlflow.set_tag("spamlingo.rethreshold", "0.5 -> 0.5")
    _, how = _pytorch(Inputs(cfg, model_dir, meta), scopes, len(test), threads=1)
    assert how == f"logged by training run {run.info.run_id}"
    # A run logged before the scored-at tag: the make threshold tag alone says the metrics are stale.
    mlflow.MlflowClient().delete_tag(run.info.run_id, tracking.SCORED_AT_TAG + "test")
    _, how = _pytorch(Inputs(cfg, model_dir, meta), scopes, len(test), threads=1)
    assert how.startswith("measured now")

    # speed_server puts its latency beside the run's metrics, leaving the run finished.
    from bench.server_load import log_to_run

    assert log_to_run(Inputs(cfg, model_dir, meta), {"serve/p50_ms": 12.5}) == run.info.run_id
    after = mlflow.MlflowClient().get_run(run.info.run_id)
    assert after.data.metrics["serve/p50_ms"] == 12.5 and after.info.status == "FINISHED"
    assert log_to_run(Inputs(cfg, model_dir, {**meta, "mlflow_run_id": "0" * 32}), {"serve/p50_ms": 1.0}) is None
    mlflow.set_tracking_uri(None)


def test_ood_figure_writes_protocols_at_the_top_of_ood_json(tmp_path, tiny_model_dir, tiny_bundle):
    """make ood (bench.run --only ood) on the tiny model and bundle: one protocol, a baseline trained on the
    config's (smoke) data in a store of its own, ood.json with the keys its readers use, and its report."""
    ham = tmp_path / "ham.jsonl"
    ham.write_text("".join(json.dumps({"text": t, "label": "ham"}, ensure_ascii=False) + "\n" for t in
                           ["明天的会议改到下午三点", "내일 몇 시에 만날까요?", "明日は何時に集合しますか",
                            "Are we still meeting for lunch?"]), encoding="utf-8")
    cfg = tmp_path / "ood.yaml"
    cfg.write_text(f"inherit: {ROOT / 'configs' / 'smoke.yaml'}\ndata:\n  output_dir: {tmp_path / 'data'}\n"
                   f"  corpora:\n    cjk_seed: {{enabled: false}}\n    licensed_ham: {{enabled: false}}\n"
                   f"train:\n  output_dir: {tmp_path / 'run'}\nood:\n  unseen_ham: [{ham}]\n", encoding="utf-8")
    proc = _bench("--config", str(cfg), "--run", str(tiny_model_dir), "--bundle", str(tiny_bundle), "--only", "ood",
                  "--protocols", "unseen_ham", "--threads", "1", "--results", str(tmp_path / "results"),
                  "--markdown", str(tmp_path / "BENCH.md"), env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads((tmp_path / "results" / "ood.json").read_text(encoding="utf-8"))
    (proto,) = rec["protocols"]
    assert proto["name"] == "unseen_ham" and "protocols" not in rec["result"]
    overall = proto["scopes"][0]
    assert overall["scope"] == "overall" and overall["rows"] == 4 and overall["spam"] == 0
    assert set(overall["model"]) >= {"f1", "roc_auc", "recall", "fpr"} and set(overall["baseline"]) >= {"fpr"}
    assert rec["result"]["model"].startswith("bundle tiny")  # scored through the bundle, as served
    assert "--protocols unseen_ham" in rec["command"]
    md = (tmp_path / "BENCH.md").read_text(encoding="utf-8")
    assert "Out-of-distribution quality" in md and "| lang:ko | 1 |" in md


def test_a_partial_ood_rerun_keeps_the_other_protocols_of_the_same_run():
    from bench.ood import merge

    old = {"date": "then", "inputs": {"run_id": "r1"}, "protocols": [{"name": "loco", "scopes": []},
                                                                      {"name": "evasion", "scopes": ["old"]}],
           "result": {"model": "bundle b (int8)", "baseline": "TF-IDF baseline x"}}
    new = {"inputs": {"run_id": "r1"}, "command": "python -m bench.run --only ood --protocols evasion --threads 2",
           "protocols": [{"name": "evasion", "scopes": ["new"]}], "result": {}}
    merged = merge(old, new)
    assert merged["result"] == old["result"]  # the kept protocols' model and baseline stay named
    assert [p["name"] for p in merged["protocols"]] == ["evasion", "loco"]
    assert merged["protocols"][0]["scopes"] == ["new"] and merged["protocols"][1]["measured"] == "then"
    assert merged["command"] == "python -m bench.run --only ood --threads 2"
    other = {"inputs": {"run_id": "r2"}, "command": "x", "protocols": [{"name": "evasion", "scopes": []}]}
    assert [p["name"] for p in merge(old, other)["protocols"]] == ["evasion"]  # another run: nothing kept


def test_a_rerun_of_some_folds_keeps_the_other_folds_at_the_same_budget():
    from bench.ood import merge

    def loco(folds, budget, measured=None):
        return {"name": "loco", "fold_overrides": budget, **({"measured": measured} if measured else {}),
                "folds": [{"fold": f} for f in folds],
                "scopes": [s for f in folds for s in ({"scope": f, "v": measured}, {"scope": f"{f}:lang:ja", "v": measured})]}

    old = {"date": "d0", "inputs": {"run_id": "r1"}, "result": {"model": "m"},
           "protocols": [{"name": "evasion", "scopes": []}, loco(["zh_sms", "email", "seeded"], ["a=1"], "d1")]}
    new = {"date": "d2", "inputs": {"run_id": "r1"}, "result": {},
           "command": "python -m bench.run --only ood --protocols loco --folds email,cjk_seed --threads 2",
           "protocols": [loco(["email", "cjk_seed"], ["a=1"], "d2")]}
    merged = merge(json.loads(json.dumps(old)), json.loads(json.dumps(new)))
    got = merged["protocols"][1]
    # a fold trained again takes its old place, a new one comes last; each says when it was measured
    assert [(f["fold"], f["measured"]) for f in got["folds"]] == [("zh_sms", "d1"), ("email", "d2"), ("seeded", "d1"),
                                                                  ("cjk_seed", "d2")]
    assert [(s["scope"], s["v"]) for s in got["scopes"]] == [
        ("zh_sms", "d1"), ("zh_sms:lang:ja", "d1"), ("email", "d2"), ("email:lang:ja", "d2"),
        ("seeded", "d1"), ("seeded:lang:ja", "d1"), ("cjk_seed", "d2"), ("cjk_seed:lang:ja", "d2")]
    assert merged["command"] == "python -m bench.run --only ood --threads 2"  # every fold, every protocol
    assert merged["measured_in_parts"]["loco:zh_sms"] == "d1" and merged["measured_in_parts"]["loco:email"] == "d2"
    # another budget: the old folds are not comparable, the rerun's folds alone are kept
    other = merge(json.loads(json.dumps(old)), {**json.loads(json.dumps(new)), "protocols": [loco(["email"], ["a=2"])]})
    assert [f["fold"] for f in other["protocols"][1]["folds"]] == ["email"]


def test_ensemble_combines_the_two_logits():
    import numpy as np

    from bench.ensemble import combine

    pm, pb = np.array([0.9, 0.2, 0.6]), np.array([0.1, 0.2, 0.99])
    assert np.allclose(combine(pm, pb, 1.0), pm) and np.allclose(combine(pm, pb, 0.0), pb)
    assert np.allclose(combine(pm, pb, 0.5)[:2], [0.5, 0.2])  # logits 2.197 and -2.197 cancel
    assert combine(pm, pb, 0.5)[2] > 0.9  # one confident side carries a mean of logits


def test_ensemble_threshold_follows_the_configs_language_balance():
    """Each weight's threshold is chosen by the config's global rule, the languages' FPRs averaged when
    eval.language_balanced_fpr says so, as the model's own was (training.metrics.threshold_policy)."""
    import numpy as np

    from bench.ensemble import _sweep, combine
    from training import metrics as M
    from training.config import load_config, with_overrides

    rng = np.random.default_rng(5)
    p = np.r_[rng.beta(2, 6, 900), rng.beta(1, 12, 150), rng.beta(7, 2, 200)]
    val = {"y": np.r_[np.zeros(1050, dtype=int), np.ones(200, dtype=int)], "model": p,
           "baseline": np.clip(p + rng.normal(0, 0.05, p.size), 1e-6, 1 - 1e-6),
           "langs": np.array(["en"] * 900 + ["ko"] * 150 + ["en"] * 200)}
    # the default's rule (the languages' mean at 0.5%), its cap on each language tightened to one that binds here
    on = with_overrides(load_config("configs/default.yaml"), ["eval.max_language_fpr=0.007"])
    off = with_overrides(on, ["eval.language_balanced_fpr=false", "eval.max_language_fpr=0"])
    got_on, got_off = (_sweep(c, val, {})[2]["threshold"] for c in (on, off))  # w = 0.5
    mixed = combine(val["model"], val["baseline"], 0.5)
    want = {b: M.threshold_policy(val["y"], mixed, list(val["langs"]), target_fpr=on.eval.target_fpr,
                                  per_language=False, language_balanced=b,
                                  max_language_fpr=on.eval.max_language_fpr if b else 0.0)["default"]
            for b in (True, False)}
    assert got_on == want[True] and got_off == want[False] and got_on != got_off
    uncapped = M.threshold_policy(val["y"], mixed, list(val["langs"]), target_fpr=on.eval.target_fpr,
                                  per_language=False, language_balanced=True)["default"]
    assert got_on > uncapped  # the cap is applied, not only the mean


def _fold_on_disk(fold: Path, model_dir: Path, data_dir: Path):
    """A fold as make ood leaves it: model/ (a copy of `model_dir`) and baseline/ (TF-IDF fitted on the training
    split of `data_dir`, which is returned)."""
    import shutil

    import numpy as np
    from datasets import load_from_disk

    from serving.thresholds import from_threshold
    from training.baseline import BaselineSettings, build_pipeline, save_pipeline

    shutil.copytree(model_dir, fold / "model")
    train = load_from_disk(str(data_dir / "dataset"))["train"]
    pipe = build_pipeline(BaselineSettings(min_df=1)).fit(list(train["text"]), np.asarray(train["label"]))
    save_pipeline(pipe, fold / "baseline", {"threshold": 0.5, "thresholds": from_threshold(0.5), "mask_digits": True})
    return train


def test_ensemble_figure_sweeps_weights_on_each_set_and_fold(tmp_path, tiny_model_dir, tiny_bundle, tiny_data_dir):
    """bench.run --only ensemble on the tiny model and bundle: a sweep per weight on the test split and the
    out-of-distribution files, a fold whose models are on disk scored, the others listed as skipped."""
    from training import ood

    rows = {"ham": ["明天的会议改到下午三点", "내일 몇 시에 만날까요?", "明日は何時に集合しますか", "Are we still meeting?"],
            "eval": [("恭喜您中奖了，点击链接领取", "spam"), ("今晚一起吃饭吗", "ham")] * 6
            + [("무료 쿠폰 지급! 지금 클릭", "spam"), ("내일 회의는 3시입니다", "ham")] * 6,
            "hard": ["您的验证码是1234，请勿告诉他人", "Your order has shipped."]}
    files = {}
    for key, items in rows.items():
        files[key] = tmp_path / f"{key}.jsonl"
        files[key].write_text("".join(json.dumps({"text": t, "label": "ham"} if isinstance(t, str) else
                                                 {"text": t[0], "label": t[1]}, ensure_ascii=False) + "\n"
                                      for t in items), encoding="utf-8")
    cfg = tmp_path / "ens.yaml"
    cfg.write_text(f"inherit: {ROOT / 'configs' / 'smoke.yaml'}\ndata:\n  output_dir: {tmp_path / 'data'}\n"
                   f"train:\n  output_dir: {tmp_path / 'run'}\nood:\n  unseen_ham: [{files['ham']}]\n"
                   f"  eval_sets: [{files['eval']}]\n  hard_negatives: [{files['hard']}]\n", encoding="utf-8")
    _fold_on_disk(tmp_path / "run-ood" / "zh_sms", tiny_model_dir, tiny_data_dir)
    proc = _bench("--config", str(cfg), "--run", str(tiny_model_dir), "--bundle", str(tiny_bundle), "--only",
                  "ensemble", "--threads", "1", "--results", str(tmp_path / "results"), "--markdown",
                  str(tmp_path / "BENCH.md"), env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "results" / "ensemble.json").read_text(encoding="utf-8"))["result"]
    assert [e["weight"] for e in res["sweep"]] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert res["rows"]["unseen_ham"] == 4 and res["rows"]["eval_sets"] == 24 and res["rows"]["hard_negatives"] == 2
    alone = res["sweep"][0]
    assert set(alone["test"]) >= {"f1", "roc_auc", "fpr"} and set(alone["unseen_ham"]) >= {"zh", "ja", "ko", "en"}
    assert set(alone["eval_sets"]) >= {"zh", "ko", "overall_fpr"}
    # w = 1 is the model alone: its hard-negative FPR is the bundle's own at that threshold
    scorer = ood.bundle_scorer(tiny_bundle, 1)
    p = scorer.proba(rows["hard"])
    assert alone["hard_negatives"]["overall"] == float((p >= alone["threshold"]).mean())
    (scored,) = res["folds"]
    assert scored["fold"] == "zh_sms" and len(scored["sweep"]) == 5 and "fold:zh_sms" in scored["sweep"][0]
    assert set(res["skipped_folds"]) == {"email", "spamassassin", "cjk_seed", "seeded"}
    md = (tmp_path / "BENCH.md").read_text(encoding="utf-8")
    assert "Ensemble study" in md and "| zh_sms |" in md and "Fold email skipped" in md


def test_reproduce_command_names_a_figures_own_bundle_relative_to_the_repository():
    import argparse

    from bench.run import ROOT, reproduce_command

    args = argparse.Namespace(config="configs/default.yaml", threads=2, quick=False,
                              bundle=str(ROOT / "bundles" / "b1"))
    cmd = reproduce_command("ensemble", args, "r1", None)
    assert cmd == "python -m bench.run --only ensemble --run r1 --bundle bundles/b1 --threads 2"
    # said once when the figure's inputs already name it
    assert reproduce_command("ensemble", args, "r1", "bundles/b1").count("--bundle") == 1


def test_probe_figure_ranks_the_run_and_each_fold_by_head_and_refit(tmp_path, tiny_mean_model_dir, tiny_data_dir):
    """bench.run --only probe on the tiny mean-pooled model: the run's test split and held-out file and a fold
    whose models are on disk, each ranked by the model's own head (the same scores evaluation gives), by a
    regression fitted again on its features, and by the fold's baseline; the tiny backbone has no pretrained
    weights, so no frozen probe, said once."""
    from datasets import load_from_disk
    from sklearn.metrics import roc_auc_score

    from training.evaluate import load_model, predict_proba

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in
                            [("恭喜您中奖了，点击链接领取", "spam"), ("今晚一起吃饭吗", "ham"),
                             ("무료 쿠폰 지급! 지금 클릭", "spam"), ("내일 회의는 3시입니다", "ham")] * 3),
                    encoding="utf-8")
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(f"inherit: {ROOT / 'configs' / 'smoke.yaml'}\ndata:\n  output_dir: {tmp_path / 'data'}\n"
                   f"train:\n  output_dir: {tmp_path / 'run'}\nood:\n  eval_sets: [{held}]\n", encoding="utf-8")
    train = _fold_on_disk(tmp_path / "run-ood" / "zh_sms", tiny_mean_model_dir, tiny_data_dir)
    proc = _bench("--config", str(cfg), "--run", str(tiny_mean_model_dir), "--only", "probe", "--threads", "1",
                  "--results", str(tmp_path / "results"), "--markdown", str(tmp_path / "BENCH.md"),
                  env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "results" / "probe.json").read_text(encoding="utf-8"))["result"]
    scopes = {s["scope"]: s for s in res["scopes"]}
    assert set(scopes) == {"run:test", "run:eval_sets", "fold:zh_sms"}
    assert scopes["run:eval_sets"]["rows"] == 12 and scopes["run:eval_sets"]["spam"] == 6
    # the model's column is the model's own scores, read from its features through its head
    model, encoder, _ = load_model(tiny_mean_model_dir, "cpu")
    test = load_from_disk(str(tiny_data_dir / "dataset"))["test"]
    want = roc_auc_score(test["label"], predict_proba(model, encoder, list(test["text"]), progress=False))
    assert abs(scopes["run:test"]["model"]["roc_auc"] - want) < 1e-6
    assert scopes["run:test"]["train_rows"] == len(train)  # the tiny model read every training row
    for s in scopes.values():
        assert 0.0 <= s["refit"]["roc_auc"] <= 1.0 and s["frozen"] is None
    assert scopes["fold:zh_sms"]["baseline"]["roc_auc"] is not None and scopes["run:test"]["baseline"] is None
    assert "pretrained" in res["frozen_skipped"] and "baseline" in res["baseline_skipped"]
    assert set(res["skipped_folds"]) == {"email", "spamassassin", "cjk_seed", "seeded"}
    md = (tmp_path / "BENCH.md").read_text(encoding="utf-8")
    assert "Probe study" in md and "| fold:zh_sms |" in md and "No frozen probe" in md
