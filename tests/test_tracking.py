"""training.tracking against a real MLflow SQLite store in a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from training import tracking as T
from training.config import load_config


@pytest.fixture
def cfg(store, tmp_path, request):
    return load_config("configs/smoke.yaml", [
        f"tracking.experiment={request.node.name}",
        f"data.output_dir={tmp_path / 'data'}",
        f"train.output_dir={tmp_path / 'run'}",
    ])


def _model_dir(path: Path, run_id: str | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "spamlingo.json").write_text(json.dumps({"format_version": 1, "mlflow_run_id": run_id, "threshold": 0.5}))
    (path / "config.json").write_text("{}")
    return path


def test_uri_precedence(monkeypatch, tmp_path):
    cfg = load_config("configs/smoke.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(T, "_LAST_SET", None)
    assert T.tracking_uri(cfg) == f"sqlite:///{T.ROOT / 'mlruns' / 'mlflow.db'}"
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path / 'x.db'}"
    assert T.tracking_uri(cfg) == f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/y.db")
    assert T.tracking_uri(cfg) == "sqlite:////elsewhere/y.db"  # the environment wins
    assert T.artifact_root(f"sqlite:///{tmp_path / 'x.db'}") == (tmp_path / "artifacts").as_uri()


def test_setup_creates_experiment_beside_the_database(cfg, store):
    exp_id = T.setup(cfg.tracking)
    exp = MlflowClient().get_experiment(exp_id)
    assert exp.name == cfg.tracking.experiment
    assert exp.artifact_location.startswith((store / "artifacts").as_uri())
    assert T.setup(cfg.tracking) == exp_id  # idempotent


def test_start_run_logs_params_tags_and_config(cfg, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"dataset_hash": "abc123"}))
    with T.start_run(cfg, "transformer", run_name="unit", config_path="configs/smoke.yaml") as run:
        run_id = run.info.run_id
    r = MlflowClient().get_run(run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == "unit"
    assert r.data.tags["spamlingo.kind"] == "transformer"
    assert r.data.tags["spamlingo.config"] == "configs/smoke.yaml"
    assert r.data.tags["data_hash"] == "abc123"
    assert len(r.data.tags["git_commit"]) == 40
    assert r.data.tags["version.mlflow"] and "version.torch" in r.data.tags
    assert r.data.params["train.batch_size"] == str(cfg.train.batch_size)
    assert r.data.params["model.backbone"] == "tiny"
    assert r.data.params["data.corpora.uci_sms.columns"] == '["label", "text"]'
    local = MlflowClient().download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(local).read_text())["train"]["batch_size"] == cfg.train.batch_size


def test_long_params_are_truncated(cfg):
    cfg.tracking.run_name = "x" * 10_000
    with T.start_run(cfg, "baseline") as run:
        pass
    value = MlflowClient().get_run(run.info.run_id).data.params["tracking.run_name"]
    assert len(value) <= 6000 and value.endswith("...")


def test_failing_body_ends_failed_with_the_error(cfg, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with T.start_run(cfg, "transformer") as run:
            raise RuntimeError("boom: out of memory")
    r = MlflowClient().get_run(run.info.run_id)
    assert r.info.status == "FAILED"
    assert r.data.tags["spamlingo.error"] == "RuntimeError: boom: out of memory"
    text = Path(MlflowClient().download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "Traceback" in text and "boom: out of memory" in text
    import mlflow

    assert mlflow.active_run() is None


def test_an_interrupt_waits_for_the_write_then_ends_the_run_killed(cfg):
    import os
    import signal

    import mlflow

    def like_train(signum, frame):  # training.train's SIGTERM handler
        raise KeyboardInterrupt(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, like_train)
    before_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored under nohup and some CI runners
    try:
        written = []
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            with T.start_run(cfg, "transformer") as run:
                with T.uninterrupted():
                    os.kill(os.getpid(), signal.SIGTERM)
                    os.kill(os.getpid(), signal.SIGINT)  # a second one, held too: one interrupt comes out
                    mlflow.log_metric("val/pr_auc", 0.5, step=4)
                    written.append("after the signals")
        assert written == ["after the signals"] and signal.getsignal(signal.SIGTERM) is like_train
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored signal is left ignored (nohup)
        with T.uninterrupted():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not like_train  # held
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, before_int)
    r = MlflowClient().get_run(run.info.run_id)
    assert r.info.status == "KILLED" and r.data.metrics["val/pr_auc"] == 0.5
    assert r.data.tags["spamlingo.error"] == "KeyboardInterrupt: signal 15"


def test_a_store_that_cannot_end_the_run_does_not_hide_the_error(cfg, monkeypatch, capsys):
    import mlflow
    from mlflow.exceptions import MlflowException

    def locked(status="FINISHED"):
        raise MlflowException("(sqlite3.OperationalError) database is locked\n(Background ...)")

    with pytest.raises(KeyboardInterrupt):
        with T.start_run(cfg, "transformer") as run:
            monkeypatch.setattr(mlflow, "end_run", locked)
            raise KeyboardInterrupt
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"MLflow run {run.info.run_id} could not be marked KILLED" in err and "database is locked)" in err
    assert MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"
    mlflow.end_run()
    # the same when an evaluation reopens a finished run (tracking.resume_run)
    with T.start_run(cfg, "transformer") as done:
        pass
    with pytest.raises(KeyboardInterrupt):
        with T.resume_run(done.info.run_id, cfg):
            monkeypatch.setattr(mlflow, "end_run", locked)
            raise KeyboardInterrupt
    monkeypatch.undo()
    assert f"MLflow run {done.info.run_id} could not be marked FINISHED" in capsys.readouterr().err
    assert MlflowClient().get_run(done.info.run_id).data.tags["spamlingo.eval_error"] == "KeyboardInterrupt: "
    mlflow.end_run()


def test_resume_keeps_params_and_lists_changes(cfg):
    with T.start_run(cfg, "transformer") as run:
        pass
    cfg.train.learning_rate = 0.5
    with T.start_run(cfg, "transformer", run_id=run.info.run_id) as again:
        assert again.info.run_id == run.info.run_id
    r = MlflowClient().get_run(run.info.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["train.learning_rate"] != "0.5"  # MLflow forbids changing a param
    assert "train.learning_rate" in r.data.tags["spamlingo.resume_changed"].split(",")


def test_log_evaluation_metrics_table_and_plots(cfg, tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.4 * y + rng.random(300) * 0.6, 0, 1)
    src = np.where(np.arange(300) % 2 == 0, "uci_sms", "zh_sms")
    lang = np.where(src == "zh_sms", "zh", "en")
    with T.start_run(cfg, "eval") as run:
        grouped = T.log_evaluation(y, p, 0.5, {"source": src, "lang": lang}, "test", out_dir=tmp_path / "out")
        T.log_evaluation(y, p, 0.5, {"source": src}, "validation", plots=False)
    r = MlflowClient().get_run(run.info.run_id)
    assert r.data.metrics["test/overall/f1"] == pytest.approx(grouped["overall"]["f1"])
    assert r.data.metrics["test/source.zh_sms/pr_auc"] == pytest.approx(grouped["source=zh_sms"]["pr_auc"])
    assert "test/lang.en/recall_at_fpr_0.1pct" in r.data.metrics
    assert "val/source.uci_sms/f1" in r.data.metrics and r.data.metrics["threshold"] == 0.5
    arts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.md", "metrics_val.md", "plots"} <= arts
    plots = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert "plots/test_pr_curve.png" in plots and len(plots) == 5
    assert "| source=zh_sms |" in (tmp_path / "out" / "metrics.md").read_text()


def test_resolve_model_dir_from_a_directory(cfg, tmp_path):
    model = _model_dir(tmp_path / "r" / "model", None)
    assert T.resolve_model_dir(str(model), cfg) == model
    assert T.resolve_model_dir(str(tmp_path / "r"), cfg) == model  # a train output dir holds model/
    with pytest.raises(T.TrackingError, match="not a trained model directory"):
        T.resolve_model_dir(str(tmp_path), cfg)
    with pytest.raises(T.TrackingError, match="neither a model directory nor an MLflow run id"):
        T.resolve_model_dir("no-such-thing", cfg)
    with pytest.raises(T.TrackingError, match="no MLflow run"):
        T.resolve_model_dir("0" * 32, cfg)


def test_resolve_model_dir_from_run_id_downloads_once(cfg, tmp_path):
    with T.start_run(cfg, "transformer") as run:
        import mlflow

        src = _model_dir(tmp_path / "src", run.info.run_id)
        mlflow.log_artifacts(str(src), "model")
    cache = tmp_path / "cache"
    got = T.resolve_model_dir(run.info.run_id, cfg, cache_dir=cache)
    assert got == cache / run.info.run_id / "model"
    assert json.loads((got / "spamlingo.json").read_text())["mlflow_run_id"] == run.info.run_id
    assert (got / "config.json").exists()
    stamp = (got / "spamlingo.json").stat().st_mtime_ns
    assert T.resolve_model_dir(run.info.run_id, cfg, cache_dir=cache) == got
    assert (got / "spamlingo.json").stat().st_mtime_ns == stamp  # served from the cache
    # a run whose local output still holds its model resolves to that directory, no download
    local = _model_dir(Path(cfg.train.output_dir) / "model", run.info.run_id)
    assert T.resolve_model_dir(run.info.run_id, cfg, cache_dir=tmp_path / "other") == local
    assert not (tmp_path / "other").exists()


def test_resolve_newest_finished_transformer_run(cfg, tmp_path):
    import mlflow

    with pytest.raises(T.TrackingError, match="run `make train` first"):
        T.resolve_model_dir(None, cfg)
    ids = []
    for i in range(2):
        with T.start_run(cfg, "transformer") as run:
            mlflow.log_artifacts(str(_model_dir(tmp_path / f"m{i}", run.info.run_id)), "model")
            ids.append(run.info.run_id)
    with T.start_run(cfg, "baseline"):
        pass
    with pytest.raises(ValueError):
        with T.start_run(cfg, "transformer"):
            raise ValueError("crashed")
    got = T.resolve_model_dir(None, cfg, cache_dir=tmp_path / "cache")
    assert json.loads((got / "spamlingo.json").read_text())["mlflow_run_id"] == ids[1]


def test_runs_are_named_by_id_prefix_or_run_name(cfg, tmp_path):
    import mlflow

    runs = []
    for i in range(2):
        with T.start_run(cfg, "transformer") as run:
            mlflow.log_artifacts(str(_model_dir(tmp_path / f"m{i}", run.info.run_id)), "model")
            runs.append(run.info)
    cache = tmp_path / "cache"
    meta = lambda d: json.loads((d / "spamlingo.json").read_text())["mlflow_run_id"]  # noqa: E731
    for info in runs:
        assert meta(T.resolve_model_dir(info.run_id[:8], cfg, cache_dir=cache)) == info.run_id  # compare's short id
        assert meta(T.resolve_model_dir(info.run_name, cfg, cache_dir=cache)) == info.run_id
    common = next(i for i in range(32) if runs[0].run_id[i] != runs[1].run_id[i])
    if common >= 4:  # the two ids share a prefix long enough to be a reference: it must not pick one silently
        with pytest.raises(T.TrackingError, match="names 2 MLflow runs"):
            T.resolve_model_dir(runs[0].run_id[:common], cfg, cache_dir=cache)
    with pytest.raises(T.TrackingError, match="neither a model directory nor an MLflow run id, id prefix or run name"):
        T.resolve_model_dir("abc", cfg)  # too short to be a prefix, and no run is called that
    assert T.register(runs[0].run_id[:8], "spam-prefix", "", cfg)["run_id"] == runs[0].run_id


def test_register_model_then_bundle_with_alias(cfg, tmp_path, capsys):
    import mlflow

    with pytest.raises(T.TrackingError, match="no finished training run"):
        T.register(None, "spam-unit", "champion", cfg)
    with T.start_run(cfg, "transformer") as run:
        mlflow.log_artifacts(str(_model_dir(tmp_path / "m", run.info.run_id)), "model")
    rid = run.info.run_id
    out = T.register(None, "spam-unit", "champion", cfg)
    assert out["version"] == "1" and out["run_id"] == rid and out["source"].endswith("/model")
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("spam-unit", "champion").version) == "1"

    # once exported, the bundle is what gets registered; through the command line this time
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    with mlflow.start_run(run_id=rid):
        mlflow.log_artifacts(str(bundle), "bundle")
    overrides = [f"tracking.experiment={cfg.tracking.experiment}"]
    assert T.main(["register", "--run", rid, "--name", "spam-unit", "--alias", "champion",
                   "--config", "configs/smoke.yaml", *overrides]) == 0
    assert "spam-unit version 2" in capsys.readouterr().out
    mv = client.get_model_version_by_alias("spam-unit", "champion")
    assert str(mv.version) == "2" and mv.source.endswith("/bundle") and mv.run_id == rid

    with pytest.raises(SystemExit) as e:
        T.main(["register", "--run", "f" * 32, "--name", "spam-unit", "--config", "configs/smoke.yaml", *overrides])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: no MLflow run '{'f' * 32}' in {T.tracking_uri_now()}"


def test_ui_on_a_taken_port_fails_at_once_with_one_line(store, capsys):
    # mlflow ui itself starts up, logs "address already in use" and exits 0; we check the port first
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            T.main(["ui", "--port", str(port), "--config", "configs/smoke.yaml"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        T.main(["ui", "--port", "99999", "--config", "configs/smoke.yaml"])
    assert e.value.code == 2 and "--port must be in 0..65535" in capsys.readouterr().err


def test_ui_serves_the_store_and_sigterm_stops_every_process(store, tmp_path):
    # `mlflow ui` serves from child processes: a SIGTERM to this command used to leave them holding the port
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "training.tracking", "ui", "--port", str(port),
                             "--config", "configs/smoke.yaml"], cwd=T.ROOT, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "MLflow UI did not come up in 120 s"
                time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        with socket.socket() as s:  # nothing is left listening: the port binds again (TIME_WAIT aside)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_newest_run_elsewhere_names_the_config_to_pass(cfg, tmp_path):
    """make train CONFIG=configs/smoke.yaml, then a plain make eval: the message says which CONFIG finds it."""
    import mlflow

    from training.config import with_overrides

    with T.start_run(cfg, "transformer") as run:
        mlflow.log_artifacts(str(_model_dir(tmp_path / "m", run.info.run_id)), "model")
    other = with_overrides(cfg, ["tracking.experiment=an-empty-experiment"])
    with pytest.raises(T.TrackingError, match=rf"training runs in experiment\(s\) .*{cfg.tracking.experiment}.*"
                                              r"pass the CONFIG they were trained with"):
        T.resolve_model_dir(None, other)
