"""Evaluate a trained model directory: test metrics overall, per source and per language, logged to MLflow.

    python -m training.evaluate --config configs/default.yaml                 # newest finished run, test split
    python -m training.evaluate --config configs/default.yaml --run <run id | model dir>
    python -m training.evaluate --data my_messages.csv [--text-column body --label-column is_spam]

The thresholds are the model's policy in spamlingo.json (`thresholds`: global plus per-language ones, chosen
on validation at training time; an older model's single `threshold` otherwise), applied per row by the
row's language tag as serving does (serving/thresholds.py): the test split never picks them. Text goes
through serving.text exactly as in serving (normalize with the model's mask_digits, Encoder with its
TextSettings). Test-split results are logged into the model's own MLflow run
(or a new `eval` run when the model has none in this store); `--data` results go to a new `eval` run
linked to the model run, with metric names `data/<scope>/<metric>`. Beside the tables, an HTML error report
(training/error_report.py: false positives and negatives with the spans that made them) is written to
eval/error_report.html next to the model directory and logged to the same run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from serving import thresholds as TH
from serving.text import Encoder, TextSettings, normalize
from training.config import Config, ConfigError, cli_args, fail, load_config
from training.tracking import MODEL_META, TrackingError


class EvaluateError(Exception):
    """A user-facing evaluation problem (broken model directory, missing split): one clear line."""


@dataclass
class EvalResult:
    grouped: dict  # metrics.grouped_metrics: {"overall": {...}, "source=...": {...}, "lang=...": {...}}
    threshold: float  # the global threshold (policy["default"])
    split: str  # test | validation | data
    table: str  # markdown
    mlflow_run_id: str | None  # the run the results were logged to (None: not logged)
    p_spam: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    labels: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, dtype=int))
    policy: dict = field(repr=False, default_factory=dict)  # serving.thresholds policy applied
    thresholds: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))  # per row
    scopes: list = field(repr=False, default_factory=list)  # per row: "lang:<tag>" | "global"


# ------------------------------------------------------------------------------------------ model


def read_meta(model_dir: str | Path) -> dict:
    """spamlingo.json of a model directory (DESIGN §3), checked for the keys evaluation needs."""
    path = Path(model_dir) / MODEL_META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise EvaluateError(f"{model_dir} is not a trained model directory (no {MODEL_META})") from None
    except ValueError as e:
        raise EvaluateError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in ("text", "threshold") if k not in meta]
    if missing:
        raise EvaluateError(f"{path}: missing {', '.join(missing)}")
    try:
        TH.from_manifest(meta)
    except (TypeError, ValueError) as e:
        raise EvaluateError(f"{path}: invalid thresholds: {e}") from None
    return meta


def model_policy(meta: dict) -> dict:
    """The threshold policy of a model's spamlingo.json (a single-threshold one for older models)."""
    return TH.from_manifest(meta)


def threshold_lines(policy: dict, langs) -> str:
    """Which threshold applied to each language of the scored rows: a markdown table."""
    counts: dict[str, int] = {}
    for x in langs:
        counts[str(x)] = counts.get(str(x), 0) + 1
    notes = policy.get("languages") or {}
    lines = ["| lang | rows | threshold | scope | why |", "|---|---:|---:|---|---|"]
    for lang in sorted(counts):
        t, scope = TH.threshold_for(policy, lang)
        why = (notes.get(lang) or {}).get("reason") or ("not in validation" if notes else "single threshold")
        lines.append(f"| {lang} | {counts[lang]} | {t:.6g} | {scope} | {why} |")
    return "\n".join(lines) + "\n"


