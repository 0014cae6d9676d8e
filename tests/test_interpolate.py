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
                          (["--run", str(tiny_mean_model_dir), "--alpha", "1"], "--alpha must be in [0, 1)")):
        with pytest.raises(SystemExit) as e:
            main(["--config", "configs/smoke.yaml", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err
