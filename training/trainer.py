"""The Hugging Face Trainer as training/train.py uses it: seeded, resumable training samplers, class-weighted
cross-entropy, layer-wise learning-rate decay, the precision and DDP backend for the machine, the newest
complete checkpoint, and the progress-bar and MLflow callbacks.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from training.config import ConfigError

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


# ------------------------------------------------------------------------------------------ samplers


class _EpochSampler:
    """Seeded from (seed, epoch): every DDP rank draws the same order, and a resumed run replays the
    order of the epoch it stopped in (the Trainer calls set_epoch, then skips the batches already seen)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self):
        import torch

        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __len__(self) -> int:
        return self.n


class LengthGroupedSampler(_EpochSampler):
    """Shuffled, then sorted by length inside mega-batches of 50 batches: little padding, still random."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(len(lengths), seed)
        self.lengths = lengths
        self.batch_size = batch_size

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=self._generator()))


class EpochSubsetSampler(_EpochSampler):
    """Epoch e reads only the rows `subsets[e]` (train.fresh_rows_per_epoch: training/rows.epoch_row_sets),
    length-grouped like LengthGroupedSampler when `lengths` is given, else shuffled."""

    def __init__(self, subsets: list[list[int]], lengths: list[int] | None, batch_size: int, seed: int):
        if len({len(s) for s in subsets}) != 1:
            raise ValueError("every epoch's subset must hold the same number of rows")
        super().__init__(len(subsets[0]), seed)
        self.subsets = subsets
        self.lengths = lengths
        self.batch_size = batch_size

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        rows = self.subsets[self.epoch % len(self.subsets)]
        if self.lengths is None:
            order = torch.randperm(len(rows), generator=self._generator()).tolist()
        else:
            order = get_length_grouped_indices([self.lengths[i] for i in rows], self.batch_size,
                                               generator=self._generator())
        return iter(rows[j] for j in order)


class BalancedSampler(_EpochSampler):
    """Draws rows with replacement, each class with equal total probability (train.class_balance=sampler)."""

    def __init__(self, labels: list[int], seed: int):
        import torch

        super().__init__(len(labels), seed)
        y = torch.tensor(labels)
        counts = torch.bincount(y, minlength=2).clamp(min=1).double()
        self.weights = (1.0 / counts)[y]

    def __iter__(self):
        import torch

        return iter(torch.multinomial(self.weights, self.n, replacement=True,
                                      generator=self._generator()).tolist())


def class_weights(labels: list[int]) -> list[float]:
    """n / (2 * n_c): the rarer class weighs more; both classes together weigh as much as unweighted."""
    n = len(labels)
    counts = [max(1, sum(1 for y in labels if y == c)) for c in (0, 1)]
    return [n / (2 * c) for c in counts]


# ------------------------------------------------------------------------------------------ trainer


def layer_lr_groups(model, lr: float, decay: float, weight_decay: float, decay_names: set[str]) -> list[dict]:
    """Optimizer parameter groups with layer-wise learning-rate decay: a parameter of encoder layer k
    (`…layer.<k>.…`, 0-based, of L) learns at lr x decay^(L - k), the embeddings at lr x decay^(L + 1), the rest
    (pooling, head) at lr. Weight decay as the Trainer sets it (`decay_names`; none on biases and norms)."""
    num_layers = int(model.config.num_hidden_layers)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        found = re.search(r"\.layers?\.(\d+)\.", name)
        depth = int(found.group(1)) + 1 if found else (0 if "embeddings" in name else num_layers + 1)
        key = (depth, name in decay_names)
        g = groups.setdefault(key, {"params": [], "lr": lr * decay ** (num_layers + 1 - depth),
                                    "weight_decay": weight_decay if key[1] else 0.0})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def make_trainer_class():
    import torch
    from transformers import Trainer

    class SpamTrainer(Trainer):
        """Trainer with class-weighted cross-entropy and our own (seeded, resumable) training samplers."""

        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

        def __init__(self, *a, loss_weights=None, train_sampler=None, layer_lr_decay=1.0, **kw):
            self.layer_lr_decay = layer_lr_decay
            super().__init__(*a, **kw)
            self.loss_weights = torch.tensor(loss_weights, dtype=torch.float32) if loss_weights else None
            self.train_sampler = train_sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.logits.float()
            weight = self.loss_weights.to(logits.device) if self.loss_weights is not None else None
            loss = torch.nn.functional.cross_entropy(logits, labels, weight=weight)
            return (loss, outputs) if return_outputs else loss

        def _get_train_sampler(self, train_dataset=None):
            return self.train_sampler or super()._get_train_sampler(train_dataset)

        def create_optimizer(self, model=None):
            decay = self.layer_lr_decay
            if self.optimizer is not None or decay == 1.0:
                return super().create_optimizer(model)
            opt_model = self.model if model is None else model
            groups = layer_lr_groups(opt_model, self.args.learning_rate, decay, self.args.weight_decay,
                                     set(self.get_decay_parameter_names(opt_model)))
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(groups, **kwargs)
            return self.optimizer

    return SpamTrainer


def resolve_precision(choice: str) -> tuple[str, str]:
    """(precision, device description): auto = bf16 on a GPU that supports it, else fp16; fp32 on CPU."""
    import torch

    if choice not in PRECISION_CHOICES:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISION_CHOICES)}, got {choice!r}")
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
        if choice == "auto":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if choice == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16 but this GPU does not support bf16 (use fp16 or auto)")
        return choice, device
    device = f"cpu ({torch.get_num_threads()} threads)"
    if choice == "fp16":
        raise ConfigError("train.precision=fp16 needs a GPU (use auto, fp32 or bf16 on a CPU)")
    return ("fp32" if choice == "auto" else choice), device


def ddp_backend() -> str | None:
    """gloo for several CPU processes (torchrun without GPUs); the default (nccl) on GPUs; none alone."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return None
    return "gloo"


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint-N whose trainer_state.json was written (the Trainer writes it last, so a
    checkpoint cut short by a kill is skipped rather than resumed from)."""
    if not directory.is_dir():
        return None
    steps = []
    for p in directory.iterdir():
        name = p.name
        if name.startswith("checkpoint-") and name[11:].isdigit() and (p / "trainer_state.json").exists():
            steps.append((int(name[11:]), p))
    return max(steps)[1] if steps else None


def progress_callback(world_size: int):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One bar for training with samples/s and the loss, one per validation pass (rank 0 only)."""

        def __init__(self):
            self.bar = None
            self.eval_bar = None
            self.start = 0.0
            self.start_step = 0
            self.samples_per_second = 0.0
            self.loss = None

        def on_train_begin(self, args, state, control, **kw):
            self.start, self.start_step = time.perf_counter(), state.global_step
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training",
                                unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            done = state.global_step - self.start_step
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
            self.samples_per_second = done * per_step / elapsed
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
                post = {"samples/s": f"{self.samples_per_second:.1f}"}
                if self.loss is not None:
                    post["loss"] = f"{self.loss:.4f}"
                self.bar.set_postfix(post, refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss = logs["loss"]

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
            if not state.is_world_process_zero:
                return
            if self.eval_bar is None:
                total = len(eval_dataloader) if eval_dataloader is not None else None
                self.eval_bar = tqdm(total=total, desc="validation", unit="batch", leave=False,
                                     dynamic_ncols=True)
            self.eval_bar.update(1)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None
            if state.is_world_process_zero and metrics and self.bar is not None:
                self.bar.write(f"step {state.global_step}: validation PR-AUC {metrics.get('eval_pr_auc', float('nan')):.4f}"
                               f", loss {metrics.get('eval_loss', float('nan')):.4f}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def mlflow_callback():
    import mlflow
    from transformers import TrainerCallback

    from training.tracking import uninterrupted

    class Curves(TrainerCallback):
        """Training curves into the active MLflow run: train/loss, train/learning_rate, val/pr_auc, ...
        Each write finishes before a Ctrl-C or SIGTERM is raised (tracking.uninterrupted)."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            out = {f"train/{k}": float(v) for k, v in logs.items()
                   if k in ("loss", "learning_rate", "grad_norm") and v is not None}
            if out:
                with uninterrupted():
                    mlflow.log_metrics(out, step=state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not state.is_world_process_zero or not metrics:
                return
            out = {f"val/{k[5:]}": float(v) for k, v in metrics.items()
                   if k.startswith("eval_") and k[5:] in ("pr_auc", "roc_auc", "loss")}
            with uninterrupted():
                mlflow.log_metrics(out, step=state.global_step)

    return Curves()


def compute_metrics(eval_pred) -> dict:
    import numpy as np

    from training.metrics import binary_metrics

    logits = np.asarray(eval_pred.predictions, dtype=np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    probs = p[:, 1] / p.sum(axis=1)
    m = binary_metrics(np.asarray(eval_pred.label_ids), probs, 0.5)
    # NaN (one class in the capped validation rows) never counts as a new best checkpoint
    return {k: m[k] for k in ("pr_auc", "roc_auc", "f1")}


def steps_per_epoch(n_rows: int, batch: int, accum: int, world: int) -> int:
    batches = math.ceil(n_rows / (batch * world))  # per rank: accelerate pads the last round
    return max(batches // accum + int(batches % accum > 0), 1)