def load_model(model_dir: str | Path, device: str | None = None):
    """(model, encoder, meta): the transformers classifier in eval mode on `device` (default: cuda when
    available), the serving Encoder over the model's tokenizer.json with its TextSettings, spamlingo.json."""
    import torch

    from training.modeling import load_classifier

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    try:
        settings = TextSettings.from_dict(meta["text"])
        encoder = Encoder.from_file(str(model_dir / "tokenizer.json"), settings)
    except Exception as e:  # a missing file is OSError, a bad tokenizer.json a bare Exception from tokenizers
        raise EvaluateError(f"{model_dir}: cannot build the text encoder ({e})") from None
    try:
        model = load_classifier(model_dir)
    except (OSError, ValueError) as e:
        raise EvaluateError(f"{model_dir}: cannot load the model ({e})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, encoder, meta


def predict_proba(model, encoder: Encoder, texts: Sequence[str], batch_size: int = 64, mask_digits: bool = True,
                  progress: bool = True, desc: str = "scoring") -> np.ndarray:
    """Spam probabilities (softmax(logits)[:, 1], float64) of raw or normalised texts, in input order.

    Texts are normalised (idempotent on already prepared text), encoded by the serving Encoder, and run
    in batches of similar length, longest first (so running out of memory shows at once), with dynamic
    padding. The model's train/eval mode is restored afterwards, so the Trainer can call this too.
    """
    import torch
    from tqdm.auto import tqdm

    n = len(texts)
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out
    encoded = encoder.encode_batch([normalize(t, mask_digits) for t in texts])
    order = np.argsort([-len(e.input_ids) for e in encoded], kind="stable")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, unit="msg", disable=not progress,
                                          leave=False, file=sys.stderr) as bar:
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                ids, mask = encoder.pad(encoded[i] for i in idx)
                logits = model(input_ids=torch.from_numpy(ids).to(device),
                               attention_mask=torch.from_numpy(mask).to(device)).logits
                logits = logits.detach().to(torch.float64).cpu().numpy()
                # softmax(l)[1] for two classes, stable for large logit gaps
                out[idx] = 1.0 / (1.0 + np.exp(np.clip(logits[:, 0] - logits[:, 1], -700, 700)))
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------ data


def _model_data(model_dir: Path, meta: dict, cfg: Config):
    """(the DatasetDict, its directory) of the data the model was trained on (spamlingo.json's data_dir), else
    cfg's prepared data: loaded once for a caller that reads several splits (`_split_rows(..., data=)`)."""
    from datasets import load_from_disk

    data_dir = Path(meta.get("data_dir") or "")
    if meta.get("data_dir") and (data_dir / "dataset").is_dir():
        dd = load_from_disk(str(data_dir / "dataset"))
    else:
        from training.data import ensure_prepared, load_splits
        from training.tracking import data_hash_of

        data_dir = ensure_prepared(cfg)
        dd = load_splits(cfg)
        if meta.get("data_hash") and data_hash_of(data_dir) != meta["data_hash"]:
            print(f"warning: {model_dir} was trained on data {meta['data_hash'][:12]} "
                  f"({meta.get('data_dir')}), not found here; evaluating on {data_dir} "
                  f"({(data_hash_of(data_dir) or '?')[:12]}) instead", file=sys.stderr)
    return dd, data_dir


def _split_rows(model_dir: Path, meta: dict, cfg: Config, split: str, data=None):
    """The split of the data the model was trained on (`_model_data`, or `data` when already loaded)."""
    dd, data_dir = data or _model_data(model_dir, meta, cfg)
    if split not in dd:
        raise EvaluateError(f"{data_dir}: no '{split}' split (has {', '.join(dd)})")
    return dd[split], data_dir


# ------------------------------------------------------------------------------------------ logging


def _log(cfg: Config, meta: dict, model_dir: Path, labels, p, threshold, groups, split: str, *, title: str,
         table_file: str | None = None, tags: dict | None = None, run_name: str | None = None,
         data_hash: str | None = None, force_new_run: bool = False, policy: dict | None = None,
         extra_text: str = "") -> str:
    """Log into the model's run when it is in this store (and not `force_new_run`), else into a new
    `eval` run. `threshold`: a float or per-row thresholds (from `policy`). Returns the run id."""
    from mlflow.exceptions import MlflowException

    from training import tracking

    model_run = meta.get("mlflow_run_id")
    if model_run and not force_new_run:
        tracking.setup(cfg)
        try:
            tracking._client().get_run(model_run)
        except MlflowException:
            model_run_found = False
        else:
            model_run_found = True
        if model_run_found:
            with tracking.resume_run(model_run, cfg):
                tracking.log_evaluation(labels, p, threshold, groups, split, title=title, table_file=table_file,
                                        policy=policy, extra_text=extra_text)
            return model_run
    tags = {"spamlingo.model_dir": str(model_dir), **(tags or {})}
    if model_run:
        tags["spamlingo.model_run_id"] = model_run
    with tracking.start_run(cfg, "eval", run_name=run_name, data_hash=data_hash, tags=tags) as run:
        tracking.log_evaluation(labels, p, threshold, groups, split, title=title, table_file=table_file,
                                policy=policy, extra_text=extra_text)
        return run.info.run_id


