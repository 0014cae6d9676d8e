"""The baseline: character n-gram TF-IDF + logistic regression on the same prepared splits, scored and
logged exactly like the transformer so `make compare` puts them side by side.

    python -m training.baseline --config configs/default.yaml            # make baseline
    python -m training.baseline --config configs/smoke.yaml --ngram 2,5 --max-features 500000

Character n-grams within word boundaries (`char_wb`) need no tokenizer and work for Chinese, Japanese and
Korean as well as English. Long e-mails are cut to their head and tail (`--max-chars`) as the transformer's
head_tail truncation does. The threshold is chosen on validation by `eval.threshold_rule` /
`eval.target_fpr`; test metrics use the DESIGN §4 names. The fitted pipeline (raw text in, spam
probability out) is saved with joblib to `<train.output_dir>/baseline/` and logged as artifact `baseline/`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from serving.text import normalize
from training.config import Config, ConfigError, cli_args, fail, load_config, resolve_path


@dataclass
class BaselineResult:
    run_id: str  # the MLflow run (kind baseline)
    threshold: float
    threshold_choice: dict  # metrics.threshold_choice on validation
    val: dict  # grouped metrics (metrics.grouped_metrics) of the validation split
    test: dict  # grouped metrics of the test split
    model_path: Path  # the saved pipeline (model.joblib; baseline.json beside it)
    fit_seconds: float


@dataclass
class BaselineSettings:
    ngram_min: int = 1
    ngram_max: int = 4
    max_features: int = 300_000  # most frequent n-grams kept: bounds memory and model size
    min_df: int = 2  # an n-gram seen in one message only is noise (and often a near-unique id)
    C: float = 4.0  # inverse regularisation strength of the logistic regression
    max_chars: int = 3000  # head 2/3 + tail 1/3 of a longer message (0 = no cut)
    max_iter: int = 2000

    def check(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max <= 8:
            raise ConfigError(f"--ngram must be MIN,MAX with 1 <= MIN <= MAX <= 8, got {self.ngram_min},{self.ngram_max}")
        for key in ("max_features", "min_df", "max_iter"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.C <= 0:
            raise ConfigError(f"--C must be > 0, got {self.C}")
        if self.max_chars < 0:
            raise ConfigError(f"--max-chars must be >= 0, got {self.max_chars}")


def prepare_texts(texts: Sequence[str], mask_digits: bool = True, max_chars: int = 3000) -> list[str]:
    """serving.text.normalize, then the head (2/3) and tail (1/3) of texts longer than max_chars. Part of
    the saved pipeline, so it takes raw messages like the server does."""
    out = []
    for t in texts:
        t = normalize(str(t), mask_digits)
        if max_chars and len(t) > max_chars:
            head = (2 * max_chars) // 3
            t = t[:head] + " " + t[len(t) - (max_chars - head):]
        out.append(t)
    return out


def build_pipeline(settings: BaselineSettings, mask_digits: bool = True, seed: int = 13):
    """sklearn Pipeline: prepare_texts -> TfidfVectorizer(char_wb) -> LogisticRegression(balanced)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    # the function by its importable name: under `python -m training.baseline` this module is __main__,
    # and a pipeline pickled with __main__.prepare_texts cannot be loaded by any other command
    from training.baseline import prepare_texts as prepare

    return Pipeline([
        ("prepare", FunctionTransformer(prepare, kw_args={"mask_digits": mask_digits,
                                                                "max_chars": settings.max_chars})),
        ("tfidf", TfidfVectorizer(analyzer="char_wb", ngram_range=(settings.ngram_min, settings.ngram_max),
                                  sublinear_tf=True, min_df=settings.min_df, max_features=settings.max_features,
                                  lowercase=True, dtype=np.float32)),
        ("lr", LogisticRegression(C=settings.C, class_weight="balanced", solver="liblinear",
                                  max_iter=settings.max_iter, random_state=seed)),
    ])


