"""MLflow tracking: where runs are stored, how a run is opened and closed, how evaluations are logged,
how a run id becomes a model directory, and the model registry.

Store: `$MLFLOW_TRACKING_URI`, else `tracking.tracking_uri`, else an embedded SQLite store at
`<repo>/mlruns/mlflow.db` with artifacts under `<repo>/mlruns/artifacts/` (no server). SQLite is MLflow 3's
own default backend and, unlike the old file store, supports the model registry (aliases included).

    python -m training.tracking register [--run ID] --name spamlingo --alias champion   # make register
    python -m training.tracking ui [--port 5000]                                         # make mlflow-ui
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from training.config import ROOT, ConfigError, Config, TrackingConfig, fail, flatten, load_config, resolve_path, save_resolved

MODEL_META = "spamlingo.json"  # marks a trained model directory (DESIGN §3)
# + split ("test", "val", ...): the thresholds a run's logged metrics of that split were scored at
# (serving.thresholds.describe); a model whose thresholds were chosen again since no longer matches (bench/quality.py).
SCORED_AT_TAG = "spamlingo.scored_at."
KINDS = ("transformer", "baseline", "eval")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
RUN_PREFIX = re.compile(r"^[0-9a-f]{4,31}$")
PACKAGES = ("torch", "transformers", "onnxruntime", "mlflow", "scikit-learn", "tokenizers", "datasets")
MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_CHARS = 5000


class TrackingError(Exception):
    """A user-facing tracking problem (no runs yet, unknown run id, missing artifact): one clear line."""


# ------------------------------------------------------------------------------------------ store


def _tracking_cfg(cfg: Config | TrackingConfig | None) -> TrackingConfig:
    if cfg is None:
        return TrackingConfig()
    return cfg.tracking if isinstance(cfg, Config) else cfg


# mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI (for subprocesses), so after `setup` the variable
# may hold our own choice rather than the user's: remember both to keep the precedence right when one
# process sets up several configs (tests, compare).
_LAST_SET: str | None = None
_USER_ENV_AT_SET: str | None = None


def _user_env_uri() -> str | None:
    env = os.environ.get("MLFLOW_TRACKING_URI") or None
    if env is not None and env == _LAST_SET:
        return _USER_ENV_AT_SET
    return env


def tracking_uri(tracking_cfg: Config | TrackingConfig | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else tracking.tracking_uri (a bare path is relative to the repository root),
    else sqlite:///<repo>/mlruns/mlflow.db."""
    uri = _user_env_uri() or _tracking_cfg(tracking_cfg).tracking_uri
    if not uri:
        return f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"
    if "://" not in uri and not uri.startswith("file:"):
        return resolve_path(uri).as_uri()  # a plain directory: MLflow's file store
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep their artifacts: beside a SQLite database (`<db dir>/artifacts`), so
    the store is one self-contained folder whatever directory a command runs from; None = MLflow's choice."""
    db = _sqlite_path(uri)
    if db is None or str(db) in ("", ":memory:"):
        return None
    return (db.parent.resolve() / "artifacts").as_uri()


def setup(tracking_cfg: Config | TrackingConfig | None = None) -> str:
    """Point MLflow at the store (see `tracking_uri`), create the experiment when missing, make it the
    active one, and return its id."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tcfg = _tracking_cfg(tracking_cfg)
    uri = tracking_uri(tcfg)
    db = _sqlite_path(uri)
    if db is not None and str(db) not in ("", ":memory:"):
        db.parent.mkdir(parents=True, exist_ok=True)
    global _LAST_SET, _USER_ENV_AT_SET
    _USER_ENV_AT_SET = _user_env_uri()
    mlflow.set_tracking_uri(uri)
    _LAST_SET = uri
    client = MlflowClient()
    name = tcfg.experiment or "spamlingo"
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            root = artifact_root(uri)
            location = f"{root}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}" if root else None
            try:
                exp_id = client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created by a concurrent process in between
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp_id)
    except MlflowException as e:
        raise TrackingError(f"MLflow store {uri}: {e.message}") from None
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# ------------------------------------------------------------------------------------------ run metadata


def git_info() -> dict[str, str]:
    """{"git_commit": sha, "git_dirty": "true"|"false"} of the repository, or {} outside a git checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": sha, "git_dirty": str(bool(status.strip())).lower()}


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that change results (read from metadata: nothing is imported)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def data_hash_of(data_dir: str | Path) -> str | None:
    """The `dataset_hash` of a prepared data directory's manifest.json, or None when it is not prepared."""
    manifest = Path(data_dir) / "manifest.json"
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("dataset_hash")
    except (OSError, ValueError):
        return None


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def _tag_value(text: str) -> str:
    return text if len(text) <= MAX_TAG_CHARS else text[: MAX_TAG_CHARS - 3] + "..."


