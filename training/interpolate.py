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

A run trained with `train.wise_alpha` < 1 is already interpolated; `--from-checkpoint` starts from its best
checkpoint as trained instead (`<train.output_dir>/checkpoints/checkpoint-<best step>`, kept by training), so
that α can be chosen again without retraining:

    make interpolate RUN=<run> ALPHA=0.9 ARGS=--from-checkpoint

With `--with <other run>` the other end is another run of the same recipe instead of the pretrained backbone:
a weight average of two fine-tuned models ("model soup", Wortsman et al. 2022), e.g. two seeds. Both start
from the same pretrained weights; their trimmed vocabularies may differ, so the word embeddings stay this
run's, which needs every piece both have to have the same row in both (frozen pretrained embeddings). Each
run's unread training ham may be the other's training rows, so the threshold is chosen on validation alone
unless both read the same rows.
"""

from __future__ import annotations

import dataclasses
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


def other_run_state(model_dir: Path, meta: dict, model, other_dir: Path) -> tuple[dict, dict, bool]:
    """(state dict, meta, same rows read) of another run of the same recipe as `model` (loaded from
    `model_dir`, with `meta`), named as `interpolate` looks weights up; the word embeddings are left out where
    the two vocabularies differ (their rows would not line up), which is allowed only when the pieces both have
    share their rows (`_same_embedding_rows`)."""
    from training.evaluate import read_meta
    from training.modeling import load_classifier

    other = read_meta(other_dir)
    if Path(other_dir).resolve() == model_dir.resolve():
        raise InterpolateError("--with must be another run than --run")
    for key, what in (("backbone", "backbone"), ("text", "text settings")):
        if other.get(key) != meta.get(key):
            raise InterpolateError(f"{other_dir} has other {what} than {model_dir} ({other.get(key)} against "
                                   f"{meta.get(key)}): only runs of the same recipe can be averaged")
    other_model = load_classifier(other_dir, local_files_only=True)
    prefix = f"{other_model.base_model_prefix}."
    state = {name[len(prefix):] if name.startswith(prefix) else name: t
             for name, t in other_model.state_dict().items()}
    if (Path(other_dir) / "tokenizer.json").read_bytes() != (model_dir / "tokenizer.json").read_bytes():
        if not _same_embedding_rows(model_dir, model, other_dir, other_model):
            raise InterpolateError(f"{model_dir} and {other_dir} have different vocabularies and different word "
                                   "embeddings for the pieces they share (trained, or not pretrained): their "
                                   "encoders did not read the same inputs and cannot be averaged")
        state.pop("embeddings.word_embeddings.weight", None)
    return state, other, other.get("rows_read") == meta.get("rows_read")


def _same_embedding_rows(dir_a: Path, model_a, dir_b: Path, model_b) -> bool:
    """Whether every piece both tokenizers have gets the same embedding row in both models: true for two
    trimmings of one pretrained vocabulary with the embeddings frozen (the default recipe)."""
    import torch
    from tokenizers import Tokenizer

    vocab_a = Tokenizer.from_file(str(Path(dir_a) / "tokenizer.json")).get_vocab()
    vocab_b = Tokenizer.from_file(str(Path(dir_b) / "tokenizer.json")).get_vocab()
    shared = sorted(set(vocab_a) & set(vocab_b))
    if not shared:
        return False
    emb_a = model_a.get_input_embeddings().weight
    emb_b = model_b.get_input_embeddings().weight
    rows_a = emb_a[torch.tensor([vocab_a[p] for p in shared])]
    rows_b = emb_b[torch.tensor([vocab_b[p] for p in shared])]
    return bool(torch.equal(rows_a, rows_b))


def load_best_checkpoint(model_dir: Path, meta: dict, model) -> Path:
    """Load into `model` (loaded from the run's model dir) the weights of the run's best checkpoint as trained,
    and return that checkpoint's directory. Training keeps it beside the model dir, and a later run with the same
    train.output_dir replaces it: a checkpoint that differs from the model where training leaves the weights as
    trained (the head, after WiSE-FT; every weight without it) is another run's, and refused."""
    import torch
    from safetensors.torch import load_file

    step = (meta.get("training") or {}).get("best_checkpoint_step")
    if step is None:
        raise InterpolateError(f"{model_dir}/spamlingo.json does not say which checkpoint was best (training."
                               "best_checkpoint_step): --from-checkpoint needs a model dir written by make train")
    ckpt = Path(model_dir).parent / "checkpoints" / f"checkpoint-{step}"
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise InterpolateError(f"{weights} is missing: the run's best checkpoint is not kept beside {model_dir} "
                               "(moved, or removed by a later run with the same train.output_dir)")
    state = load_file(str(weights))
    own = model.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise InterpolateError(f"{ckpt} holds another architecture than {model_dir}: it is not this run's")
    # an interpolated model dir keeps these as trained; one trained with wise_alpha 1 is the checkpoint itself
    same = (meta.get("interpolation") or {}).get("kept_as_trained") or list(own)
    if any(not torch.equal(state[k], own[k]) for k in same):
        raise InterpolateError(f"{ckpt} is not {model_dir}'s checkpoint (its weights differ from the model's "
                               "where training leaves them as trained): a later run with the same "
                               "train.output_dir replaced it")
    model.load_state_dict(state)
    return ckpt


def run(model_dir: Path, cfg, alpha: float, out_dir: Path | None = None, pretrained: dict | None = None,
        other_dir: Path | None = None, from_checkpoint: bool = False) -> Path:
    """Interpolate `model_dir` into `out_dir` (default: `<model_dir>-wise<alpha>`, or `-avg<alpha>` with
    `other_dir`) with the pretrained backbone, or with `other_dir`'s weights (another run of the same recipe),
    choose its thresholds again with `cfg.eval` and return it."""
    from training.evaluate import read_meta, rethreshold
    from training.modeling import load_classifier
    from training.tracking import MODEL_META

    if not 0.0 <= alpha < 1.0:
        raise InterpolateError(f"--alpha must be in [0, 1) (1 would copy the model as trained), got {alpha:g}")
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    model = load_classifier(model_dir, local_files_only=True)
    same_rows = True
    origin = model_dir  # where the weights interpolated here were read from
    if from_checkpoint:
        if other_dir is not None:
            raise InterpolateError("--from-checkpoint and --with cannot be combined: average two runs as written")
        origin = load_best_checkpoint(model_dir, meta, model)
        print(f"starting from {origin}, the run's best checkpoint as trained")
        meta["interpolation"] = None
    if other_dir is not None:
        pretrained, other, same_rows = other_run_state(model_dir, meta, model, Path(other_dir))
        source = f"run {Path(other_dir).resolve()}"
    elif meta.get("interpolation"):
        done = meta["interpolation"]
        raise InterpolateError(f"{model_dir} is already interpolated (alpha {done['alpha']:g}, from "
                               f"{done['from']}): start from a model as trained (train.wise_alpha=1.0)")
    else:
        source = f"the pretrained {meta['backbone']}"
    if origin != model_dir:
        source += " (from the best checkpoint as trained)"
    out_dir = Path(out_dir or f"{model_dir}-{'avg' if other_dir is not None else 'wise'}{alpha:g}")
    if out_dir.resolve() == model_dir.resolve():
        raise InterpolateError("--out must be another directory than the model's")
    if pretrained is None:
        pretrained = pretrained_state(meta["backbone"], cfg.model.cache_dir)
    report = interpolate(model, pretrained, alpha)
    if not report["interpolated"]:
        raise InterpolateError(f"no weight of {model_dir} matches {source} by name and shape: is it the "
                               "backbone this model was trained from?")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(model_dir, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    model.save_pretrained(out_dir)
    # a new model: not the MLflow run's (its metrics are the trained model's); the source is named instead
    if other_dir is None:
        meta.update(mlflow_run_id=None, interpolation=record(alpha, str(origin.resolve()), report))
    else:  # the runs' own WiSE-FT record stays; the average is recorded beside it
        meta.update(mlflow_run_id=None, averaged_with={
            **record(alpha, str(model_dir.resolve()), report), "other": str(Path(other_dir).resolve()),
            "other_mlflow_run_id": other.get("mlflow_run_id"), "same_rows_read": same_rows})
    (out_dir / MODEL_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"interpolated {report['interpolated']} tensors of {model_dir} with {source} at alpha {alpha:g} "
          f"(kept as trained: {', '.join(report['kept'])}) -> {out_dir}")
    if not same_rows and cfg.eval.threshold_unread_ham:
        print("the two runs read different training rows, so one's unread ham is the other's training data: "
              "the threshold is chosen on validation alone (eval.threshold_unread_ham=false)")
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, threshold_unread_ham=False))
    rethreshold(out_dir, cfg, log=False)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = cli_args(argv, __doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--run", default=None, help="MLflow run id or model directory (default: newest finished run)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned model, in [0, 1) "
                        "(0 = the pretrained encoder, or the --with run; default: %(default)s)")
    parser.add_argument("--with", dest="other", default=None, help="another run of the same recipe (run id or "
                        "model directory) to average with, instead of the pretrained backbone")
    parser.add_argument("--from-checkpoint", action="store_true", help="start from the run's best checkpoint as "
                        "trained (kept in <train.output_dir>/checkpoints), not from its model dir, which make train "
                        "interpolated already with train.wise_alpha < 1")
    parser.add_argument("--out", default=None, help="output model directory (default: <model dir>-wise<alpha>, "
                        "or -avg<alpha> with --with)")
    args = parser.parse_args(argv)
    from training.data import DataError
    from training.evaluate import EvaluateError
    from training.tracking import TrackingError, resolve_model_dir

    try:
        cfg = load_config(args.config, args.overrides)
        other = resolve_model_dir(args.other, cfg) if args.other else None
        out = run(resolve_model_dir(args.run, cfg), cfg, args.alpha, Path(args.out) if args.out else None,
                  other_dir=other, from_checkpoint=args.from_checkpoint)
    except (ConfigError, TrackingError, EvaluateError, DataError, InterpolateError) as e:
        fail(str(e))
    print(f"next: make export RUN={out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
