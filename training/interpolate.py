"""Weight-space interpolation of a fine-tuned model with its pretrained backbone (WiSE-FT, Wortsman et al.
2022, "Robust fine-tuning of zero-shot models"): every encoder weight becomes

    (1 - alpha) * pretrained + alpha * fine-tuned

so alpha = 1 is the model as trained and smaller values move it back towards the pretrained features, which
transfer to text unlike the training mix (README, "What was tried"). The classifier head and the trimmed
embedding matrix (frozen in the default recipe, and of another shape than the pretrained one) stay as trained.
The result is a new model directory whose thresholds are chosen again on its validation split, ready for
`make export`:

    make interpolate RUN=<run id or model dir> ALPHA=0.5     # -> <model dir>-wise0.5
    make export RUN=<model dir>-wise0.5
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from training.config import ConfigError, cli_args, fail, load_config


class InterpolateError(RuntimeError):
    """A problem with the request (printed as one line, exit 2)."""


def interpolate(model, pretrained: dict, alpha: float) -> dict:
    """In place: each floating-point tensor of `model` that `pretrained` (a base model's state dict, without
    the classifier's prefix such as 'bert.') has under the same name and shape is interpolated. Returns
    {"interpolated": count, "kept": names left as trained}."""
    import torch

    if not 0.0 <= alpha <= 1.0:
        raise InterpolateError(f"alpha must be in [0, 1] (1 = the model as trained), got {alpha:g}")
    prefix = f"{model.base_model_prefix}."
    state = model.state_dict()
    count, kept = 0, []
    with torch.no_grad():
        for name, tensor in state.items():
            source = pretrained.get(name[len(prefix):] if name.startswith(prefix) else name)
            if source is None or source.shape != tensor.shape or not tensor.is_floating_point():
                kept.append(name)
                continue
            tensor.copy_((1.0 - alpha) * source.to(tensor.device, tensor.dtype) + alpha * tensor)
            count += 1
    return {"interpolated": count, "kept": kept}


def record(alpha: float, source: str, report: dict) -> dict:
    """spamlingo.json's "interpolation" (docs/DESIGN.md §3), from `interpolate`'s report: written by
    `make interpolate` and by training with train.wise_alpha < 1."""
    return {"alpha": alpha, "from": source, "interpolated_tensors": report["interpolated"],
            "kept_as_trained": report["kept"]}


def pretrained_state(backbone: str, cache_dir: str) -> dict:
    """The base model's weights as pretrained: the offline multilingual-e5-small, or a hub model."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from training.backbone import E5_SMALL, TINY, convert_e5_small

    if backbone == TINY:
        raise InterpolateError("the tiny backbone is randomly initialised: it has no pretrained weights to "
                               "interpolate with")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        source = convert_e5_small(cache_dir) if backbone == E5_SMALL else backbone
        return AutoModel.from_pretrained(source, local_files_only=backbone == E5_SMALL).state_dict()
    except OSError as e:
        raise InterpolateError(f"cannot load the pretrained weights of {backbone!r}: "
                               f"{str(e).splitlines()[0]}") from None


def run(model_dir: Path, cfg, alpha: float, out_dir: Path | None = None, pretrained: dict | None = None) -> Path:
    """Interpolate `model_dir` into `out_dir` (default: `<model_dir>-wise<alpha>`), choose its thresholds
    again with `cfg.eval` and return it."""
    from training.evaluate import read_meta, rethreshold
    from training.modeling import load_classifier
    from training.tracking import MODEL_META

    if not 0.0 <= alpha < 1.0:
        raise InterpolateError(f"--alpha must be in [0, 1) (1 would copy the model as trained), got {alpha:g}")
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    if meta.get("interpolation"):
        done = meta["interpolation"]
        raise InterpolateError(f"{model_dir} is already interpolated (alpha {done['alpha']:g}, from "
                               f"{done['from']}): start from a model as trained (train.wise_alpha=1.0)")
    out_dir = Path(out_dir or f"{model_dir}-wise{alpha:g}")
    if out_dir.resolve() == model_dir.resolve():
        raise InterpolateError("--out must be another directory than the model's")
    if pretrained is None:
        pretrained = pretrained_state(meta["backbone"], cfg.model.cache_dir)
    model = load_classifier(model_dir, local_files_only=True)
    report = interpolate(model, pretrained, alpha)
    if not report["interpolated"]:
        raise InterpolateError(f"no weight of {model_dir} matches the pretrained {meta['backbone']!r} by name and "
                               "shape: is it the backbone this model was trained from?")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(model_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    model.save_pretrained(out_dir)
    # a new model: not the MLflow run's (its metrics are the trained model's); the source is named instead
    meta.update(mlflow_run_id=None, interpolation=record(alpha, str(model_dir.resolve()), report))
    (out_dir / MODEL_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"interpolated {report['interpolated']} tensors of {model_dir} with the pretrained {meta['backbone']} "
          f"at alpha {alpha:g} (kept as trained: {', '.join(report['kept'])}) -> {out_dir}")
    rethreshold(out_dir, cfg, log=False)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = cli_args(argv, __doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--run", default=None, help="MLflow run id or model directory (default: newest finished run)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned model, in [0, 1) "
                        "(0 = the pretrained encoder; default: %(default)s)")
    parser.add_argument("--out", default=None, help="output model directory (default: <model dir>-wise<alpha>)")
    args = parser.parse_args(argv)
    from training.data import DataError
    from training.evaluate import EvaluateError
    from training.tracking import TrackingError, resolve_model_dir

    try:
        cfg = load_config(args.config, args.overrides)
        out = run(resolve_model_dir(args.run, cfg), cfg, args.alpha, Path(args.out) if args.out else None)
    except (ConfigError, TrackingError, EvaluateError, DataError, InterpolateError) as e:
        fail(str(e))
    print(f"next: make export RUN={out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