# ------------------------------------------------------------------------------------------ evaluation


def check_eval_config(cfg: Config) -> None:
    """The eval settings every scoring pass uses (also checked by training before it starts)."""
    if cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    for key in ("threshold_min_ham", "threshold_min_spam", "threshold_spread_resamples"):
        if getattr(cfg.eval, key) < 0:
            raise ConfigError(f"eval.{key} must be >= 0, got {getattr(cfg.eval, key)}")
    cap = cfg.eval.max_language_fpr
    if cap and not (cfg.eval.language_balanced_fpr and cfg.eval.target_fpr <= cap < 1):
        raise ConfigError(f"eval.max_language_fpr={cap:g} caps each language's FPR under the mean of "
                          "eval.language_balanced_fpr: it needs that on and a value from eval.target_fpr "
                          f"({cfg.eval.target_fpr:g}) up to 1 (0 = no cap)")


def evaluate_model_dir(model_dir: str | Path, cfg: Config, split: str = "test", *, log: bool = True,
                       progress: bool = True, error_report: str | Path | None = None) -> EvalResult:
    """Score the model on a split of its prepared data (test by default) at its stored thresholds (each
    row at its language's threshold from the model's policy); print the per-source/per-language table and
    which threshold applied per language; log metrics, metrics.md and plots to MLflow (when `log`).
    `error_report`: write the HTML error report there (training/error_report.py; logged with the rest)."""
    from training import metrics as M

    check_eval_config(cfg)
    model_dir = Path(model_dir)
    model, encoder, meta = load_model(model_dir)
    rows, data_dir = _split_rows(model_dir, meta, cfg, split)
    texts, labels = list(rows["text"]), np.asarray(rows["label"], dtype=int)
    if len(labels) == 0:
        raise EvaluateError(f"{data_dir}: the '{split}' split is empty")
    mask_digits = bool(meta["text"].get("mask_digits", True))
    p = predict_proba(model, encoder, texts, cfg.eval.batch_size, mask_digits, progress, desc=f"{split} split")
    policy = model_policy(meta)
    langs = list(rows["lang"])
    per_row, scopes = TH.thresholds_for(policy, langs)
    groups = {"source": list(rows["source"]), "lang": langs}
    grouped = M.grouped_metrics(labels, p, per_row, groups)
    table = M.metrics_table(grouped)
    applied = threshold_lines(policy, langs)
    short = "val" if split == "validation" else split
    print(f"\n{model_dir} on {data_dir} ({split}, {len(labels)} rows), thresholds {TH.describe(policy)} "
          f"({meta.get('threshold_rule', '?')}):\n\n{applied}\n{table}")
    run_id = None
    if log:
        run_id = _log(cfg, meta, model_dir, labels, p, per_row, groups, short, title=f"{model_dir.name} {split}",
                      tags={"spamlingo.eval_split": split}, run_name=f"eval-{split}",
                      data_hash=meta.get("data_hash"), policy=policy, extra_text=applied)
        print(f"logged to MLflow run {run_id}")
    if error_report:
        _error_report(error_report, model, encoder, meta, texts, labels, p, per_row, groups, run_id,
                      f"{model_dir.name}: errors on the {split} split")
    return EvalResult(grouped, policy["default"], short, table, run_id, p, labels, policy, per_row, scopes)


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def evaluate_file(model_dir: str | Path, path: str | Path, cfg: Config, *, text: str = "text",
                  label: str = "label", source: str = "source", log: bool = True,
                  progress: bool = True, error_report: str | Path | None = None) -> EvalResult:
    """Score any labelled CSV/TSV/JSONL (training.sources.read_labelled_file) with the same metrics, per
    source (the `source` column, else the file name) and per language; log to a new `eval` run tagged
    with the file, its sha256 and the model's run. Metric names: `data/<scope>/<metric>`."""
    from training import metrics as M
    from training.sources import read_labelled_file

    check_eval_config(cfg)
    model_dir = Path(model_dir)
    model, encoder, meta = load_model(model_dir)
    mask_digits = bool(meta["text"].get("mask_digits", True))
    rows = read_labelled_file(path, text=text, label=label, source=source, mask_digits=mask_digits)
    texts = [r["text"] for r in rows]
    labels = np.asarray([r["label"] for r in rows], dtype=int)
    p = predict_proba(model, encoder, texts, cfg.eval.batch_size, mask_digits, progress, desc=Path(path).name)
    policy = model_policy(meta)
    langs = [r["lang"] for r in rows]
    per_row, scopes = TH.thresholds_for(policy, langs)
    groups = {"source": [r["source"] for r in rows], "lang": langs}
    grouped = M.grouped_metrics(labels, p, per_row, groups)
    table = M.metrics_table(grouped)
    applied = threshold_lines(policy, langs)
    print(f"\n{model_dir} on {path} ({len(labels)} rows, {int(labels.sum())} spam), thresholds "
          f"{TH.describe(policy)}:\n\n{applied}\n{table}")
    run_id = None
    if log:
        digest = file_hash(path)
        tags = {"spamlingo.data_file": str(Path(path).resolve()), "spamlingo.data_file_sha256": digest}
        run_id = _log(cfg, meta, model_dir, labels, p, per_row, groups, "data",
                      title=f"{model_dir.name} on {Path(path).name}", table_file="metrics.md", tags=tags,
                      run_name=f"eval-{Path(path).name.split('.')[0]}", data_hash=digest, force_new_run=True,
                      policy=policy, extra_text=applied)
        print(f"logged to MLflow run {run_id}")
    if error_report:
        _error_report(error_report, model, encoder, meta, texts, labels, p, per_row, groups, run_id,
                      f"{model_dir.name}: errors on {Path(path).name}")
    return EvalResult(grouped, policy["default"], "data", table, run_id, p, labels, policy, per_row, scopes)


