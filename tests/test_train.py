"""Training loop (training/train.py, training/trainer.py): the real smoke config shrunk (tiny backbone, ~200
training rows), a real MLflow store in tmp_path; end to end in-process, a failing run, kill + resume in
subprocesses, two-process DDP (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.config import ROOT, ConfigError, load_config
from training.rows import cap_training_rows
from training.train import Collator, EncodedDataset, main
from training.trainer import (
    BalancedSampler,
    LengthGroupedSampler,
    class_weights,
    last_complete_checkpoint,
    make_trainer_class,
    resolve_precision,
)

SMOKE = "configs/smoke.yaml"
# The smoke config with fewer rows and a narrower tiny model: ~210 training rows, 28 validation, 40 test.
SHRINK = [
    "data.corpora.uci_sms.cap=80", "data.corpora.zh_sms.cap=80", "data.corpora.spamassassin.cap=60",
    "data.corpora.enron.cap=60", "model.tiny_hidden=32", "train.batch_size=16",
    # the step counts below are for these four corpora; the seed and licensed-ham corpora add rows
    "data.corpora.cjk_seed.enabled=false", "data.corpora.licensed_ham.enabled=false",
    "data.corpora.notice_seed.enabled=false", "data.corpora.zh_scam_seed.enabled=false",
    "data.corpora.zh_mail_seed.enabled=false", "data.corpora.zh_ad_seed.enabled=false",
    "data.corpora.zh_news_seed.enabled=false", "data.corpora.ja_scam_seed.enabled=false",
    "train.rows_per_source={}",  # the row counts below: one cap for every source (default.yaml gives zh_sms its own)
]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """The shrunk smoke data prepared once per session (every test below trains on the same rows)."""
    from training.data import ensure_prepared

    data_dir = tmp_path_factory.mktemp("smoke_data") / "processed"
    return ensure_prepared(load_config(SMOKE, SHRINK + [f"data.output_dir={data_dir}"]))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads of a tiny model mostly wait on each other
    (measured 20x slower under load); the subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def overrides(prepared: Path, tmp_path: Path, *extra: str) -> list[str]:
    return SHRINK + [f"data.output_dir={prepared}", f"train.output_dir={tmp_path / 'run'}",
                     "tracking.experiment=test-train", *extra]


def runs(store: str, experiment: str = "test-train"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def artifacts(client, run_id: str, path: str = "") -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def subprocess_env(store: str) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------------------------ pieces


def test_samplers_are_seeded_per_epoch_and_do_their_job():
    lengths = [(i * 37) % 50 + 3 for i in range(400)]
    s = LengthGroupedSampler(lengths, batch_size=8, seed=5)
    first = list(s)
    assert sorted(first) == list(range(400)) and list(s) == first  # a permutation, replayable
    s.set_epoch(1)
    assert list(s) != first
    # batches hold similar lengths: far less padding than random batches
    def padding(order):
        return sum(max(lengths[i] for i in order[k:k + 8]) * 8 - sum(lengths[i] for i in order[k:k + 8])
                   for k in range(0, 400, 8))
    assert padding(first) < 0.3 * padding(list(range(400)))

    labels = [1] * 20 + [0] * 380
    b = BalancedSampler(labels, seed=3)
    drawn = list(b)
    assert len(drawn) == 400 and list(b) == drawn
    assert 0.4 < sum(labels[i] for i in drawn) / 400 < 0.6  # 5% spam drawn as about half
    assert class_weights(labels) == pytest.approx([400 / 760, 400 / 40])


def test_layer_lr_decay_gives_lower_layers_smaller_learning_rates(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                     num_attention_heads=2, intermediate_size=32))
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen: in no group
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.01, report_to="none",
                             use_cpu=True)
    trainer = make_trainer_class()(model=model, args=args, layer_lr_decay=0.5)
    opt = trainer.create_optimizer()
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    p = dict(model.named_parameters())
    assert lr[id(p["classifier.weight"])] == lr[id(p["bert.pooler.dense.weight"])] == 1e-3
    assert lr[id(p["bert.encoder.layer.2.output.dense.weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr[id(p["bert.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(1e-3 * 0.5 ** 3)
    assert lr[id(p["bert.embeddings.LayerNorm.weight"])] == pytest.approx(1e-3 * 0.5 ** 4)
    assert id(p["bert.embeddings.word_embeddings.weight"]) not in lr
    assert len(lr) == sum(1 for q in model.parameters() if q.requires_grad)
    assert wd[id(p["bert.encoder.layer.1.intermediate.dense.weight"])] == 0.01
    assert wd[id(p["bert.encoder.layer.1.intermediate.dense.bias"])] == 0.0
    sched = trainer.create_scheduler(10, opt)  # the schedule scales every group alike: the ratios stay
    for _ in range(3):
        opt.step()
        sched.step()
    rates = sorted({g["lr"] for g in opt.param_groups})
    assert len(rates) == 5 and rates[-1] / rates[0] == pytest.approx(2 ** 4)
    plain = make_trainer_class()(model=model, args=args).create_optimizer()  # 1.0: the Trainer's own
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


def test_collator_pads_each_batch_to_its_longest_row():
    from serving.text import Encoder, TextSettings
    from training.backbone import e5_tokenizer_file

    enc = Encoder.from_file(str(e5_tokenizer_file()), TextSettings(max_length=16))
    ds = EncodedDataset([e.input_ids for e in enc.encode_batch(["hi", "win a free prize now", "你好"])], [0, 1, 0])
    batch = Collator(enc)([ds[0], ds[2]])
    assert batch["input_ids"].shape == (2, max(ds.lengths[0], ds.lengths[2]))
    assert batch["attention_mask"].sum().item() == ds.lengths[0] + ds.lengths[2]
    assert batch["labels"].tolist() == [0, 0]
    assert Collator(enc)([ds[1]])["input_ids"].shape == (1, ds.lengths[1])
    assert ds.sorted_by_length().lengths == sorted(ds.lengths)


def test_last_complete_checkpoint_skips_one_cut_short(tmp_path):
    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((4, True), (8, True), (12, False), (9, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-8"


def test_precision_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert resolve_precision("auto")[0] == "fp32"
    assert resolve_precision("bf16")[0] == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16")


# ------------------------------------------------------------------------------------------ end to end


def test_train_end_to_end_logs_a_finished_run_with_a_loadable_model(prepared, tmp_path, store, capsys):
    import numpy as np

    from serving.text import Encoder, TextSettings
    from training.evaluate import predict_proba
    from training.tracking import resolve_model_dir

    assert main(["--config", SMOKE, *overrides(prepared, tmp_path, "train.eval_every=5",
                                               "tracking.register_as=spam-test")]) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out and "samples/s" in out
    assert "| overall |" in out and "| lang=zh |" in out  # the test table

    client, found = runs(store)
    assert len(found) == 1
    run = found[0]
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "16" and run.data.params["model.backbone"] == "tiny"
    assert run.data.tags["spamlingo.kind"] == "transformer" and run.data.tags["git_commit"]
    assert run.data.tags["data_hash"] == json.loads((prepared / "manifest.json").read_text())["dataset_hash"]
    assert run.data.tags["device"].startswith("cpu") and run.data.tags["world_size"] == "1"
    m = run.data.metrics
    for key in ("test/overall/pr_auc", "test/source.zh_sms/recall", "test/lang.en/f1", "val/overall/pr_auc",
                "threshold", "train/samples_per_second", "model/parameters", "model/size_mb"):
        assert key in m, key
    assert m["train/samples_per_second"] > 0
    # curves: a loss point per validation pass and val/pr_auc at every evaluation (steps 5, 10, 14)
    assert [h.step for h in client.get_metric_history(rid, "val/pr_auc")] == [5, 10, 14]
    assert len(client.get_metric_history(rid, "train/loss")) >= 3
    arts = artifacts(client, rid)
    for name in ("config.yaml", "metrics.md", "metrics_val.md", "backbone.json", "model/spamlingo.json",
                 "model/model.safetensors", "model/tokenizer.json", "plots/test_pr_curve.png"):
        assert name in arts, name

    # the model directory (DESIGN §3) is this run's, loads, and scores like the logged threshold says
    model_dir = tmp_path / "run" / "model"
    assert resolve_model_dir(rid) == model_dir
    meta = json.loads((model_dir / "spamlingo.json").read_text())
    assert meta["mlflow_run_id"] == rid and meta["backbone"] == "tiny" and meta["format_version"] == 1
    assert meta["threshold"] == pytest.approx(m["threshold"]) and meta["threshold_rule"] == "max_recall_at_fpr"
    spread = meta["threshold_choice"]["spread"]  # the threshold chosen again on resampled validation
    assert spread["resamples"] == 200 and spread["low"] <= meta["threshold"] <= spread["high"]
    assert m["threshold/spread_low"] == pytest.approx(spread["low"]) and "validation resamples choose" in out
    assert meta["data_dir"] == str(prepared) and meta["data_hash"] == run.data.tags["data_hash"]
    assert meta["metrics"]["test"]["pr_auc"] == pytest.approx(m["test/overall/pr_auc"])
    from serving.thresholds import describe, from_manifest
    from training.tracking import SCORED_AT_TAG

    # the thresholds its test metrics were scored at (bench quality reads the metrics while they still apply)
    assert run.data.tags[SCORED_AT_TAG + "test"] == describe(from_manifest(meta))
    assert meta["backbone_info"]["vocab_trim"]
    settings = TextSettings.from_dict(meta["text"])
    assert settings.max_length == 64 and settings.truncation == "head_tail"
    from training.modeling import load_classifier, pooling_of

    model = load_classifier(model_dir)  # the smoke config trains with mean pooling: its own head, not the CLS one
    assert pooling_of(model) == "mean" and meta["backbone_info"]["pooling"] == "mean"
    encoder = Encoder.from_file(str(model_dir / "tokenizer.json"), settings)
    from datasets import load_from_disk

    test = load_from_disk(str(prepared / "dataset"))["test"]
    p = predict_proba(model, encoder, list(test["text"]), progress=False)
    from training.metrics import binary_metrics

    assert binary_metrics(np.asarray(test["label"]), p, meta["threshold"])["f1"] == pytest.approx(
        m.get("test/overall/f1", 0.0), abs=1e-9)
    # best checkpoint kept, plus the newest for resuming
    assert last_complete_checkpoint(tmp_path / "run" / "checkpoints").name == "checkpoint-14"
    # registered after training
    assert [v.run_id for v in client.search_model_versions("name='spam-test'")] == [rid]


def test_fresh_rows_per_epoch_trains_the_same_steps_on_more_distinct_rows(prepared, tmp_path, store, capsys):
    from training.data import load_splits

    assert main(["--config", SMOKE, *overrides(prepared, tmp_path, "train.epochs=2", "train.max_rows_per_source=30",
                                               "train.fresh_rows_per_epoch=true", "train.evaluate_test=false")]) == 0
    assert "train rows 120 per epoch" in capsys.readouterr().out  # 4 sources x 30
    _, found = runs(store)
    m = found[0].data.metrics
    cfg = load_config(SMOKE, SHRINK + [f"data.output_dir={prepared}"])
    available = len(load_splits(cfg)["train"])
    assert m["data/train_rows"] == 120 and 120 < m["data/train_rows_distinct"] <= min(240, available)
    assert m["train/steps"] == 2 * 8  # ceil(120 / 16) an epoch: the steps of the capped rows, not of all


def test_augment_adds_rewritten_copies_to_the_training_rows_only(prepared, tmp_path, store, capsys):
    """train.augment.zh_traditional=1.0: every training row that OpenCC's s2t changes is read twice; the
    validation rows (the threshold) are the prepared ones."""
    from opencc import OpenCC

    from training.data import load_splits

    splits = load_splits(load_config(SMOKE, SHRINK + [f"data.output_dir={prepared}"]))
    s2t = OpenCC("s2t")
    changed = sum(s2t.convert(t) != t for t in splits["train"]["text"])
    assert changed > 0  # the shrunk smoke mix has Chinese SMS
    assert main(["--config", SMOKE, *overrides(prepared, tmp_path, "train.augment.zh_traditional=1.0",
                                               "train.max_steps=2", "train.evaluate_test=false")]) == 0
    _, found = runs(store)
    m = found[0].data.metrics
    assert m["data/train_rows"] == len(splits["train"]) + changed
    assert m["data/val_rows"] == len(splits["validation"])


def test_unread_training_ham_joins_validation_for_the_threshold(prepared, tmp_path, store, capsys):
    """eval.threshold_unread_ham=true with a cap: the ham rows the cap leaves out are scored and pooled with
    validation (spamlingo.json says how many of each source), and `make threshold` chooses the same again."""
    from training.data import load_splits
    from training.evaluate import rethreshold

    cfg = load_config(SMOKE, SHRINK + [f"data.output_dir={prepared}", "train.max_rows_per_source=30"])
    train = load_splits(cfg)["train"]
    read = set(cap_training_rows(train, 30, 0, cfg.train.seed)["id"])
    unread = [s for rid, s, y in zip(train["id"], train["source"], train["label"]) if y == 0 and rid not in read]
    assert len(unread) > 50  # much of the shrunk mix's ham (162 rows) is left out at 30 rows a source
    assert main(["--config", SMOKE, *overrides(prepared, tmp_path, "train.max_rows_per_source=30", "train.max_steps=2",
                                               "train.evaluate_test=false", "eval.threshold_unread_ham=true")]) == 0
    assert f"validation and {len(unread)} training ham rows the model did not read" in capsys.readouterr().out
    meta = json.loads((tmp_path / "run" / "model" / "spamlingo.json").read_text())
    pool = meta["threshold_choice"]["pool"]
    assert pool["rows"] == len(unread) and pool["by_source"] == {s: unread.count(s) for s in sorted(set(unread))}
    assert meta["threshold_choice"]["val_fpr"] <= 0.005 + 1e-9
    assert meta["rows_read"]["max_rows_per_source"] == 30 and pool["rows_read"] == meta["rows_read"]
    # make threshold with a config whose caps differ: the model's own rows_read decides the unread rows
    again = rethreshold(tmp_path / "run" / "model", load_config(SMOKE, overrides(
        prepared, tmp_path, "train.max_rows_per_source=10", "eval.threshold_unread_ham=true")), log=False,
        progress=False)
    assert again["default"] == pytest.approx(meta["threshold"], abs=1e-9) and again["global"]["pool"] == pool
    # without the switch, validation alone (and no pool recorded)
    alone = rethreshold(tmp_path / "run" / "model", load_config(SMOKE, overrides(
        prepared, tmp_path, "eval.threshold_unread_ham=false")), log=False, progress=False)
    assert "pool" not in alone["global"]


def test_a_failing_run_ends_failed_with_the_error_logged(prepared, tmp_path, store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", SMOKE, *overrides(prepared, tmp_path, "model.backbone=./no/such/model/dir")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model.backbone=./no/such/model/dir") and "Traceback" not in "".join(err)
    client, found = runs(store)
    assert len(found) == 1 and found[0].info.status == "FAILED"
    assert "no such model directory" in found[0].data.tags["spamlingo.error"]
    assert "error.txt" in artifacts(client, found[0].info.run_id)


@pytest.mark.parametrize("bad, message", [
    (["train.class_balance=oversample"], "train.class_balance must be one of weighted_loss, sampler, none"),
    # once a traceback from the Encoder after the run had started
    (["model.truncation=head_tail", "model.head_tokens=1000"], "model: head_tokens must be 0 (two thirds) or in 1..62"),
    # once a range() ValueError at the validation pass, after the whole training run
    (["eval.batch_size=0"], "eval.batch_size must be >= 1, got 0"),
    (["train.layer_lr_decay=0"], "train.layer_lr_decay must be in (0, 1]"),
    (["train.wise_alpha=1.5"], "train.wise_alpha must be in [0, 1]"),
    (["train.rows_per_source.zh_smss=0"], "train.rows_per_source: no corpus zh_smss in data.corpora"),
    (["train.fresh_rows_per_epoch=true", "train.max_train_rows=50"], "cannot be combined with train.max_train_rows"),
    (["train.fresh_rows_per_epoch=true", "train.augment.zh_traditional=0.5"], "cannot be combined with train.augment"),
    (["train.augment.leet=0.5"], "train.augment: no perturbation 'leet'"),
])
def test_config_mistakes_fail_before_any_run(prepared, tmp_path, store, capsys, bad, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", SMOKE, *overrides(prepared, tmp_path, *bad)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was opened


def test_wise_alpha_interpolates_the_trained_encoder_with_the_backbone_as_loaded(prepared, tmp_path, store):
    """train.wise_alpha=0.5 writes the same run as 1.0 with every encoder tensor halfway back to the tiny
    backbone's initial weights (a function of its config), the head as trained, the thresholds chosen anew."""
    from training.backbone import build_tiny
    from training.modeling import load_classifier

    dirs = {}
    for alpha in (1.0, 0.5):
        out = tmp_path / f"alpha{alpha:g}"
        assert main(["--config", SMOKE, *overrides(prepared, tmp_path, f"train.output_dir={out}",
                                                   f"train.wise_alpha={alpha}")]) == 0
        dirs[alpha] = out / "model"
    trained, wise = (load_classifier(dirs[a]).state_dict() for a in (1.0, 0.5))
    initial = build_tiny(load_config(SMOKE, SHRINK).model)[0].state_dict()
    moved = [name for name in trained if name.startswith("bert.encoder.")]
    assert len(moved) > 10
    for name in moved:  # the encoder blocks keep their shapes (the vocabulary trim cuts only the embeddings)
        assert wise[name].allclose(0.5 * initial[name] + 0.5 * trained[name], atol=1e-6), name
    assert not trained[moved[0]].allclose(initial[moved[0]])  # fine-tuning did move it
    head = [name for name in trained if not name.startswith("bert.")]
    assert head and all(wise[name].equal(trained[name]) for name in head)
    metas = {a: json.loads((dirs[a] / "spamlingo.json").read_text()) for a in dirs}
    assert "interpolation" not in metas[1.0]
    done = metas[0.5]["interpolation"]
    assert done["alpha"] == 0.5 and done["interpolated_tensors"] >= len(moved)
    assert set(head) <= set(done["kept_as_trained"])
    assert metas[0.5]["mlflow_run_id"] == runs(store)[1][0].info.run_id  # the newest run: the one trained
    assert metas[0.5]["threshold"] != metas[1.0]["threshold"]  # chosen on the interpolated model's scores
    from training.interpolate import InterpolateError, run

    with pytest.raises(InterpolateError, match=r"already interpolated \(alpha 0.5, from training"):
        run(dirs[0.5], load_config(SMOKE, SHRINK), 0.5, pretrained={})
    # --from-checkpoint: the best checkpoint kept beside the model dir, interpolated again at the same alpha,
    # is the model make train wrote (so alpha can be chosen again without retraining)
    cfg = load_config(SMOKE, overrides(prepared, tmp_path))
    base = {name[len("bert."):]: t for name, t in initial.items() if name.startswith("bert.")}
    again = run(dirs[0.5], cfg, 0.5, pretrained=base, from_checkpoint=True, out_dir=tmp_path / "again")
    redone = load_classifier(again).state_dict()
    assert all(redone[name].allclose(wise[name], atol=1e-6) for name in moved + head)
    meta = json.loads((again / "spamlingo.json").read_text())
    assert meta["interpolation"]["alpha"] == 0.5 and "/checkpoints/checkpoint-" in meta["interpolation"]["from"]
    assert meta["threshold"] == pytest.approx(metas[0.5]["threshold"], abs=1e-6)  # the same rule, same scores
    # a checkpoint that another run left under the same train.output_dir is refused, not interpolated
    step = metas[0.5]["training"]["best_checkpoint_step"]
    ckpt = dirs[0.5].parent / "checkpoints" / f"checkpoint-{step}" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt))
    save_file({k: (v + 1 if k in head else v) for k, v in state.items()}, str(ckpt))
    with pytest.raises(InterpolateError, match="is not .* checkpoint .* replaced it"):
        run(dirs[0.5], cfg, 0.5, pretrained=base, from_checkpoint=True, out_dir=tmp_path / "other")
    ckpt.unlink()
    with pytest.raises(InterpolateError, match="is missing"):
        run(dirs[0.5], cfg, 0.5, pretrained=base, from_checkpoint=True, out_dir=tmp_path / "other")


