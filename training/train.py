"""Fine-tune the backbone of a config on the prepared data, pick the threshold, evaluate, log to MLflow.

    python -m training.train --config configs/default.yaml [key=value ...]        # make train
    torchrun --nproc_per_node 2 -m training.train --config ...                    # data parallel (DDP)

Steps: prepare the data if needed -> cap the training rows (train.max_rows_per_source, rows_per_source, max_train_rows)
-> augment them (train.augment) -> build the backbone (vocabulary trimmed to the training texts) -> tokenise through serving.text.Encoder
(the same truncation as export and serving) -> Hugging Face Trainer with dynamic padding, length-grouped
batches, class balancing, best checkpoint by validation PR-AUC and early stopping -> on rank 0: thresholds
chosen on the validation split (the global one on all of it, per-language ones where a language has
enough rows: training.metrics.threshold_policy), the model directory (docs/DESIGN.md §3), test evaluation
at those thresholds, MLflow.

Checkpoints go to `<train.output_dir>/checkpoints`; `train.resume=true` continues from the newest complete
one (and the same MLflow run). Under torchrun every rank trains; only rank 0 logs and writes outputs.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from training.config import Config, ConfigError, cli_args, fail, load_config, resolve_path
from training.rows import cap_eval_rows, exclude_sources, ham_pool, row_plan, rows_read
from training.trainer import (
    BalancedSampler,
    EpochSubsetSampler,
    LengthGroupedSampler,
    class_weights,
    compute_metrics,
    ddp_backend,
    last_complete_checkpoint,
    make_trainer_class,
    mlflow_callback,
    progress_callback,
    resolve_precision,
    steps_per_epoch,
)

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
RUN_ID_FILE = "mlflow_run_id.txt"  # lets `train.resume=true` continue the interrupted MLflow run
FORMAT_VERSION = 1
BALANCE_CHOICES = ("weighted_loss", "sampler", "none")


@dataclass
class TrainResult:
    model_dir: Path | None  # None on ranks other than 0
    run_id: str | None
    metrics: dict[str, dict] = field(default_factory=dict)  # {"val": {...}, "test": {...}} overall
    global_step: int = 0
    resumed_from_step: int | None = None  # the checkpoint step a resumed run started from
    samples_per_second: float = 0.0


# ------------------------------------------------------------------------------------------ tokens


def text_settings(cfg: Config):
    from serving.text import NORMALIZER_VERSION, TextSettings

    m = cfg.model
    try:
        return TextSettings(mask_digits=cfg.data.mask_digits, max_length=m.max_length,
                            truncation=m.truncation, head_tokens=m.head_tokens,
                            normalizer_version=NORMALIZER_VERSION)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


class EncodedDataset:
    """Token ids (special tokens included, already truncated) and labels; padding happens per batch."""

    def __init__(self, input_ids: list[list[int]], labels: list[int]):
        self.input_ids = input_ids
        self.labels = labels
        self.lengths = [len(x) for x in input_ids]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def sorted_by_length(self) -> "EncodedDataset":
        # Evaluation order does not change the metrics; sorted, each batch pads to almost nothing.
        order = sorted(range(len(self)), key=self.lengths.__getitem__)
        return EncodedDataset([self.input_ids[i] for i in order], [self.labels[i] for i in order])


def encode(encoder, texts: list[str], labels: list[int], desc: str, show: bool = True) -> EncodedDataset:
    from tqdm.auto import tqdm

    ids: list[list[int]] = []
    chunk = 2048
    for start in tqdm(range(0, len(texts), chunk), desc=f"tokenising {desc}", unit="chunk",
                      disable=not show or len(texts) <= chunk):
        ids.extend(e.input_ids for e in encoder.encode_batch(texts[start:start + chunk]))
    return EncodedDataset(ids, list(labels))


class Collator:
    """Dynamic padding through `Encoder.pad`: each batch is as wide as its longest row."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, features: list[dict]) -> dict:
        import torch

        from serving.text import Encoded

        ids, mask = self.encoder.pad(Encoded(f["input_ids"], False) for f in features)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long)}


# ------------------------------------------------------------------------------------------ model dir


