"""What the benchmarks measure: the trained run, its bundle, the prepared test split, and text samples.

Everything is found the way the other commands find it (training.tracking for RUN, serving.bundle for
bundles, the run's spamlingo.json for its data); a missing piece is a `BenchError` that names the `make`
command to run first.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import Config, repo_relative, resolve_path

MODEL_META = "spamlingo.json"


class BenchError(Exception):
    """Something to run first (or a bad argument): printed as one line, exit non-zero."""


@dataclass
class Inputs:
    cfg: Config  # the --config given to bench (experiment, bundle root)
    model_dir: Path | None = None
    meta: dict = field(default_factory=dict)  # the model's spamlingo.json
    bundle_dir: Path | None = None
    bundle_note: str = ""

    @property
    def run_id(self) -> str | None:
        return self.meta.get("mlflow_run_id")

    @property
    def run_ref(self) -> str | None:
        """What to pass as --run to reproduce: the MLflow run id, else the model directory."""
        if self.run_id:
            return self.run_id
        return rel(self.model_dir) if self.model_dir else None

    @property
    def data_dir(self) -> Path | None:
        d = self.meta.get("data_dir")
        return resolve_path(d) if d else None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run_id": self.run_id, "model_dir": rel(self.model_dir) if self.model_dir else None,
                               "bundle": rel(self.bundle_dir) if self.bundle_dir else None,
                               "backbone": self.meta.get("backbone"), "data_dir": self.meta.get("data_dir"),
                               "data_hash": self.meta.get("data_hash")}
        if self.bundle_note:
            out["bundle_note"] = self.bundle_note
        return out


rel = repo_relative  # a path as reports show it


# ------------------------------------------------------------------------------------------ run + bundle


def resolve_model(run: str | None, cfg: Config) -> tuple[Path, dict]:
    """RUN (run id, model dir, or None = newest finished training run) -> (model dir, spamlingo.json)."""
    from training.compare import local_store_missing
    from training.tracking import TrackingError, is_path_ref, resolve_model_dir, tracking_uri

    if not (run and (Path(run).exists() or is_path_ref(run))):  # a path needs no store
        missing = local_store_missing(tracking_uri(cfg))  # looking must not create an empty store
        if missing:
            raise BenchError(f"no MLflow store at {missing}: run `make train` and `make export` first "
                             "(or pass --run MODEL_DIR --bundle DIR)")
    try:
        model_dir = resolve_model_dir(run, cfg)
    except TrackingError as e:
        raise BenchError(f"{e} (bench needs a trained model: `make train`, then `make export`)") from None
    try:
        meta = json.loads((model_dir / MODEL_META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BenchError(f"{model_dir / MODEL_META}: unreadable ({e})") from None
    return model_dir, meta


def _bundle_candidates(root: Path) -> list[tuple[str, float, Path, dict]]:
    out = []
    for m in root.glob("*/bundle.json") if root.is_dir() else []:
        if m.parent.name.startswith("."):
            continue
        try:
            manifest = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out.append((str(manifest.get("created_at", "")), m.stat().st_mtime, m.parent, manifest))
    return sorted(out, key=lambda c: (c[0], c[1]), reverse=True)


def served_bundle(bundle: str | None, inputs: "Inputs") -> Path | None:
    """--bundle DIR, else the newest bundle exported from the run, else None (score the PyTorch model)."""
    try:
        return resolve_bundle(bundle, inputs.cfg, inputs.model_dir, inputs.meta)[0]
    except BenchError:
        if bundle:
            raise
        return None


def resolve_bundle(bundle: str | None, cfg: Config, model_dir: Path | None, meta: dict) -> tuple[Path, str]:
    """--bundle DIR, else the newest bundle under export.output_dir exported from this run (by run id,
    else by model directory). Returns (bundle dir, note)."""
    from serving.bundle import BundleError, load_bundle

    if bundle:
        path = Path(bundle)
        path = path if path.exists() or path.is_absolute() else resolve_path(path)
        try:
            b = load_bundle(path)
        except BundleError as e:
            raise BenchError(str(e)) from None
        src = b.source.get("mlflow_run_id")
        run_id = meta.get("mlflow_run_id")
        note = (f"bundle exported from run {src}, not from the benchmarked run {run_id}"
                if run_id and src and src != run_id else "")
        return path, note
    root = resolve_path(cfg.export.output_dir)
    run_id = meta.get("mlflow_run_id")
    for _created, _mtime, path, manifest in _bundle_candidates(root):
        src = manifest.get("source") or {}
        if run_id and src.get("mlflow_run_id") == run_id:
            return path, ""
        if model_dir is not None and src.get("model_dir") and resolve_path(src["model_dir"]).resolve() == \
                model_dir.resolve():
            return path, ""
    which = f"RUN={run_id}" if run_id else f"RUN={rel(model_dir)}" if model_dir else ""
    raise BenchError(f"no bundle under {rel(root)} was exported from run {run_id or rel(model_dir)}: "
                     f"run `make export {which}` first (or pass --bundle DIR)")


def load_inputs(cfg: Config, run: str | None, bundle: str | None, need_model: bool = True,
                need_bundle: bool = True) -> Inputs:
    inputs = Inputs(cfg)
    if need_model or (need_bundle and not bundle):
        inputs.model_dir, inputs.meta = resolve_model(run, cfg)
    if need_bundle:
        inputs.bundle_dir, inputs.bundle_note = resolve_bundle(bundle, cfg, inputs.model_dir, inputs.meta)
        if not inputs.meta:  # --bundle alone: describe what it was exported from
            inputs.meta = _bundle_meta(inputs.bundle_dir)
    return inputs


def _bundle_meta(bundle_dir: Path) -> dict:
    manifest = json.loads((bundle_dir / "bundle.json").read_text(encoding="utf-8"))
    src = manifest.get("source") or {}
    return {"mlflow_run_id": src.get("mlflow_run_id"), "backbone": src.get("backbone"),
            "data_dir": src.get("data_dir"), "data_hash": src.get("data_hash")}


def run_config(inputs: Inputs) -> tuple[Config, str]:
    """The config the run trained with (its output dir's config.yaml, else its MLflow config.yaml artifact,
    else the bench --config) and where it came from."""
    from training.config import load_config

    candidates = [inputs.model_dir.parent / "config.yaml"] if inputs.model_dir else []
    for path in candidates:
        if path.is_file():
            return load_config(path), str(path)
    if inputs.run_id:
        try:
            import mlflow

            from training.tracking import setup

            setup(inputs.cfg)
            local = mlflow.artifacts.download_artifacts(run_id=inputs.run_id, artifact_path="config.yaml")
            return load_config(local), f"MLflow run {inputs.run_id} config.yaml"
        except Exception:  # an old run without the artifact: fall back to the bench config
            pass
    return inputs.cfg, "the bench --config (the run's own config was not found)"


# ------------------------------------------------------------------------------------------ data


def load_split(inputs: Inputs, split: str = "test"):
    """A split of the prepared data the model was trained on (its spamlingo.json's data_dir)."""
    from datasets import load_from_disk

    # The data the model was trained on (spamlingo.json's data_dir), else the --config's prepared data.
    d = inputs.data_dir or resolve_path(inputs.cfg.data.output_dir)
    if not (d / "dataset").is_dir():
        raise BenchError(f"prepared data {rel(d)} is missing: run `make data` (with the run's config) first")
    return load_from_disk(str(d / "dataset"))[split]


def sample_rows(ds, n: int, seed: int, channel: str | None = None) -> list[dict]:
    """`n` rows of a split (all when fewer), seeded; only rows of `channel` (sms/email) when given."""
    idx = list(range(len(ds)))
    if channel is not None:
        channels = ds["channel"]
        idx = [i for i in idx if channels[i] == channel]
    rng = random.Random(seed)
    rng.shuffle(idx)
    idx = sorted(idx[:n])
    return [ds[i] for i in idx]