def save_pipeline(pipe, directory: Path, info: dict) -> Path:
    """model.joblib + baseline.json (settings, threshold, metrics) into `directory`."""
    import joblib

    directory.mkdir(parents=True, exist_ok=True)
    joblib.dump(pipe, directory / "model.joblib", compress=3)
    (directory / "baseline.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return directory / "model.joblib"


def load_pipeline(directory: str | Path):
    """(pipeline, info) saved by `save_pipeline`: `pipeline.predict_proba(raw_texts)[:, 1]` is p_spam.
    joblib files run code when loaded: load only files you produced."""
    import joblib

    directory = Path(directory)
    return joblib.load(directory / "model.joblib"), json.loads((directory / "baseline.json").read_text(encoding="utf-8"))


def _step(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)


def run_baseline(cfg: Config, settings: BaselineSettings | None = None, out_dir: str | Path | None = None,
                 config_path: str | None = None, capped: bool = False) -> BaselineResult:
    """Fit on train, choose the threshold policy on validation (global + per language, the same rule as
    the transformer's), score test; log one MLflow run of kind `baseline` and return its results.

    `train.exclude_sources` always applies (a leave-one-corpus-out fold); `capped` also applies the
    transformer's training-row caps (`train.max_rows_per_source`, `rows_per_source`, `max_train_rows`), so that a fold
    compares the two models on the same rows. By default the baseline reads every training row."""
    import mlflow

    from training import metrics as M
    from training import tracking
    from training.data import ensure_prepared, load_splits

    settings = settings or BaselineSettings()
    settings.check()
    if cfg.eval.threshold_rule not in M.THRESHOLD_RULES:
        raise ConfigError(f"eval.threshold_rule must be one of {', '.join(M.THRESHOLD_RULES)}, "
                          f"got {cfg.eval.threshold_rule!r}")
    t0 = time.time()
    data_dir = ensure_prepared(cfg)
    from training.augment import augment_rows
    from training.rows import exclude_sources, ham_pool, rows_kept, rows_read

    splits = exclude_sources(load_splits(cfg), cfg.train.exclude_sources)
    train, val, test = splits["train"], splits["validation"], splits["test"]
    read = rows_read(cfg, train)
    if capped:  # every row the transformer reads (all its epochs' with fresh_rows_per_epoch)
        train = rows_kept(read, train)
    # the transformer's augmented copies too (train.augment), so that both learn from the same rows
    train = augment_rows(train, cfg.train.augment, cfg.train.seed)
    out = Path(out_dir) if out_dir else resolve_path(cfg.train.output_dir) / "baseline"
    _step(f"data {data_dir}: {len(train)} train / {len(val)} validation / {len(test)} test rows", t0)

    with tracking.start_run(cfg, "baseline", run_name=cfg.tracking.run_name or "baseline-tfidf-lr",
                            config_path=config_path) as run:
        tracking.tag_data(data_dir)
        mlflow.log_params({f"baseline.{k}": v for k, v in asdict(settings).items()})
        mlflow.set_tag("backbone", "tfidf-char-lr")
        pipe = build_pipeline(settings, cfg.data.mask_digits, cfg.data.seed)
        fit_t = time.time()
        pipe.fit(list(train["text"]), np.asarray(train["label"]))
        fit_seconds = time.time() - fit_t
        n_features = len(pipe.named_steps["tfidf"].vocabulary_)
        _step(f"fitted TF-IDF ({n_features:,} n-grams) + logistic regression in {fit_seconds:.1f}s", t0)

        p_val = pipe.predict_proba(list(val["text"]))[:, 1]
        e = cfg.eval
        # capped (a fold), the rows the transformer did not read are unread here too; uncapped, none are
        pool = ham_pool(cfg, splits["train"], val["source"], lambda texts: pipe.predict_proba(texts)[:, 1],
                        read) if capped else None
        policy = M.config_threshold_policy(e, val["label"], p_val, list(val["lang"]), pool)
        choice = policy["global"]
        threshold = policy["default"]
        if choice["note"]:
            print(f"warning: {choice['note']}")
            mlflow.set_tag("spamlingo.threshold_note", choice["note"])
        extra = M.choice_text(choice)
        _step(f"threshold {threshold:.4f} ({choice['rule']}, target FPR {choice['target_fpr']:g}): validation "
              f"recall {choice['val_recall']:.4f} at FPR {choice['val_fpr']:.4f}" + (f"; {extra}" if extra else ""), t0)
        from serving.thresholds import describe, thresholds_for

        _step(f"thresholds: {describe(policy)}", t0)
        val_thr = thresholds_for(policy, list(val["lang"]))[0]
        val_grouped = tracking.log_evaluation(val["label"], p_val, val_thr,
                                              {"source": val["source"], "lang": val["lang"]}, "val",
                                              title="baseline", plots=False)
        p_test = pipe.predict_proba(list(test["text"]))[:, 1]
        test_grouped = tracking.log_evaluation(
            test["label"], p_test, thresholds_for(policy, list(test["lang"]))[0],
            {"source": test["source"], "lang": test["lang"]}, "test",
            title="baseline", extra_text=f"TF-IDF char_wb {settings.ngram_min}-{settings.ngram_max} "
                                         f"({n_features:,} n-grams) + logistic regression; threshold rule "
                                         f"{choice['rule']} (target FPR {choice['target_fpr']:g}) on validation")
        info = {"kind": "baseline", "settings": asdict(settings), "mask_digits": cfg.data.mask_digits,
                "threshold": threshold, "thresholds": policy, "threshold_rule": choice["rule"],
                "target_fpr": choice["target_fpr"],
                "mlflow_run_id": run.info.run_id, "data_dir": str(data_dir),
                "data_hash": tracking.data_hash_of(data_dir),
                "metrics": {k: v for k, v in M.to_mlflow_metrics(test_grouped, "test", counts=False).items()
                            if k.startswith("test/overall/")}}
        model_path = save_pipeline(pipe, out, info)
        mlflow.log_artifacts(str(out), "baseline")
        mlflow.log_metrics({"model/parameters": float(pipe.named_steps["lr"].coef_.size + 1),
                            "model/size_mb": model_path.stat().st_size / 1e6,
                            "model/n_features": float(n_features), "train/runtime_s": fit_seconds})
        print(f"\nbaseline on {data_dir} (test, {len(test)} rows), threshold {threshold:.4g}:\n\n"
              f"{M.metrics_table(test_grouped)}")
        _step(f"saved {model_path}; logged to MLflow run {run.info.run_id}", t0)
    return BaselineResult(run.info.run_id, threshold, choice, val_grouped, test_grouped, model_path, fit_seconds)


def _config_rule(cfg: Config) -> tuple[str, float, bool, float]:
    """The config's threshold rule, in `_model_rule`'s terms."""
    e = cfg.eval
    return e.threshold_rule, e.target_fpr, e.language_balanced_fpr, e.max_language_fpr


def _model_rule(cfg: Config, meta: dict) -> tuple[str, float, bool, float]:
    """(threshold rule, target FPR, whether the languages' FPRs were averaged, the cap on each language's FPR) of a
    model (its spamlingo.json `meta`); the config's for a model whose threshold was set by hand (no rule to match)."""
    from training import metrics as M

    rule, fpr = meta.get("threshold_rule"), meta.get("target_fpr")
    if rule not in M.THRESHOLD_RULES or fpr is None:
        return _config_rule(cfg)
    # models from before eval.language_balanced_fpr held the FPR of all ham together (and before
    # eval.max_language_fpr capped no language)
    policy = meta.get("thresholds") or {}
    return (rule, float(fpr), bool(policy.get("language_balanced", False)),
            float(policy.get("max_language_fpr") or 0.0))


def same_rule_config(cfg: Config, meta: dict) -> Config:
    """`cfg` with the threshold rule of a model (`_model_rule`), for a baseline to compare with it."""
    from training.config import with_overrides

    rule, fpr, balanced, cap = _model_rule(cfg, meta)
    if (rule, fpr, balanced, cap) == _config_rule(cfg):
        return cfg
    return with_overrides(cfg, [f"eval.threshold_rule={rule}", f"eval.target_fpr={fpr}",
                                f"eval.language_balanced_fpr={str(balanced).lower()}", f"eval.max_language_fpr={cap}"])


def _augment_of(params: dict) -> dict[str, float]:
    """`train.augment` of a run from its logged parameters (`train.augment.<name>`; none before it existed)."""
    return {k.removeprefix("train.augment."): float(v) for k, v in params.items() if k.startswith("train.augment.")}


def find_runs(cfg: Config, meta: dict) -> tuple[object | None, list]:
    """(the newest finished baseline run on the data of the model described by `meta` whose threshold was chosen
    by the model's rule, every finished baseline run with that rule, newest first). The same rule (`eval.threshold_rule` at
    `eval.target_fpr`, over all ham or as the languages' mean: `eval.language_balanced_fpr`, with the languages' cap
    `eval.max_language_fpr`) on both sides of a
    comparison: a baseline whose threshold flags 1% of validation ham against a model's 0.5% says as much about
    the thresholds as about the models. The baseline must also have
    read the config's augmented copies (`train.augment`), so that both learnt from the same rows."""
    from mlflow import MlflowClient

    from training import tracking

    exp_id = tracking.setup(cfg)
    runs = MlflowClient().search_runs(
        [exp_id], "tags.`spamlingo.kind` = 'baseline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=200)
    rule, fpr, balanced, cap = _model_rule(cfg, meta)

    def same(r) -> bool:
        p = r.data.params
        try:
            return (p.get("eval.threshold_rule") == rule and float(p.get("eval.target_fpr", "nan")) == fpr
                    and p.get("eval.language_balanced_fpr", "false").lower() == str(balanced).lower()
                    and float(p.get("eval.max_language_fpr", "0")) == cap
                    and _augment_of(p) == cfg.train.augment)
        except ValueError:
            return False

    want = meta.get("data_hash")
    return next((r for r in runs if want and r.data.tags.get("data_hash") == want and same(r)), None), \
        [r for r in runs if same(r)]


def _ngram(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX such as 1,4, got {text!r}") from None
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    d = BaselineSettings()
    parser = cli_args(argv, "TF-IDF character n-grams + logistic regression baseline, logged to MLflow.")
    parser.add_argument("--ngram", type=_ngram, default=(d.ngram_min, d.ngram_max),
                        help="character n-gram range MIN,MAX (default: %(default)s)")
    parser.add_argument("--max-features", type=int, default=d.max_features, help="(default: %(default)s)")
    parser.add_argument("--min-df", type=int, default=d.min_df, help="(default: %(default)s)")
    parser.add_argument("--C", type=float, default=d.C, help="inverse regularisation (default: %(default)s)")
    parser.add_argument("--max-chars", type=int, default=d.max_chars,
                        help="cut longer messages to head + tail (0 = no cut; default: %(default)s)")
    parser.add_argument("--out", default=None, help="where the pipeline goes (default: <train.output_dir>/baseline)")
    args = parser.parse_args(argv)
    from training.data import DataError
    from training.tracking import TrackingError

    settings = BaselineSettings(ngram_min=args.ngram[0], ngram_max=args.ngram[1], max_features=args.max_features,
                                min_df=args.min_df, C=args.C, max_chars=args.max_chars)
    try:
        cfg = load_config(args.config, args.overrides)
        run_baseline(cfg, settings, args.out, config_path=args.config)
    except (ConfigError, DataError, TrackingError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