def params_of(cfg: Config) -> dict[str, str]:
    """flatten(cfg) as MLflow params: strings, long values truncated to MLflow's limit."""
    return {k: _param_value(v) for k, v in flatten(cfg).items()}


# ------------------------------------------------------------------------------------------ runs


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them to the handlers they would have met.

    For MLflow writes: an interrupt raised inside a SQLite transaction can leave the store's write lock with
    a session nobody finishes, and marking the run KILLED then fails with "database is locked". Signals can
    only be handled in the main thread; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if previous not in (None, signal.SIG_IGN):  # None: set outside Python (cannot be put back); ignored stays so
            before[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


def _close_on_error(status: str, record: Callable[[], None]) -> None:
    """`record` the error in the active run, then end it with `status`, both uninterrupted. A store that cannot
    take either is reported on stderr (the run then stays RUNNING): the caller's exception, not this one, ends
    the command."""
    import mlflow

    run = mlflow.active_run()

    def warn(what: str, e: Exception) -> None:
        first = (str(e).splitlines() or [""])[0]
        print(f"warning: MLflow run {run.info.run_id if run else '?'} {what} ({type(e).__name__}: {first})",
              file=sys.stderr)

    with uninterrupted():
        try:
            record()
        except Exception as e:
            warn("did not record the error", e)
        try:
            mlflow.end_run(status)
        except Exception as e:
            warn(f"could not be marked {status}; it stays RUNNING", e)


def _end_with_error(exc: BaseException) -> None:
    """Mark the active run FAILED (KILLED on an interrupt) with the error: tag `spamlingo.error`, artifact
    `error.txt` (the traceback)."""
    import mlflow

    def record() -> None:
        mlflow.set_tag("spamlingo.error", _tag_value(f"{type(exc).__name__}: {exc}"))
        mlflow.log_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), "error.txt")

    _close_on_error("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", record)


