"""training.compare against a real MLflow store (SQLite in a temp dir) holding a few tiny runs.

The runs are opened with training.tracking.start_run (params = the flattened config) and scored with
training.tracking.log_evaluation on synthetic predictions, so the test breaks if compare stops reading
what training writes.
"""

from __future__ import annotations

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")

from training import compare, tracking  # noqa: E402
from training.config import load_config  # noqa: E402
from training.metrics import metric_name  # noqa: E402


def _log_run(uri, experiment, name, kind, overrides, noise, seed, finish=True, data_hash=None):
    """One run through the real tracking path; returns (run id, its logged metrics)."""
    cfg = load_config("configs/smoke.yaml", [f"tracking.tracking_uri={uri}", f"tracking.experiment={experiment}",
                                            *overrides])
    rng = np.random.default_rng(seed)
    n = 240
    y = rng.integers(0, 2, size=n)
    p = np.clip(0.5 * y + 0.25 + rng.normal(0, noise, size=n), 0, 1)
    source = np.array(["uci_sms", "zh_sms", "enron"] * (n // 3))
    groups = {"source": source, "lang": np.where(source == "zh_sms", "zh", "en")}
    if not finish:  # a run still going (or crashed without closing): compare must skip it
        tracking.setup(cfg)
        run = mlflow.start_run(run_name=name, tags={"spamlingo.kind": kind})
        mlflow.log_metrics({"test/overall/f1": 1.0})
        rid = run.info.run_id
        mlflow.end_run("RUNNING")
        return rid, {}
    with tracking.start_run(cfg, kind, run_name=name, data_hash=data_hash) as run:
        tracking.log_evaluation(y, p, 0.5, groups, "test", plots=False)
        mlflow.log_metrics({"model/size_mb": 1.5, "model/parameters": 1234567})
        if name == "tiny-lr3":  # what `make bench` logs after measuring the server
            mlflow.log_metrics({"serve/p50_ms": 12.5})
        rid = run.info.run_id
    if name == "tiny-lr3":  # what `make ood` logs into the run it benchmarked
        from training import ood

        side = lambda f1, fpr: {"f1": f1, "roc_auc": 0.9, "recall": 0.8, "fpr": fpr}  # noqa: E731
        ood.log_to_mlflow(cfg, rid, {"protocols": [
            {"name": "unseen_ham", "scopes": [{"scope": "lang:zh", "rows": 10, "spam": 0,
                                               "model": side(None, 0.0125), "baseline": side(None, 0.0875)}]},
            {"name": "loco", "scopes": [{"scope": "zh_sms", "rows": 9, "spam": 3,
                                         "model": {**side(0.91, 0.01), "at_spread": {
                                             "low": {"threshold": 0.8, "f1": 0.93, "recall": 0.9, "fpr": 0.04},
                                             "high": {"threshold": 0.99, "f1": 0.85, "recall": 0.7, "fpr": 0.0}}},
                                         "baseline": side(0.72, 0.02)},
                                        {"scope": "zh_sms:lang:zh", "rows": 9, "spam": 3,
                                         "model": side(0.5, 0.5), "baseline": side(0.5, 0.5)}]}]})
    return rid, dict(mlflow.MlflowClient(uri).get_run(rid).data.metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    exp = "spamlingo-test"
    runs = {
        "tiny-lr3": _log_run(uri, exp, "tiny-lr3", "transformer", [], noise=0.15, seed=1),
        "tiny-lr4": _log_run(uri, exp, "tiny-lr4", "transformer", ["train.learning_rate=0.0001"], 0.35, seed=2),
        "unfinished": _log_run(uri, exp, "unfinished", "transformer", [], noise=0.1, seed=3, finish=False),
        "tfidf": _log_run(uri, "spamlingo-other", "tfidf", "baseline", [], noise=0.3, seed=4),
        "eval-file": _log_run(uri, exp, "eval-file", "eval", [], noise=0.2, seed=5),  # `make eval DATA=...`
        "mix-a": _log_run(uri, "mixes", "mix-a", "transformer", [], 0.2, seed=6, data_hash="a" * 64),
        "mix-b": _log_run(uri, "mixes", "mix-b", "transformer", [], 0.2, seed=7, data_hash="b" * 64),
    }
    yield uri, runs
    mp.undo()


def _run(store, tmp_path, capsys, *args):
    uri, _ = store
    compare.main(["--tracking-uri", uri, "--out", str(tmp_path / "out"), *args])
    return capsys.readouterr().out


def test_table_shows_runs_differing_key_and_best(store, tmp_path, capsys):
    _, runs = store
    out = _run(store, tmp_path, capsys, "--experiment", "spamlingo-test")
    table = out.split("\n\n")[0]
    assert "tiny-lr3" in table and "tiny-lr4" in table
    assert "unfinished" not in out and "tfidf" not in out  # not finished / other experiment
    assert "eval-file" not in out  # scores a file, not a model
    header = table.splitlines()[1]
    assert "train.learning_rate" in header
    assert "serve/p50_ms" in header and "12.5" in next(line for line in table.splitlines() if "tiny-lr3" in line)
    for same in ("data.seed", "train.batch_size", "model.backbone", "train.epochs"):
        assert same not in out
    assert "0.0001" in table and "0.001" in table
    # The best run is the one whose logged F1 is higher, marked in its row and named on the best line.
    f1 = {name: runs[name][1][metric_name("test", "overall", "f1")] for name in ("tiny-lr3", "tiny-lr4")}
    best = max(f1, key=f1.get)
    best_row = next(line for line in table.splitlines() if best in line)
    assert best_row.startswith("*")
    assert f"best by test/overall/f1: {best}" in out
    assert f"{f1[best]:.4f}" in best_row
    # Breakdowns per source and per language, from the logged `test/source.<name>/...` metrics.
    assert "per source and per language" in out
    for col in ("uci_sms", "zh_sms", "enron", "lang zh", "lang en"):
        assert col in out
    assert f"{runs[best][1][metric_name('test', 'source=zh_sms', 'pr_auc')]:.4f}" in out

    md = (tmp_path / "out" / "compare.md").read_text(encoding="utf-8")
    assert f"**{best}**" in md and "tiny-lr4" in md and "train.learning_rate" in md and "data.seed" not in md
    assert "![" in md and "compare.png" in md
    png = (tmp_path / "out" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert str(tmp_path / "out" / "compare.md") in out or "compare.md" in out.splitlines()[-2]


def test_out_of_distribution_columns_with_the_baseline_below(store, tmp_path, capsys):
    out = _run(store, tmp_path, capsys, "--experiment", "spamlingo-test")
    table = out[out.index("Out-of-distribution"):]
    header = table.splitlines()[1]
    assert "unseen_ham zh fpr" in header and "loco zh_sms f1" in header and "loco zh_sms roc_auc" in header
    assert "zh_sms.lang" not in header  # a fold's per-language rows stay in ood.json
    lines = table.splitlines()
    model = next(i for i, line in enumerate(lines) if "tiny-lr3" in line)
    assert "0.0125" in lines[model] and "0.9100 (0.9300-0.8500)" in lines[model]  # F1 and its spread's ends
    assert "0.9000 (" not in lines[model]  # ROC-AUC has no threshold, hence no spread
    assert "baseline" in lines[model + 1] and "0.0875" in lines[model + 1] and "0.7200" in lines[model + 1]
    ood_rows = table.split("\n\n")[0]
    assert "tiny-lr4" not in ood_rows  # no ood/ metrics logged: no row


def test_metric_choice_and_lower_is_better(store, tmp_path, capsys):
    _, runs = store
    key = metric_name("test", "overall", "fpr")
    out = _run(store, tmp_path, capsys, "--experiment", "spamlingo-test", "--metric", key)
    vals = {n: runs[n][1][key] for n in ("tiny-lr3", "tiny-lr4")}
    assert f"best by {key}: {min(vals, key=vals.get)}" in out


def test_filters_by_tag_and_run_ids(store, tmp_path, capsys):
    _, runs = store
    out = _run(store, tmp_path, capsys, "--tag", "spamlingo.kind=baseline")
    assert "tfidf" in out and "tiny-lr3" not in out and "baseline" in out

    # Every experiment when none is named; a baseline is a row like any other.
    out = _run(store, tmp_path, capsys)
    for name in ("tiny-lr3", "tiny-lr4", "tfidf"):
        assert name in out
    assert "experiment" in out.splitlines()[1]

    out = _run(store, tmp_path, capsys, "--tag", "spamlingo.kind=eval")
    assert "eval-file" in out and "tiny-lr3" not in out

    lr3, tfidf = runs["tiny-lr3"][0], runs["tfidf"][0]
    out = _run(store, tmp_path, capsys, "--runs", f"{lr3[:10]},tfidf")
    table = out.split("\n\n")[0]
    assert "tiny-lr3" in table and "tfidf" in table and "tiny-lr4" not in table
    assert tfidf[:8] in table


def test_runs_on_different_data_mixes_are_flagged(store, tmp_path, capsys):
    out = _run(store, tmp_path, capsys, "--experiment", "mixes")
    table = out.split("\n\n")[0]
    assert "data" in table.splitlines()[1].split()
    assert "a" * 12 in table and "b" * 12 in table
    assert "warning: these runs were scored on 2 different data mixes" in out
    assert "> **Warning:** these runs were scored on 2" in (tmp_path / "out" / "compare.md").read_text()
    out = _run(store, tmp_path, capsys, "--experiment", "mixes", "--tag", f"data_hash={'a' * 64}")
    assert "mix-a" in out and "mix-b" not in out and "warning" not in out
    out = _run(store, tmp_path, capsys, "--experiment", "spamlingo-test")  # one mix: no data column
    assert "warning" not in out and "data" not in out.split("\n\n")[0].splitlines()[1].split()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--experiment", "nope"], "no MLflow experiment named 'nope'"),
        (["--tag", "spamlingo.kind=distilled"], "no finished runs matching spamlingo.kind=distilled"),
        (["--runs", "zzzz-no-such-run"], "no run with id, id prefix or name 'zzzz-no-such-run'"),
        (["--metric", "test/overall/bogus"], "no selected run logged the metric 'test/overall/bogus'"),
        (["--tag", "novalue"], "is not of the form key=value"),
    ],
)
def test_user_mistakes_are_one_line_errors(store, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        _run(store, tmp_path, capsys, *args)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_or_empty_store(tmp_path, capsys):
    missing = tmp_path / "nothing" / "mlflow.db"
    with pytest.raises(SystemExit) as e:
        compare.main(["--tracking-uri", f"sqlite:///{missing}", "--out", str(tmp_path / "o")])
    assert e.value.code != 0
    assert "no MLflow store" in capsys.readouterr().err
    assert not missing.exists()  # looking must not create a store

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    mlflow.MlflowClient(tracking_uri=empty).search_experiments()  # creates the tables, no runs
    with pytest.raises(SystemExit) as e:
        compare.main(["--tracking-uri", empty, "--out", str(tmp_path / "o")])
    assert e.value.code != 0
    assert "no finished runs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