# ------------------------------------------------------------------------------------------ resume, DDP


def _run_until_checkpoint_after(cmd, env, ckpt_dir: Path, after: int, sig: int) -> subprocess.Popen:
    """Start `cmd`, wait for a complete checkpoint newer than step `after`, send `sig`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        found = last_complete_checkpoint(ckpt_dir)
        if found is not None and int(found.name.split("-")[1]) > after:
            proc.send_signal(sig)
            proc.wait(timeout=120)
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before a new checkpoint:\n"
                                 + proc.stdout.read())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def test_interrupted_runs_resume_from_their_last_checkpoint(prepared, tmp_path, store):
    # 40 steps of 8 rows (about 1.5 epochs: a resumed epoch replays its seeded order), checkpoints every 4
    args = overrides(prepared, tmp_path, "train.batch_size=8", "train.max_steps=40", "train.eval_every=4",
                     "train.early_stopping_patience=0")
    cmd = [sys.executable, "-m", "training.train", "--config", SMOKE, *args]
    env = subprocess_env(store)
    ckpt_dir = tmp_path / "run" / "checkpoints"

    # SIGTERM (a scheduler, `kill`): the run ends KILLED in MLflow, with a hint, exit status 130
    proc = _run_until_checkpoint_after(cmd, env, ckpt_dir, 0, signal.SIGTERM)
    assert proc.returncode == 130 and "train.resume=true" in proc.stdout.read()
    run_id = (tmp_path / "run" / "mlflow_run_id.txt").read_text().strip()
    client, found = runs(store)
    assert [(r.info.run_id, r.info.status) for r in found] == [(run_id, "KILLED")]
    first = int(last_complete_checkpoint(ckpt_dir).name.split("-")[1])

    # resumed, then SIGKILL (nothing can close the run: it stays RUNNING; a half-written checkpoint is skipped)
    proc = _run_until_checkpoint_after(cmd + ["train.resume=true"], env, ckpt_dir, first, signal.SIGKILL)
    log = proc.stdout.read()
    assert f"resuming from {ckpt_dir / f'checkpoint-{first}'} (step {first})" in log
    assert [r.info.status for r in runs(store)[1]] == ["RUNNING"]
    second = int(last_complete_checkpoint(ckpt_dir).name.split("-")[1])
    assert first < second < 40 and second % 4 == 0

    done = subprocess.run(cmd + ["train.resume=true"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming from {ckpt_dir / f'checkpoint-{second}'} (step {second})" in done.stdout
    state = json.loads((last_complete_checkpoint(ckpt_dir) / "trainer_state.json").read_text())
    assert state["global_step"] == 40
    # the history carries on from each checkpoint: every evaluation once, none lost, none repeated
    assert [h["step"] for h in state["log_history"] if "eval_pr_auc" in h] == list(range(4, 41, 4))
    # one MLflow run throughout, finished, with curves from before and after the interruptions
    client, found = runs(store)
    assert [(r.info.run_id, r.info.status) for r in found] == [(run_id, "FINISHED")]
    assert "train.resume" in found[0].data.tags.get("spamlingo.resume_changed", "")
    assert {4, first, second, 40} <= {h.step for h in client.get_metric_history(run_id, "val/pr_auc")}
    assert json.loads((tmp_path / "run" / "model" / "spamlingo.json").read_text())["mlflow_run_id"] == run_id


def test_two_process_ddp_with_gloo_trains_once_and_writes_one_model(prepared, tmp_path, store):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "training.train", "--config", SMOKE,
           *overrides(prepared, tmp_path, "train.eval_every=0")]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(store), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("device: cpu") == 1  # only rank 0 reports
    assert done.stdout.count("| overall |") == 1
    client, found = runs(store)
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    run = found[0]
    assert run.data.tags["world_size"] == "2"
    # each rank takes half of every round: one epoch of 212 rows at 16 per rank is 7 steps, not 14
    rows = int(run.data.metrics["data/train_rows"])
    assert run.data.metrics["train/steps"] == -(-rows // 32)
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val/pr_auc")] == [-(-rows // 32)]
    model_dirs = [p.parent for p in (tmp_path / "run").rglob("spamlingo.json")]
    assert model_dirs == [tmp_path / "run" / "model"]
    meta = json.loads((tmp_path / "run" / "model" / "spamlingo.json").read_text())
    assert meta["mlflow_run_id"] == run.info.run_id
    from training.modeling import load_classifier

    load_classifier(tmp_path / "run" / "model")