def report_path(model_dir: Path, subdir: str = "") -> Path:
    """Where `make eval` writes the error report: eval/[subdir/]error_report.html beside the model directory."""
    return model_dir.parent / "eval" / subdir / "error_report.html"


def _error_report(path, model, encoder, meta, texts, labels, p, per_row, groups, run_id, title) -> None:
    """The HTML error report, its spans explained by this PyTorch model (the server's code, serving/explain.py:
    decomposition for a mean-pooled model, as its bundle is explained; occlusion with this scorer for a
    cls-pooled one), logged to `run_id` when given."""
    from serving.explain import decompose_many
    from training.error_report import write_report
    from training.modeling import pooling_of, token_scorer

    mask_digits = bool(meta["text"].get("mask_digits", True))

    def score(batch: list[str]) -> np.ndarray:  # the rows of one explained text: one forward pass
        return predict_proba(model, encoder, batch, len(batch), mask_digits, progress=False)

    explain = None
    if pooling_of(model) == "mean":
        scorer = token_scorer(model.eval(), encoder)
        explain = lambda t: decompose_many([t], encoder, scorer, mask_digits)[0]  # noqa: E731
    counts = write_report(path, texts, labels, p, per_row, groups["lang"], groups["source"], score, title=title,
                          mask_digits=mask_digits, explain=explain)
    print(f"wrote {path} ({counts['false_positives']} false positives, {counts['false_negatives']} false negatives, "
          f"{counts['explained']} shown{', by ' + counts['method'] if counts['method'] else ''})")
    if run_id:
        from mlflow import MlflowClient

        MlflowClient().log_artifact(run_id, str(path))


def _per_language_mode(e) -> str:
    if not e.per_language_thresholds:
        return "off"
    return "on" if e.per_language_lower else "on (raise only)"