@contextlib.contextmanager
def start_run(
    cfg: Config,
    kind: str,
    run_name: str | None = None,
    *,
    config_path: str | Path | None = None,
    data_hash: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """Open an MLflow run in cfg.tracking's experiment and yield the `mlflow.ActiveRun`.

    On entry: tags `spamlingo.kind` (transformer | baseline | eval), `spamlingo.config` (config_path),
    `git_commit`, `git_dirty`, `data_hash` (given, else read from cfg.data.output_dir/manifest.json when
    prepared; `tag_data` sets it later), `version.<package>`; params flatten(cfg); artifact config.yaml.
    On exit: FINISHED; on an exception FAILED (KILLED on Ctrl-C) with tag `spamlingo.error` and artifact
    `error.txt` (the traceback), and the exception is re-raised.
    run_id: continue that run (train.resume) instead of opening a new one. Params it already has keep
    their value (MLflow forbids changing one); the keys whose value differs now are listed in tag
    `spamlingo.resume_changed`. An id unknown to the store opens a new run (with a message).
    """
    import mlflow

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    exp_id = setup(cfg.tracking)
    all_tags = {"spamlingo.kind": kind, **git_info()}
    if config_path:
        all_tags["spamlingo.config"] = str(config_path)
    data_hash = data_hash or data_hash_of(resolve_path(cfg.data.output_dir))
    if data_hash:
        all_tags["data_hash"] = data_hash
    all_tags.update({f"version.{k}": v for k, v in package_versions().items()})
    all_tags.update(tags or {})
    params = params_of(cfg)
    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            old = _client().get_run(run_id)
        except MlflowException:
            print(f"MLflow run {run_id} is not in {tracking_uri(cfg)}: logging to a new run", file=sys.stderr)
            run_id = None
        else:
            changed = sorted(k for k, v in params.items() if k in old.data.params and old.data.params[k] != v)
            params = {k: v for k, v in params.items() if k not in old.data.params}
            if changed:
                all_tags["spamlingo.resume_changed"] = _tag_value(",".join(changed))
    run = None
    try:
        with uninterrupted():  # an interrupt held here comes out inside this try, once the run is open
            if run_id:
                run = mlflow.start_run(run_id=run_id, tags=all_tags)
            else:
                run = mlflow.start_run(experiment_id=exp_id, run_name=run_name or cfg.tracking.run_name or None,
                                       tags=all_tags)
            if params:
                mlflow.log_params(params)
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.log_artifact(str(save_resolved(cfg, tmp)))
        yield run
    except BaseException as exc:
        if run is not None:  # else mlflow.start_run itself failed: there is no run of ours to end
            _end_with_error(exc)
        raise
    else:
        with uninterrupted():
            mlflow.end_run("FINISHED")


@contextlib.contextmanager
def resume_run(run_id: str, tracking_cfg: Config | TrackingConfig | None = None) -> Iterator[Any]:
    """Reopen an existing run to add results (e.g. evaluation of a trained model). Its status is restored
    on exit; an exception is recorded as tag `spamlingo.eval_error` without failing the original run."""
    import mlflow
    from mlflow import MlflowClient

    setup(tracking_cfg)
    status = MlflowClient().get_run(run_id).info.status
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    except BaseException as exc:
        error = _tag_value(f"{type(exc).__name__}: {exc}")
        _close_on_error(status if status != "RUNNING" else "FAILED",
                        lambda: mlflow.set_tag("spamlingo.eval_error", error))
        raise
    else:
        with uninterrupted():
            mlflow.end_run(status if status != "RUNNING" else "FINISHED")


def tag_data(data_dir: str | Path) -> str | None:
    """Set the active run's `data_hash` tag from a prepared data directory; returns the hash."""
    import mlflow

    h = data_hash_of(data_dir)
    if h:
        with uninterrupted():
            mlflow.set_tag("data_hash", h)
    return h


def log_evaluation(
    y_true: Sequence[int],
    p_spam: Sequence[float],
    threshold: float | Sequence[float],
    groups: Mapping[str, Sequence] | None = None,
    split: str = "test",
    *,
    title: str = "",
    out_dir: str | Path | None = None,
    plots: bool = True,
    extra_text: str = "",
    table_file: str | None = None,
    policy: Mapping | None = None,
) -> dict:
    """Score one split and log it to the active run.

    `threshold` is a float or per-row thresholds (an array, e.g. per-language ones from `policy`, the
    serving.thresholds policy they came from): every scope counts each row at the threshold it got.
    Logs metrics `<split>/<scope>/<metric>` (metrics.to_mlflow_metrics) and `threshold` (the global
    one: `policy["default"]`, else the single threshold), with a policy also `threshold/lang.<tag>` for
    each language with a threshold of its own and `threshold/spread_low|high` (its resampling interval,
    metrics.threshold_spread) where measured, and the tag SCORED_AT_TAG + split (those thresholds); the markdown
    table as `table_file` (default `metrics.md` for split "test", else `metrics_<split>.md`), and with `plots` the PNGs of
    plots.evaluation_plots under `plots/`. Files are also kept in `out_dir` when given.
    Returns the grouped metrics (metrics.grouped_metrics).
    """
    import mlflow

    from training import metrics as M

    from serving.thresholds import describe, from_threshold

    split = "val" if split == "validation" else split
    grouped = M.grouped_metrics(y_true, p_spam, threshold, groups)
    single = float(policy["default"]) if policy is not None else M.threshold_value(threshold)
    scored_at = describe(policy) if policy is not None else (
        None if math.isnan(single) else describe(from_threshold(single)))
    spread = (policy or {}).get("global", {}).get("spread")
    with uninterrupted():
        mlflow.log_metrics(M.to_mlflow_metrics(grouped, split))
        if not math.isnan(single):
            mlflow.log_metric("threshold", single)
        if spread:
            mlflow.log_metrics({"threshold/spread_low": spread["low"], "threshold/spread_high": spread["high"]})
        if policy is not None and policy.get("by_lang"):
            mlflow.log_metrics({f"threshold/{M.mlflow_scope('lang=' + k)}": float(v)
                                for k, v in policy["by_lang"].items()})
        if scored_at:
            mlflow.set_tag(SCORED_AT_TAG + split, scored_at)
    if policy is not None and policy.get("by_lang"):
        shown = f"thresholds {describe(policy)} (spam iff p_spam >= the threshold of the text's language)"
    elif math.isnan(M.threshold_value(threshold)):
        shown = "per-row thresholds (spam iff p_spam >= the row's threshold)"
    else:
        shown = f"threshold {M.threshold_value(threshold):.6g} (spam iff p_spam >= threshold)"
    with contextlib.ExitStack() as stack:
        base = Path(out_dir) if out_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base.mkdir(parents=True, exist_ok=True)
        md = base / (table_file or ("metrics.md" if split == "test" else f"metrics_{split}.md"))
        header = f"# {title or 'Evaluation'}: {split}\n\n{shown}\n\n"
        md.write_text(header + (extra_text + "\n\n" if extra_text else "") + M.metrics_table(grouped),
                      encoding="utf-8")
        mlflow.log_artifact(str(md))
        if plots:
            from training import plots as P

            paths = P.evaluation_plots(y_true, p_spam, threshold, groups, base / "plots", prefix=split,
                                       grouped=grouped, title=title)
            for p in paths:
                mlflow.log_artifact(str(p), "plots")
    return grouped


# ------------------------------------------------------------------------------------------ run -> model dir


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def newest_run(cfg: Config | TrackingConfig | None, kind: str = "transformer"):
    """The newest FINISHED run of `kind` in the experiment (an mlflow Run), or None."""
    exp_id = setup(cfg)
    runs = _client().search_runs(
        [exp_id],
        filter_string=f"tags.`spamlingo.kind` = '{kind}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def match_run_ref(ref: str, ids_and_names: Sequence[tuple[str, str]]) -> list[int]:
    """Indexes of the runs that `ref` names: its exact id, else its run name, else every id it is a prefix of
    (4 hex characters or more). The one rule for RUN= (eval, export, register) and `compare --runs`."""
    tests = ((lambda i, n: i == ref), (lambda i, n: n == ref),
             (lambda i, n: bool(RUN_PREFIX.match(ref)) and i.startswith(ref)))
    for test in tests:
        hits = [k for k, (run_id, name) in enumerate(ids_and_names) if test(run_id, name)]
        if hits:
            return hits
    return []


def _get_run(ref: str, or_model_dir: bool = False):
    """The run that `ref` names: a full run id, a unique id prefix (>= 4 characters) or a run name, in any
    experiment of the store (the short ids that `make compare` prints are enough)."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    client = _client()
    if RUN_ID.match(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            raise TrackingError(f"no MLflow run '{ref}' in {tracking_uri_now()}") from None
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(exps, run_view_type=ViewType.ACTIVE_ONLY, max_results=50000) if exps else []
    hits = [runs[k] for k in match_run_ref(ref, [(r.info.run_id, r.info.run_name) for r in runs])]
    if len(hits) > 1:
        names = ", ".join(f"{h.info.run_id[:8]} ({h.info.run_name})" for h in hits[:5])
        raise TrackingError(f"'{ref}' names {len(hits)} MLflow runs ({names}): give a longer run id")
    if not hits:
        what = "a model directory nor an MLflow run id" if or_model_dir else "an MLflow run id"
        raise TrackingError(f"'{ref}' is neither {what}, id prefix or run name in {tracking_uri_now()}")
    return hits[0]


def tracking_uri_now() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _has_artifact(run_id: str, path: str) -> bool:
    return bool(_client().list_artifacts(run_id, path))


def _is_model_dir_of(path: Path, run_id: str) -> bool:
    try:
        meta = json.loads((path / MODEL_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("mlflow_run_id") == run_id


def model_dir_of_run(run, cache_dir: str | Path | None = None) -> Path:
    """The model directory of an MLflow run: its local output (train.output_dir/model) when that still
    holds this run's model, else its `model/` artifacts downloaded once into `cache_dir/<run id>/model`
    (default runs/_mlflow)."""
    import mlflow

    run_id = run.info.run_id
    out = run.data.params.get("train.output_dir")
    if out:
        local = resolve_path(out) / "model"
        if _is_model_dir_of(local, run_id):
            return local
    cache = Path(cache_dir) if cache_dir else resolve_path("runs/_mlflow")
    target = cache / run_id / "model"
    if (target / MODEL_META).exists():
        return target
    if not _has_artifact(run_id, "model"):
        kind = run.data.tags.get("spamlingo.kind", "?")
        raise TrackingError(f"MLflow run {run_id} (kind {kind}) has no model/ artifact to evaluate or export")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=tmp))
        if not (local / MODEL_META).exists():
            raise TrackingError(f"MLflow run {run_id}: model/ artifact has no {MODEL_META}")
        shutil.rmtree(target, ignore_errors=True)
        local.rename(target)  # atomic within one filesystem: a half download is never seen as a cache hit
    return target


def is_path_ref(ref: str) -> bool:
    """`RUN=` written as a path (it has a separator or starts with '.'): never looked up as a run."""
    return os.sep in ref or "/" in ref or ref.startswith(".")


def resolve_model_dir(run: str | None, cfg: Config | TrackingConfig | None = None,
                      cache_dir: str | Path | None = None) -> Path:
    """Turn `RUN=` into a trained model directory (one containing spamlingo.json).

    - a directory path -> itself (or its `model/` subdirectory, e.g. runs/default);
    - an MLflow run id, unique id prefix or run name -> that run's model (see `model_dir_of_run`);
    - None -> the newest FINISHED transformer run of cfg.tracking.experiment.
    Raises TrackingError with a clear message otherwise.
    """
    if run:
        path = Path(run).expanduser()
        if not path.exists() and not path.is_absolute() and resolve_path(path).exists():
            path = resolve_path(path)
        if path.exists():
            if path.is_dir() and (path / MODEL_META).exists():
                return path
            if path.is_dir() and (path / "model" / MODEL_META).exists():
                return path / "model"
            raise TrackingError(f"{path} is not a trained model directory (no {MODEL_META} in it)")
        if is_path_ref(run):
            raise TrackingError(f"'{run}' is neither a model directory nor an MLflow run id")
        setup(cfg)
        found = _get_run(run, or_model_dir=True)
        return model_dir_of_run(found, cache_dir)
    found = newest_run(cfg, "transformer")
    if found is None:
        name = _tracking_cfg(cfg).experiment
        hint = _other_experiments_hint(name)
        raise TrackingError(f"no finished training run in MLflow experiment '{name}' ({tracking_uri_now()}): "
                            "run `make train` first, or pass RUN=<run id or model dir>" + (f"; {hint}" if hint else ""))
    return model_dir_of_run(found, cache_dir)


def _other_experiments_hint(name: str) -> str:
    """Where finished training runs are when the config's experiment has none: a run trained with another
    CONFIG (smoke.yaml logs to spamlingo-smoke) is found by passing the same CONFIG again."""
    try:
        client = _client()
        others = []
        for exp in client.search_experiments():
            if exp.name == name:
                continue
            runs = client.search_runs([exp.experiment_id], "tags.`spamlingo.kind` = 'transformer' and "
                                      "attributes.status = 'FINISHED'", max_results=1)
            if runs:
                others.append(exp.name)
    except Exception:  # the hint is a courtesy: never hide the real message behind a store error
        return ""
    if not others:
        return ""
    return (f"the store has training runs in experiment(s) {', '.join(sorted(others))}: pass the CONFIG they "
            "were trained with (e.g. `make eval CONFIG=configs/smoke.yaml`)")


# ------------------------------------------------------------------------------------------ registry


def register(run_id: str | None, name: str, alias: str = "", cfg: Config | TrackingConfig | None = None) -> dict:
    """Register a run's `bundle/` artifact (when the run has one) or else its `model/` artifact as a new
    version of registered model `name`, and point `alias` at it. run_id None = the newest finished
    transformer run. Returns {"name", "version", "alias", "source", "run_id"}."""
    from mlflow.exceptions import MlflowException

    setup(cfg)
    client = _client()
    if run_id:
        run = _get_run(run_id)
    else:
        run = newest_run(cfg, "transformer")
        if run is None:
            raise TrackingError("no finished training run to register: run `make train` first")
    rid = run.info.run_id
    path = next((p for p in ("bundle", "model") if _has_artifact(rid, p)), None)
    if path is None:
        raise TrackingError(f"MLflow run {rid} has neither a bundle/ nor a model/ artifact to register")
    source = f"{run.info.artifact_uri.rstrip('/')}/{path}"
    try:
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(
                name, description="spamlingo multilingual spam classifier (see the run's metrics.md)")
        mv = client.create_model_version(name, source=source, run_id=rid, tags={"spamlingo.artifact": path})
        if alias:
            client.set_registered_model_alias(name, alias, mv.version)
    except MlflowException as e:
        raise TrackingError(f"registering run {rid} as '{name}': {e.message}") from None
    return {"name": name, "version": str(mv.version), "alias": alias, "source": source, "run_id": rid}


# ------------------------------------------------------------------------------------------ command line


def _check_port(host: str, port: int) -> None:
    """Fail at once when the address is taken: mlflow ui would say so only after starting up, in a log
    line, and still exit 0."""
    import socket

    if not 0 <= port <= 65535:
        raise TrackingError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise TrackingError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(addr)
        except OSError as e:
            raise TrackingError(f"cannot listen on {host}:{port}: {e.strerror} (another MLflow UI? "
                                f"pick a port with `python -m training.tracking ui --port N`)") from None


def _ui(cfg: Config, host: str, port: int) -> int:
    _check_port(host, port)
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        setup(cfg)  # creates the database when the store is still empty
    # one worker: a local UI for one person; MLflow's default of 4 takes a minute to start on 2 cores
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    root = artifact_root(uri)
    if root:
        cmd += ["--artifacts-destination", root]
    print(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C stops it)", flush=True)
    # `mlflow ui` runs its web server in processes of its own: started in a session of their own, they are
    # stopped as one group on Ctrl-C or SIGTERM, so no worker outlives this command and keeps the port.
    # MLflow 3 also starts a job runner with seven huey consumer processes (GenAI scorers): not needed to
    # browse runs, and heavy on 2 cores; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in the environment keeps it.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)

    def stop(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        code = proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):  # a worker still alive after its parent exited
            os.killpg(proc.pid, signal.SIGKILL)
    return 0 if code in (-signal.SIGTERM, 0) else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.tracking", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="register a run's model (or bundle) and set an alias")
    reg.add_argument("--run", default=None, help="MLflow run id (default: newest finished training run)")
    reg.add_argument("--name", default="spamlingo", help="registered model name (default: %(default)s)")
    reg.add_argument("--alias", default="champion", help="alias to point at the new version (default: %(default)s)")
    ui = sub.add_parser("ui", help="browse the store with the MLflow UI")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    for p in (reg, ui):
        p.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "ui":
            return _ui(cfg, args.host, args.port)
        out = register(args.run, args.name, args.alias, cfg)
    except (ConfigError, TrackingError) as e:
        fail(str(e))
    alias = f" (alias '{out['alias']}')" if out["alias"] else ""
    print(f"registered {out['source']} as {out['name']} version {out['version']}{alias}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
