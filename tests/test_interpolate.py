"""training/interpolate.py: WiSE-FT weight interpolation on the tiny mean-pooled model (a real model
directory, real validation data), with a stand-in for the pretrained weights (the tiny backbone has none)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from training.config import load_config
from training.interpolate import InterpolateError, interpolate, main, run
from training.modeling import load_classifier


def _pretrained_like(model, fill: float) -> dict:
    """A base model's state dict (no 'bert.' prefix) of the model's shapes, every value `fill`; the word
    embeddings get another shape, as the untrimmed vocabulary of a real backbone has."""
    prefix = f"{model.base_model_prefix}."
    out = {name[len(prefix):]: torch.full_like(t, fill) for name, t in model.state_dict().items()
           if name.startswith(prefix) and t.is_floating_point()}
    emb = "embeddings.word_embeddings.weight"
    out[emb] = torch.zeros(out[emb].shape[0] + 7, out[emb].shape[1])
    return out


def test_interpolation_is_the_weighted_mean_of_matching_tensors_only(tiny_mean_model_dir):
    model = load_classifier(tiny_mean_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = interpolate(model, _pretrained_like(model, 1.0), alpha=0.25)
    after = model.state_dict()
    layer = next(k for k in after if ".encoder.layer.0." in k and k.endswith("weight"))
    assert torch.allclose(after[layer], 0.75 * 1.0 + 0.25 * before[layer])
    head = [k for k in after if not k.startswith(f"{model.base_model_prefix}.")]
    emb = f"{model.base_model_prefix}.embeddings.word_embeddings.weight"
    assert head and set(report["kept"]) >= set(head) | {emb}
    for k in report["kept"]:  # the head (not pretrained) and the trimmed embeddings (another shape) stay
        assert torch.equal(after[k], before[k]), k
    assert report["interpolated"] == len(after) - len(report["kept"]) > 10
    # alpha 1 leaves the model as trained; outside [0, 1] is refused
    model = load_classifier(tiny_mean_model_dir)
    interpolate(model, _pretrained_like(model, 1.0), alpha=1.0)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    with pytest.raises(InterpolateError, match="alpha must be in"):
        interpolate(model, {}, alpha=1.5)


def test_run_writes_a_new_model_dir_with_its_own_thresholds(tiny_mean_model_dir, tmp_path, capsys):
    src = tmp_path / "model"
    shutil.copytree(tiny_mean_model_dir, src)
    cfg = load_config("configs/smoke.yaml", ["eval.per_language_thresholds=false"])
    model = load_classifier(src)
    out = run(src, cfg, 0.5, pretrained=_pretrained_like(model, 0.0))
    assert out == tmp_path / "model-wise0.5"
    meta = json.loads((out / "spamlingo.json").read_text(encoding="utf-8"))
    assert meta["mlflow_run_id"] is None and meta["interpolation"]["alpha"] == 0.5
    assert meta["interpolation"]["from"] == str(src.resolve()) and meta["threshold_rule"] == cfg.eval.threshold_rule
    assert "thresholds global 0.5 -> global" in capsys.readouterr().out  # chosen again on validation
    halved = load_classifier(out).state_dict()
    layer = next(k for k in halved if ".encoder.layer.0." in k and k.endswith("weight"))
    assert torch.allclose(halved[layer], 0.5 * model.state_dict()[layer])
    assert json.loads((src / "spamlingo.json").read_text(encoding="utf-8"))["threshold"] == 0.5  # source untouched
    # make export takes it like any model directory; the bundle is named after the run directory + suffix
    from serving.bundle import load_bundle
    from training.config import Config
    from training.export import export_bundle

    bundle = load_bundle(export_bundle(Config(), out, out_root=tmp_path / "bundles", show=False,
                                       threads=1).bundle_dir)
    assert bundle.name == f"{tmp_path.name}-wise0.5" and bundle.threshold == meta["threshold"]
    with pytest.raises(InterpolateError, match="already interpolated"):
        run(out, cfg, 0.5, pretrained={})
    with pytest.raises(InterpolateError, match="no weight of .* matches"):
        run(src, cfg, 0.5, out_dir=tmp_path / "other", pretrained={"unrelated.weight": torch.zeros(2)})


def test_command_line_errors_are_one_line(tiny_mean_model_dir, capsys):
    # the tiny backbone has no pretrained weights; alpha 1 would copy the model
    for args, message in ((["--run", str(tiny_mean_model_dir)], "has no pretrained weights"),
                          (["--run", str(tiny_mean_model_dir), "--alpha", "1"], "--alpha must be in [0, 1)"),
                          (["--run", str(tiny_mean_model_dir), "--with", str(tiny_mean_model_dir)],
                           "--with must be another run than --run"),
                          (["--run", str(tiny_mean_model_dir), "--from-checkpoint", "--with", str(tiny_mean_model_dir)],
                           "--from-checkpoint and --with cannot be combined"),
                          # the fixture's model dir has no checkpoints beside it
                          (["--run", str(tiny_mean_model_dir), "--from-checkpoint"], "--from-checkpoint needs")):
        with pytest.raises(SystemExit) as e:
            main(["--config", "configs/smoke.yaml", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err


def _other_run(src, dst, shift: float, **meta_updates):
    """A copy of the model directory `src` whose every floating-point weight is moved by `shift`: another
    run of the same recipe, as far as averaging is concerned."""
    shutil.copytree(src, dst)
    model = load_classifier(dst)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(shift)
    model.save_pretrained(dst)
    meta = json.loads((dst / "spamlingo.json").read_text(encoding="utf-8"))
    meta.update(meta_updates)
    (dst / "spamlingo.json").write_text(json.dumps(meta), encoding="utf-8")
    return dst


def test_with_another_run_averages_the_two_models(tiny_mean_model_dir, tmp_path, capsys):
    cfg = load_config("configs/smoke.yaml", ["eval.per_language_thresholds=false", "eval.threshold_unread_ham=true"])
    a = tmp_path / "a" / "model"
    shutil.copytree(tiny_mean_model_dir, a)
    b = _other_run(tiny_mean_model_dir, tmp_path / "b" / "model", 1.0, mlflow_run_id="run-b")
    before = load_classifier(a).state_dict()
    out = run(a, cfg, 0.5, other_dir=b)
    assert out == tmp_path / "a" / "model-avg0.5"
    averaged = load_classifier(out).state_dict()
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.word_embeddings.weight",
                 "classifier.weight"):  # same vocabulary: every tensor, the embeddings and the head too
        assert torch.allclose(averaged[name], before[name] + 0.5), name
    meta = json.loads((out / "spamlingo.json").read_text(encoding="utf-8"))
    assert meta["mlflow_run_id"] is None and "interpolation" not in meta  # the runs' own record is untouched
    avg = meta["averaged_with"]
    assert avg["alpha"] == 0.5 and avg["other"] == str(b.resolve()) and avg["other_mlflow_run_id"] == "run-b"
    assert avg["same_rows_read"] and avg["interpolated_tensors"] == len(averaged) - len(avg["kept_as_trained"])
    assert "thresholds global 0.5 -> global" in capsys.readouterr().out

    # runs that read different training rows: the threshold on validation alone (no unread-ham pool)
    for d, rows in ((a, {"max_rows_per_source": 10}), (b, {"max_rows_per_source": 20})):
        meta = json.loads((d / "spamlingo.json").read_text(encoding="utf-8"))
        (d / "spamlingo.json").write_text(json.dumps({**meta, "rows_read": rows}), encoding="utf-8")
    out = run(a, cfg, 0.5, out_dir=tmp_path / "ab", other_dir=b)
    assert "chosen on validation alone" in capsys.readouterr().out
    meta = json.loads((out / "spamlingo.json").read_text(encoding="utf-8"))
    assert not meta["averaged_with"]["same_rows_read"] and not meta["thresholds"]["global"].get("pool")


def test_with_another_vocabulary_keeps_this_runs_embeddings_only_if_frozen(tiny_mean_model_dir, tmp_path):
    cfg = load_config("configs/smoke.yaml", ["eval.per_language_thresholds=false"])
    a = tmp_path / "a"
    shutil.copytree(tiny_mean_model_dir, a)
    b = _other_run(tiny_mean_model_dir, tmp_path / "b", 1.0)  # every embedding row moved too
    with (b / "tokenizer.json").open("a", encoding="utf-8") as f:
        f.write("\n")  # another trimmed vocabulary, as far as the byte comparison can tell
    with pytest.raises(InterpolateError, match="different word embeddings for the pieces they share"):
        run(a, cfg, 0.5, other_dir=b)
    # the same rows for the pieces both have (frozen pretrained embeddings): averaged but for the embeddings
    model_b = load_classifier(b)
    with torch.no_grad():
        model_b.get_input_embeddings().weight.copy_(load_classifier(a).get_input_embeddings().weight)
    model_b.save_pretrained(b)
    before = load_classifier(a).state_dict()
    averaged = load_classifier(run(a, cfg, 0.5, other_dir=b)).state_dict()
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(averaged[emb], before[emb])  # this run's rows, pretrained in a real frozen model
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(averaged[layer], before[layer] + 0.5)
    # other text settings, or the same run twice, are refused
    c = _other_run(tiny_mean_model_dir, tmp_path / "c", 0.0,
                   text={**json.loads((a / "spamlingo.json").read_text(encoding="utf-8"))["text"], "max_length": 9})
    with pytest.raises(InterpolateError, match="other text settings"):
        run(a, cfg, 0.5, other_dir=c)
    with pytest.raises(InterpolateError, match="another run than --run"):
        run(a, cfg, 0.5, other_dir=a)