def rethreshold(model_dir: str | Path, cfg: Config, *, log: bool = True, progress: bool = True) -> dict:
    """Choose the model's threshold policy again on its validation split with `cfg.eval` (rule, target FPR,
    per-language thresholds and their minimums), as training does at its end, and write it into its
    spamlingo.json: an operator's FPR target (or the per-language switch) changes without retraining.
    The next `make export` carries it into the bundle. Returns the new policy."""
    import warnings

    from training.metrics import ThresholdWarning, balance_text, config_threshold_policy, spread_text

    check_eval_config(cfg)
    model_dir = Path(model_dir)
    model, encoder, meta = load_model(model_dir)
    data = _model_data(model_dir, meta, cfg)  # validation, and the training split for the unread ham
    rows, data_dir = _split_rows(model_dir, meta, cfg, "validation", data)
    mask_digits = bool(meta["text"].get("mask_digits", True))
    p = predict_proba(model, encoder, list(rows["text"]), cfg.eval.batch_size, mask_digits, progress,
                      desc="validation split")
    e = cfg.eval
    pool = None
    if e.threshold_unread_ham:
        from training.rows import ham_pool

        train = _split_rows(model_dir, meta, cfg, "train", data)[0]
        pool = ham_pool(cfg, train, rows["source"], lambda texts: predict_proba(
            model, encoder, texts, e.batch_size, mask_digits, progress, desc="unread training ham"),
            meta.get("rows_read"))
        if pool is not None:  # a model trained before rows_read existed: the caps assumed, kept for make export
            meta.setdefault("rows_read", pool.rows_read)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThresholdWarning)
        policy = config_threshold_policy(e, list(rows["label"]), p, list(rows["lang"]), pool)
    before = TH.describe(model_policy(meta))
    meta.update(threshold=policy["default"], thresholds=policy, threshold_rule=e.threshold_rule,
                target_fpr=e.target_fpr, threshold_choice=policy["global"])
    (model_dir / MODEL_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{model_dir}: thresholds {before} -> {TH.describe(policy)} ({e.threshold_rule}, target FPR "
          f"{e.target_fpr:g}, per-language {_per_language_mode(e)}; {len(p)} validation "
          f"rows of {data_dir})")
    for line in (balance_text(policy["global"]), spread_text(policy["global"])):
        if line:
            print(f"  {line}")
    if log and meta.get("mlflow_run_id"):
        from mlflow.exceptions import MlflowException

        from training import tracking

        tracking.setup(cfg)
        try:
            with tracking.resume_run(meta["mlflow_run_id"], cfg):
                import mlflow

                with tracking.uninterrupted():
                    mlflow.log_metric("threshold", policy["default"])
                    mlflow.set_tag("spamlingo.rethreshold", TH.describe(policy))
                mlflow.log_dict(meta, "model/spamlingo.json")
        except MlflowException as ex:
            print(f"warning: not logged to MLflow run {meta['mlflow_run_id']}: {ex}", file=sys.stderr)
    return policy


# ------------------------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    parser = cli_args(argv, __doc__.split("\n")[0])
    parser.add_argument("--run", default=None, help="MLflow run id or model directory (default: newest finished run)")
    parser.add_argument("--data", default=None, help="a labelled CSV/TSV/JSONL to score instead of the test split")
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="split of the prepared data (default: %(default)s)")
    parser.add_argument("--text-column", default="text", help="--data: column with the message (default: %(default)s)")
    parser.add_argument("--label-column", default="label", help="--data: column with spam/ham (default: %(default)s)")
    parser.add_argument("--source-column", default="source",
                        help="--data: optional column naming each row's source (default: %(default)s)")
    parser.add_argument("--no-log", action="store_true", help="print the table only, log nothing to MLflow")
    parser.add_argument("--rethreshold", action="store_true",
                        help="choose the threshold policy again on validation with the config's eval settings "
                             "and write it into the model's spamlingo.json (then make export)")
    args = parser.parse_args(argv)
    from training.data import DataError
    from training.tracking import resolve_model_dir

    try:
        cfg = load_config(args.config, args.overrides)
        model_dir = resolve_model_dir(args.run, cfg)
        if args.rethreshold:
            rethreshold(model_dir, cfg, log=not args.no_log)
        elif args.data:
            evaluate_file(model_dir, args.data, cfg, text=args.text_column, label=args.label_column,
                          source=args.source_column, log=not args.no_log,
                          error_report=report_path(model_dir, f"data-{Path(args.data).name.split('.')[0]}"))
        else:
            evaluate_model_dir(model_dir, cfg, args.split, log=not args.no_log,
                               error_report=report_path(model_dir, "" if args.split == "test" else args.split))
    except (ConfigError, TrackingError, EvaluateError, DataError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