def write_model_dir(directory: Path, model, tokenizer, meta: dict) -> Path:
    """DESIGN §3: save_pretrained files of model and tokenizer plus spamlingo.json."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if not (directory / "tokenizer.json").exists():  # the serving Encoder needs the fast tokenizer file
        tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "spamlingo.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    return directory


# ------------------------------------------------------------------------------------------ the run


def _check(cfg: Config) -> None:
    t = cfg.train
    if t.class_balance not in BALANCE_CHOICES:
        raise ConfigError(f"train.class_balance must be one of {', '.join(BALANCE_CHOICES)}, got {t.class_balance!r}")
    for key in ("batch_size", "eval_batch_size", "grad_accum", "logging_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError("train.epochs must be > 0 (or set train.max_steps)")
    if t.eval_every < 0 or t.early_stopping_patience < 0:
        raise ConfigError("train.eval_every and train.early_stopping_patience must be >= 0")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if not 0 < t.layer_lr_decay <= 1:
        raise ConfigError(f"train.layer_lr_decay must be in (0, 1] (1 = one learning rate), got {t.layer_lr_decay}")
    if not 0 <= t.wise_alpha <= 1:
        raise ConfigError(f"train.wise_alpha must be in [0, 1] (1 = the model as trained), got {t.wise_alpha}")
    if t.fresh_rows_per_epoch and (t.max_train_rows or t.class_balance == "sampler"):
        raise ConfigError("train.fresh_rows_per_epoch picks each epoch's rows per source: it cannot be combined "
                          "with train.max_train_rows or train.class_balance=sampler")
    if t.fresh_rows_per_epoch and t.augment:
        raise ConfigError("train.fresh_rows_per_epoch picks each epoch's rows per source: it cannot be combined "
                          "with train.augment")
    from training.augment import check as check_augment

    check_augment(t.augment)
    corpora = sorted(cfg.data.corpora)
    unknown = sorted(set(t.rows_per_source) - set(corpora))
    if unknown:  # a typo would otherwise train on every row of the source meant (a corpus turned off: no rows, no cap)
        raise ConfigError(f"train.rows_per_source: no corpus {', '.join(unknown)} in data.corpora "
                          f"({', '.join(corpora)})")
    from training.evaluate import check_eval_config
    from training.metrics import THRESHOLD_RULES

    # checked now rather than after an hour of training
    if cfg.eval.threshold_rule not in THRESHOLD_RULES:
        raise ConfigError(f"eval.threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, "
                          f"got {cfg.eval.threshold_rule!r}")
    check_eval_config(cfg)  # the validation and test passes after training use eval.batch_size
    if not 0.0 <= cfg.eval.target_fpr < 1.0:
        raise ConfigError(f"eval.target_fpr must be in [0, 1), got {cfg.eval.target_fpr}")
    text_settings(cfg)


def train(cfg: Config, config_path: str | Path | None = None) -> TrainResult:
    """Run one training job as the config says; under torchrun call it on every rank."""
    import torch
    from accelerate import PartialState

    _check(cfg)
    precision, device = resolve_precision(cfg.train.precision)
    on_gpu = torch.cuda.is_available()
    # The process group (torchrun) exists from here on, so rank 0 can prepare data while the others wait.
    state = PartialState(cpu=not on_gpu, backend=ddp_backend())
    out_dir = resolve_path(cfg.train.output_dir)
    ckpt_dir = out_dir / CHECKPOINTS
    resume_from = last_complete_checkpoint(ckpt_dir) if cfg.train.resume else None
    if state.is_main_process:
        if cfg.train.resume and resume_from is None:
            print(f"train.resume=true but {ckpt_dir} holds no complete checkpoint: starting from scratch")
        if resume_from is None and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)  # a fresh run must not mix its checkpoints with an older run's
    state.wait_for_everyone()

    if not state.is_main_process:
        return _fit(cfg, state, precision, device, resume_from, run_id=None)

    from training import tracking

    # train.resume continues the interrupted MLflow run too (its curves go on from the checkpoint step).
    previous = (out_dir / RUN_ID_FILE).read_text().strip() if (out_dir / RUN_ID_FILE).exists() else ""
    resume_run = previous if resume_from is not None and previous else None
    with tracking.start_run(cfg, kind="transformer", config_path=config_path, run_id=resume_run) as run:
        run_id = run.info.run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RUN_ID_FILE).write_text(run_id + "\n")
        result = _fit(cfg, state, precision, device, resume_from, run_id=run_id)
    if cfg.tracking.register_as:
        reg = tracking.register(run_id, cfg.tracking.register_as, cfg=cfg)
        print(f"registered {reg['source']} as {reg['name']} version {reg['version']}")
    return result


def build_trainer(cfg: Config, model, encoder, train_set: EncodedDataset, val_set: EncodedDataset,
                  ckpt_dir: Path, precision: str, world_size: int, log_to_mlflow: bool,
                  epoch_subsets: list[list[int]] | None = None):
    """The Hugging Face Trainer for this config: evaluation and checkpoints every `train.eval_every`
    steps (0 = once per epoch, and always at the last step), best checkpoint by validation PR-AUC.
    `epoch_subsets`: the rows of `train_set` each epoch reads (train.fresh_rows_per_epoch)."""
    import torch
    from transformers import EarlyStoppingCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    t = cfg.train
    on_gpu = torch.cuda.is_available()
    epoch_rows = len(epoch_subsets[0]) if epoch_subsets else len(train_set)
    per_epoch = steps_per_epoch(epoch_rows, t.batch_size, t.grad_accum, world_size)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * per_epoch)
    every = t.eval_every or min(per_epoch, total)
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        eval_strategy="steps",
        eval_steps=every,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,  # the best and the newest (for resuming)
        load_best_model_at_end=True,
        metric_for_best_model="pr_auc",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=min(t.logging_steps, every),  # at least one loss point per validation pass
        logging_first_step=True,
        report_to="none",  # MLflow logging is ours (rank 0, DESIGN §4 names)
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not on_gpu,
        ddp_backend=ddp_backend(),
        ddp_find_unused_parameters=False,  # every trainable weight takes part in each step
        dataloader_num_workers=t.num_workers,
        remove_unused_columns=False,  # our collator builds the model inputs
        disable_tqdm=True,
    )
    if epoch_subsets:
        sampler = EpochSubsetSampler(epoch_subsets, train_set.lengths if t.group_by_length else None,
                                     t.batch_size * t.grad_accum, t.seed)
    elif t.class_balance == "sampler":
        if t.group_by_length:
            print("train.class_balance=sampler: batches are drawn by class weight, not grouped by length")
        sampler = BalancedSampler(train_set.labels, t.seed)
    elif t.group_by_length:
        sampler = LengthGroupedSampler(train_set.lengths, t.batch_size * t.grad_accum, t.seed)
    else:
        sampler = None  # the Trainer's seeded random sampler
    callbacks = [progress_callback(world_size)]
    if log_to_mlflow:
        callbacks.append(mlflow_callback())
    if t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    trainer = make_trainer_class()(
        model=model,
        args=args,
        data_collator=Collator(encoder),
        train_dataset=train_set,
        eval_dataset=val_set,
        # no processing_class: the tokenizer is rebuilt from the config (and the same training rows) on
        # resume, so checkpoints need not carry a copy of it; the model directory gets it
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        loss_weights=class_weights(train_set.labels) if t.class_balance == "weighted_loss" else None,
        train_sampler=sampler,
        layer_lr_decay=t.layer_lr_decay,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _fit(cfg: Config, state, precision: str, device: str, resume_from: Path | None, run_id: str | None,
         ) -> TrainResult:
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from serving.text import Encoder
    from training.augment import augment_rows
    from training.backbone import load_backbone
    from training.data import ensure_prepared, load_splits

    t = cfg.train
    main = state.is_main_process
    world = state.num_processes
    hf_logging.disable_progress_bar()  # "Writing model shards" at every checkpoint; our bars stay
    set_seed(t.seed)
    if main:
        print(f"device: {device}, precision {precision}, {world} process(es)", flush=True)

    with state.main_process_first():  # rank 0 prepares; the others then find it prepared
        data_dir = ensure_prepared(cfg)
    splits = exclude_sources(load_splits(cfg), t.exclude_sources)
    read = rows_read(cfg, splits["train"], world)  # the rows this run reads, recorded by _finish
    train_rows, epoch_subsets = row_plan(read, splits["train"])
    if epoch_subsets is None:
        train_rows = augment_rows(train_rows, t.augment, t.seed)
    val_rows = splits["validation"]
    val_during = cap_eval_rows(val_rows, t.max_eval_rows, t.seed)
    if len(train_rows) == 0 or len(val_during) == 0:
        raise ConfigError(f"{data_dir}: the training or validation split is empty")

    with state.main_process_first():  # a backbone conversion into model.cache_dir happens once
        model, tokenizer, info = load_backbone(cfg.model, corpus_texts=list(train_rows["text"]))
    # WiSE-FT's other end: the encoder as loaded (a resumed run loads its checkpoint later, in trainer.train)
    initial = ({k: v.detach().clone() for k, v in model.base_model.state_dict().items()}
               if main and t.wise_alpha < 1 else None)
    encoder = Encoder(tokenizer.backend_tokenizer, text_settings(cfg))
    train_set = encode(encoder, list(train_rows["text"]), list(train_rows["label"]), "train", main)
    val_set = encode(encoder, list(val_during["text"]), list(val_during["label"]), "validation",
                     main).sorted_by_length()

    probe = None
    if t.linear_probe and resume_from is None:  # a resumed run's head comes from its checkpoint
        from training.modeling import linear_probe

        first = epoch_subsets[0] if epoch_subsets else range(len(train_set))  # the rows of the first epoch
        probe = linear_probe(model, encoder, [train_set.input_ids[i] for i in first],
                             [train_set.labels[i] for i in first], C=t.linear_probe_C,
                             class_weight="balanced" if t.class_balance != "none" else None,
                             batch_size=cfg.eval.batch_size, seed=t.seed)
        if main:
            print(f"linear probe on frozen mean-pooled features: {probe['rows']} rows, training accuracy "
                  f"{probe['train_accuracy']:.4f} ({probe['seconds']:.0f} s); fine-tuning starts from it",
                  flush=True)
    if main:
        import mlflow

        from training import tracking

        per_epoch_rows = len(epoch_subsets[0]) if epoch_subsets else len(train_set)
        with tracking.uninterrupted():
            if probe:
                mlflow.log_metrics({"lp/train_accuracy": probe["train_accuracy"], "lp/seconds": probe["seconds"]})
            tracking.tag_data(data_dir)
            mlflow.set_tags({"device": device, "precision": precision, "world_size": str(world),
                             "backbone": cfg.model.backbone})
            mlflow.log_metrics({"data/train_rows": per_epoch_rows, "data/train_rows_distinct": len(train_set),
                                "data/val_rows_during_training": len(val_set),
                                "data/val_rows": len(val_rows), "model/parameters": info["parameters"],
                                "model/trainable_parameters": info["trainable_parameters"]})
        mlflow.log_dict(info, "backbone.json")
        spam = sum(train_set.labels)
        fresh = (f" per epoch, {len(train_set)} distinct over {len(epoch_subsets)} epochs (fresh_rows_per_epoch)"
                 if epoch_subsets else "")
        print(f"train rows {per_epoch_rows}{fresh} ({spam} spam), validation rows {len(val_set)} during training "
              f"/ {len(val_rows)} for the threshold; backbone {cfg.model.backbone}: "
              f"{info['trainable_parameters']:,} of {info['parameters']:,} parameters trained", flush=True)

    trainer = build_trainer(cfg, model, encoder, train_set, val_set,
                            resolve_path(t.output_dir) / CHECKPOINTS, precision, world, log_to_mlflow=main,
                            epoch_subsets=epoch_subsets)
    resumed_step = _checkpoint_step(resume_from) if resume_from is not None else None
    if main and resume_from is not None:
        print(f"resuming from {resume_from} (step {resumed_step})", flush=True)
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    progress = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "samples_per_second"))
    sps = float(out.metrics.get("train_samples_per_second", progress.samples_per_second))
    result = TrainResult(None, run_id, global_step=trainer.state.global_step, resumed_from_step=resumed_step,
                         samples_per_second=sps)
    if not main:
        return result
    import mlflow

    from training.tracking import uninterrupted

    with uninterrupted():
        mlflow.log_metrics({"train/samples_per_second": sps, "train/runtime_s": float(out.metrics["train_runtime"]),
                            "train/steps": trainer.state.global_step,
                            "train/best_val_pr_auc": float(trainer.state.best_metric or float("nan"))})
    print(f"trained {trainer.state.global_step} steps at {sps:.1f} samples/s; best checkpoint "
          f"{trainer.state.best_model_checkpoint} (validation PR-AUC {trainer.state.best_metric})", flush=True)
    interpolation = None
    if initial is not None:
        from training.interpolate import interpolate, record

        report = interpolate(trainer.model, initial, t.wise_alpha)  # the best checkpoint, in place
        interpolation = record(t.wise_alpha, f"training (train.wise_alpha), {cfg.model.backbone}", report)
        with uninterrupted():
            mlflow.log_metric("train/wise_interpolated_tensors", report["interpolated"])
        print(f"WiSE-FT: {report['interpolated']} encoder tensors interpolated with the backbone as loaded at alpha "
              f"{t.wise_alpha:g} (kept as trained: {', '.join(report['kept'])})", flush=True)
    result.model_dir, result.metrics = _finish(cfg, trainer, tokenizer, encoder, info, data_dir, splits, run_id,
                                               read, interpolation)
    return result


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _finish(cfg: Config, trainer, tokenizer, encoder, info: dict, data_dir: Path, splits, run_id: str,
            read: dict, interpolation: dict | None = None) -> tuple[Path, dict]:
    """Rank 0, inside the MLflow run: the threshold policy on the validation split (global + per
    language), the model directory, test evaluation of the saved directory at the same policy, artifacts.
    `read`: the run's rows_read (its unread ham joins validation); `interpolation`: what WiSE-FT did to
    trainer.model; both kept in spamlingo.json."""
    import mlflow

    from serving import thresholds as TH
    from training import tracking
    from training.evaluate import evaluate_model_dir, predict_proba, threshold_lines
    from training.metrics import ThresholdWarning, balance_text, config_threshold_policy, fmt, spread_text

    out_dir = resolve_path(cfg.train.output_dir)
    model = trainer.model  # the best checkpoint (load_best_model_at_end), interpolated if train.wise_alpha < 1
    val = splits["validation"]
    y_val = list(val["label"])
    p_val = predict_proba(model, encoder, list(val["text"]), cfg.eval.batch_size, cfg.data.mask_digits,
                          desc="validation split")
    e = cfg.eval
    pool = ham_pool(cfg, splits["train"], val["source"], lambda texts: predict_proba(
        model, encoder, texts, e.batch_size, cfg.data.mask_digits, desc="unread training ham"), read)
    with warnings.catch_warnings():  # its note is printed below and kept in spamlingo.json
        warnings.simplefilter("ignore", ThresholdWarning)
        policy = config_threshold_policy(e, y_val, p_val, list(val["lang"]), pool)
    choice = policy["global"]
    threshold = policy["default"]

    print(f"threshold {threshold:.6g} ({e.threshold_rule}, target FPR {e.target_fpr:g}): validation "
          f"precision {fmt(choice['val_precision'])}, recall {fmt(choice['val_recall'])}, FPR {fmt(choice['val_fpr'])}"
          + (f"; {choice['note']}" if choice["note"] else ""), flush=True)
    for line in (balance_text(choice), spread_text(choice)):
        if line:
            print(f"  {line}", flush=True)
    for lang, info_l in policy["languages"].items():
        print(f"  lang {lang}: threshold {info_l['threshold']:.6g} ({info_l['scope']}; {info_l['ham']} ham, "
              f"{info_l['spam']} spam in validation{' and unread ham' if pool else ''}; precision "
              f"{fmt(info_l['val_precision'])}, recall "
              f"{fmt(info_l['val_recall'])}, FPR {fmt(info_l['val_fpr'])}): {info_l['reason']}", flush=True)
    groups = {"source": list(val["source"]), "lang": list(val["lang"])}
    val_thresholds = TH.thresholds_for(policy, groups["lang"])[0]
    # validation: metrics and metrics_val.md; the plots are drawn for the test split
    val_grouped = tracking.log_evaluation(y_val, p_val, val_thresholds, groups, "validation", plots=False,
                                          title=f"{cfg.model.backbone} validation", out_dir=out_dir / "eval",
                                          policy=policy, extra_text=threshold_lines(policy, groups["lang"]))

    meta = {
        "format_version": FORMAT_VERSION,
        "labels": ["ham", "spam"],
        "text": text_settings(cfg).to_dict(),
        "threshold": threshold,  # the global one (policy["default"]), for readers of format 1 before "thresholds"
        "thresholds": policy,
        "threshold_rule": cfg.eval.threshold_rule,
        "target_fpr": cfg.eval.target_fpr,
        "threshold_choice": choice,
        "rows_read": read,  # the caps that decided the training rows (their complement: the unread ham)
        "backbone": cfg.model.backbone,
        "mlflow_run_id": run_id,
        "data_dir": str(data_dir),
        "data_hash": tracking.data_hash_of(data_dir),
        "metrics": {"val": _overall(val_grouped)},
        "training": {"global_step": trainer.state.global_step, "best_checkpoint_step":
                     trainer.state.best_global_step, "best_val_pr_auc_during_training": trainer.state.best_metric},
        "backbone_info": info,  # parameters, layers kept, vocabulary trimming report, frozen parts
    }
    if interpolation:
        meta["interpolation"] = interpolation
    model_dir = write_model_dir(out_dir / MODEL_DIR, model, tokenizer, meta)

    # The test split scores the directory as written (what export and serving will load), not the
    # in-memory model; its thresholds (per row, by language) came from validation only.
    if cfg.train.evaluate_test:
        test = evaluate_model_dir(model_dir, cfg, "test", log=False)
        rows = splits["test"]
        test_grouped = tracking.log_evaluation(test.labels, test.p_spam, test.thresholds,
                                               {"source": list(rows["source"]), "lang": list(rows["lang"])},
                                               "test", title=f"{cfg.model.backbone} test",
                                               out_dir=out_dir / "eval", policy=policy,
                                               extra_text=threshold_lines(policy, list(rows["lang"])))
        meta["metrics"]["test"] = _overall(test_grouped)
    (model_dir / "spamlingo.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    size_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    with tracking.uninterrupted():
        mlflow.log_metric("model/size_mb", size_mb)
    mlflow.log_artifacts(str(model_dir), MODEL_DIR)
    if cfg.data.mix_card and resolve_path(cfg.data.mix_card).exists():
        mlflow.log_artifact(str(resolve_path(cfg.data.mix_card)))
    from training.data import FEEDBACK_CARD

    if (data_dir / FEEDBACK_CARD).exists():  # the reports' card (training/feedback_data.py)
        mlflow.log_artifact(str(data_dir / FEEDBACK_CARD))
    return model_dir, meta["metrics"]


def _overall(grouped: dict) -> dict:
    from training.metrics import METRIC_NAMES

    def clean(v):  # NaN (a metric undefined on this split) is written as null: strict JSON
        return None if isinstance(v, float) and math.isnan(v) else v

    return {k: clean(grouped["overall"][k]) for k in METRIC_NAMES + ("support", "positives")}


# ------------------------------------------------------------------------------------------ command line


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler, torchrun stopping its workers) ends the MLflow run KILLED rather than
    leaving it RUNNING; the newest complete checkpoint stays for `train.resume=true`."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = cli_args(argv, "Fine-tune a backbone, choose the threshold on validation, evaluate on test, "
                            "log everything to MLflow.")
    args = parser.parse_args(argv)
    _interrupt_on_sigterm()
    from training.backbone import BackboneError
    from training.data import DataError
    from training.tracking import TrackingError

    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, config_path=args.config)
    except (ConfigError, DataError, BackboneError, TrackingError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted: rerun with train.resume=true to continue from the newest checkpoint",
              file=sys.stderr)
        return 130
    if result.model_dir is not None:
        print(f"model: {result.model_dir}  (MLflow run {result.run_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
