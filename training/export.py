"""Export a trained model directory to a serving bundle (docs/DESIGN.md §5), gated by parity checks.

    python -m training.export --config configs/default.yaml [--run RUN] [--register NAME] [key=value ...]
    make export RUN=<mlflow run id | model dir>            # RUN unset: the newest finished training run

Steps
1. Resolve RUN to a model directory (a directory is used as is; an MLflow run id through
   training.tracking.resolve_model_dir) and read its spamlingo.json (labels, threshold, text settings).
2. fp32 graph (training/onnx_graph.py): torch.onnx.export with dynamic batch and sequence axes at opset
   `export.opset`. The TorchScript exporter (dynamo=False) is tried first: on BERT-style encoders in torch
   2.13 it is ~20x faster to export, emits opset 17 natively, and its graph runs ~3x faster in ONNX Runtime
   than the dynamo graph (whose attention ONNX Runtime's BERT fusions do not recognise). The dynamo exporter
   is the fallback (`--exporter` chooses). Attention is exported in its "eager" form, which ONNX Runtime fuses.
3. Parity gate (fp32): ONNX Runtime vs PyTorch on validation texts: max |Δlogit| <= export.max_abs_logit_diff
   and the same label on every row (each row at its language's threshold from the model's policy,
   serving/thresholds.py), else the export fails. With `export.optimize`, ONNX Runtime's
   transformer fusions are applied and kept only if the fused graph passes the same gate.
4. int8 (dynamic quantisation), remedies tried in order until one passes the int8 gate (label agreement
   with fp32 >= export.int8_min_agreement, spam-F1 drop <= export.int8_max_f1_drop overall and per
   language, where a language with one label changed passes), from training/quantize.py: plain;
   per-channel; per-channel + reduced range; the feed-forward output projections, then every layer
   MatMul, in 8-bit blocks (MatMulNBits: a scale per 32 weights and per
   32 activations); the feed-forward output projections in fp32 (lowest layers first, then all); per-channel
   without the last encoder layer and the embeddings; weight-only 8-bit MatMuls everywhere. None passing:
   the bundle ships fp32 only and says why.
5. bundles/<name>/: model.onnx, model.int8.onnx, tokenizer.json, bundle.json (checksums of every file);
   logged to the source MLflow run as `bundle/`, and with --register NAME registered as a model version.

All text goes through serving.text (normalize + Encoder), and the ONNX side of every parity check runs
through serving.inference.Classifier: the gates measure exactly what the server will run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from serving import thresholds as TH
from serving.bundle import FORMAT_VERSION, TOKENIZER, BundleError, load_bundle, write_manifest
from serving.inference import Classifier, Prepared, prepare_texts, spam_probability
from serving.text import Encoder, TextSettings
from training import token_scores as TS
from training.onnx_graph import GRAPH_INPUTS, OUTPUT, example_batch, export_graph, optimize_graph, torch_logits
from training.parity import fp32_parity, int8_parity, parity_table
from training.quantize import int8_recipes, quantize
from training.config import Config, ConfigError, cli_args, fail, load_config, resolve_path

MODEL_META = "spamlingo.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
EXPORTERS = ("auto", "torchscript", "dynamo")


class ExportError(Exception):
    """The export cannot proceed or its result fails a gate: one clear line for the terminal."""


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text else '(no message)'}"


# ------------------------------------------------------------------------------------------ source


def read_model_meta(model_dir: Path) -> dict:
    path = model_dir / MODEL_META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{model_dir} is not a trained model directory (no {MODEL_META} in it)") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read ({e})") from None
    for key in ("labels", "threshold", "text"):
        if key not in meta:
            raise ExportError(f"{path}: missing key '{key}'")
    try:
        TH.from_manifest(meta)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: invalid thresholds: {e}") from None
    if not (model_dir / TOKENIZER).exists():
        raise ExportError(f"{model_dir}: {TOKENIZER} is missing (the serving tokenizer must be exported)")
    return meta


def resolve_source(run: str | None, cfg: Config) -> Path:
    """RUN -> model directory: an existing directory as is (or its model/ subdirectory), else an MLflow
    run id (None = newest finished run) through training.tracking."""
    if run:
        path = Path(run).expanduser()
        if not path.exists() and not path.is_absolute() and resolve_path(path).exists():
            path = resolve_path(path)
        if path.is_dir():
            if (path / MODEL_META).exists():
                return path
            if (path / "model" / MODEL_META).exists():
                return path / "model"
            raise ExportError(f"{path} is not a trained model directory (no {MODEL_META} in it)")
        if path.exists():
            raise ExportError(f"--run {run}: expected a model directory or an MLflow run id, got a file")
    try:
        from training import tracking
    except ImportError as e:  # tracking not installed/written: only directories can be exported
        raise ExportError(f"cannot resolve {'run ' + repr(run) if run else 'the newest run'} without MLflow "
                          f"tracking ({e}); pass --run <model directory>") from None
    try:
        return Path(tracking.resolve_model_dir(run, cfg))
    except tracking.TrackingError as e:
        raise ExportError(str(e)) from None


def bundle_name(model_dir: Path, meta: dict, run_name: str | None = None) -> str:
    """bundles/<name>: the MLflow run name when known, else the run directory (runs/<name>/model), with the
    suffix of a derived model directory (runs/<name>/model-wise0.5 -> <name>-wise0.5, make interpolate)."""
    derived = model_dir.name == "model" or model_dir.name.startswith("model-")
    name = run_name or (model_dir.parent.name + model_dir.name[len("model"):] if derived else model_dir.name)
    if name == "model" and meta.get("mlflow_run_id"):  # a downloaded runs/_mlflow/<id>/model
        name = meta["mlflow_run_id"]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _mlflow_run_name(run_id: str | None, cfg: Config) -> str | None:
    if not run_id:
        return None
    try:
        from training import tracking

        from mlflow import MlflowClient

        tracking.setup(cfg)
        return MlflowClient().get_run(run_id).info.run_name
    except Exception:  # the model dir may come from another store; the directory name will do
        return None


# ------------------------------------------------------------------------------------------ parity data


@dataclass
class ParityData:
    texts: list[str]
    labels: list[int]
    source: str
    whole_validation: bool = False  # every row of the model's validation split: thresholds can be chosen on it
    sources: list[str] = field(default_factory=list)  # each row's source (validation rows)
    train: Any = None  # the training split beside that validation split (its unread ham: eval.threshold_unread_ham)


def check_export_config(ecfg) -> None:
    """Reject export settings that would fail late (after minutes of export) or make no sense."""
    checks = [
        (14 <= ecfg.opset <= 21, f"export.opset must be between 14 and 21 (ONNX Runtime's range for this "
                                 f"graph's operators), got {ecfg.opset}"),
        (ecfg.parity_rows >= 0, f"export.parity_rows must be >= 0 (0 = every validation row), got {ecfg.parity_rows}"),
        (ecfg.max_abs_logit_diff >= 0, f"export.max_abs_logit_diff must be >= 0, got {ecfg.max_abs_logit_diff}"),
        (ecfg.int8_min_agreement >= 0, f"export.int8_min_agreement must be >= 0, got {ecfg.int8_min_agreement}"),
        (ecfg.int8_max_f1_drop >= 0, f"export.int8_max_f1_drop must be >= 0, got {ecfg.int8_max_f1_drop}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load_parity_data(model_dir: Path, meta: dict, cfg: Config, rows: int) -> ParityData:
    """The validation split the model was selected on (spamlingo.json data_dir, else data.output_dir),
    `rows` of it (0 = all) drawn with the data seed, so the same export measures the same rows."""
    import numpy as np

    candidates = [meta.get("data_dir"), cfg.data.output_dir]
    tried = []
    for c in [c for c in candidates if c]:
        base = resolve_path(c)
        for d in (base / "dataset", base):
            tried.append(str(d))
            if (d / "dataset_dict.json").exists():
                from datasets import load_from_disk

                dd = load_from_disk(str(d))
                split = dd.get("validation")
                if split is None or len(split) == 0:
                    continue
                n = len(split)
                idx = np.arange(n)
                if rows and rows < n:
                    idx = np.sort(np.random.RandomState(cfg.data.seed).permutation(n)[:rows])
                sub = split.select(idx.tolist())
                return ParityData(list(sub["text"]), [int(x) for x in sub["label"]],
                                  f"validation split of {d} ({len(idx)} of {n} rows)", whole_validation=len(idx) == n,
                                  sources=list(sub["source"]), train=dd.get("train"))
    raise ExportError("no validation data for the parity gates (looked in " + ", ".join(dict.fromkeys(tried))
                      + "): run `make data` with the config the model was trained on")


# ------------------------------------------------------------------------------------------ torch side


def load_torch_model(model_dir: Path):
    from transformers.utils import logging as hf_logging

    from training.modeling import load_classifier

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" of a model this command just trained
    try:
        model = load_classifier(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExportError(f"{model_dir}: cannot load the model ({_first_line(e)})") from None
    return model.eval()


# ------------------------------------------------------------------------------------------ manifest


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------ export


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: dict
    int8_passed: bool
    table: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Work:
    """What the export steps share: the bundle being built (in a temporary directory) and the parity rows,
    already prepared through serving's text path, with their PyTorch reference logits."""

    tmp: Path
    base: dict  # the manifest fields known before any graph exists
    prepared: list[Prepared]
    ref: Any  # np.ndarray (n, 2): PyTorch logits
    threshold: Any  # np.ndarray (n,): each parity row's threshold (the policy at the row's language)
    threads: int

    @property
    def fp32(self) -> Path:
        return self.tmp / FP32_FILE

    @property
    def unfused(self) -> Path:
        """The fp32 graph fused but for attention (written by _fuse; absent when nothing was fused)."""
        return self.tmp / ".unfused.onnx"

    def classifier(self, variant: str = "fp32") -> Classifier:
        """serving.inference.Classifier of the bundle's current graph."""
        write_manifest(self.tmp, {**self.base, "models": {"fp32": FP32_FILE,
                                                          "int8": INT8_FILE if variant == "int8" else None}})
        return Classifier(load_bundle(self.tmp, verify=False), variant, threads=self.threads)

    def token_scores_gate(self, variant: str) -> dict | None:
        """training/token_scores.py's check of the current graph; None when the model has no token_scores."""
        if self.base.get("token_scores") is None:
            return None
        limit = TS.FP32_LIMIT if variant == "fp32" else TS.INT8_LIMIT
        return TS.gate(self.classifier(variant), self.prepared, self.base["token_scores"]["bias"], limit)

    def onnx_logits(self, variant: str = "fp32") -> tuple[Any, float]:
        """Logits of the bundle's current graph through serving.inference.Classifier, and the seconds taken."""
        clf = self.classifier(variant)
        clf.logits(self.prepared[:1])  # warm-up: the first run allocates; keep it out of the timing
        t0 = time.perf_counter()
        logits = clf.logits(self.prepared)
        return logits, time.perf_counter() - t0

    def fp32_gate(self, limit: float) -> dict:
        return fp32_parity(self.ref, self.onnx_logits("fp32")[0], self.threshold, limit)


def _export_fp32(work: _Work, model, example, cfg_export, exporter: str, say) -> tuple[dict, dict]:
    """The first exporter whose graph passes fp32 parity; ExportError when none does."""
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    attempts = []
    for which in order:
        try:
            info = export_graph(model, work.fp32, example, cfg_export.opset, which)
        except Exception as e:  # an exporter failure is a reason to try the next one, not a crash
            attempts.append({"exporter": which, "error": _first_line(e)})
            say(f"  {which} exporter failed: {attempts[-1]['error']}")
            continue
        gate = work.fp32_gate(cfg_export.max_abs_logit_diff)
        attempts.append({"exporter": which, "max_abs_logit_diff": gate["max_abs_logit_diff"],
                         "label_mismatches": gate["label_mismatches"], "passed": gate["passed"]})
        if gate["passed"]:
            return {**info, "attempts": attempts}, gate
        say(f"  {which} graph fails fp32 parity: max |Δlogit| {gate['max_abs_logit_diff']:.3g}, "
            f"{gate['label_mismatches']} label mismatches")
    raise ExportError(f"fp32 parity failed for every exporter ({', '.join(order)}): " + "; ".join(
        f"{a['exporter']}: " + (a.get("error") or f"max |Δlogit| {a['max_abs_logit_diff']:.3g} (limit "
                                                  f"{cfg_export.max_abs_logit_diff}), {a['label_mismatches']} label mismatches")
        for a in attempts))


def _fuse(work: _Work, model_config, gate: dict, limit: float) -> tuple[dict, dict]:
    """Replace the fp32 graph by its fused form when that passes the same parity gate."""
    fused = work.tmp / ".fused.onnx"
    try:
        opt = optimize_graph(work.fp32, fused, model_config)
    except Exception as e:
        opt = {"applied": False, "reason": f"optimizer failed: {_first_line(e, 200)}"}
    if not opt.get("applied"):
        return opt, gate
    plain = work.tmp / ".plain.onnx"
    work.fp32.rename(plain)
    fused.rename(work.fp32)
    fused_gate = work.fp32_gate(limit)
    if fused_gate["passed"]:
        try:  # the source of the int8 recipe whose attention projections are 8-bit blocks too
            optimize_graph(plain, work.unfused, model_config, attention=False)
        except Exception:
            work.unfused.unlink(missing_ok=True)
        plain.unlink()
        return opt, fused_gate
    work.fp32.unlink()
    plain.rename(work.fp32)
    return {"applied": False, "fused": opt["fused"],
            "reason": f"fused graph failed parity (max |Δlogit| {fused_gate['max_abs_logit_diff']:.3g}, "
                      f"{fused_gate['label_mismatches']} label mismatches); kept the plain graph"}, gate


def _int8(work: _Work, labels, langs, p32, num_layers: int, cfg_export, show: bool):
    """Try the int8 recipes in order; returns (int8 record, gate of the shipped recipe or None,
    spam probabilities of the shipped graph or None, seconds of its parity pass or None)."""
    import numpy as np
    from tqdm.auto import tqdm

    record: dict[str, Any] = {"status": "failed", "recipe": None, "reason": "", "attempts": []}
    qpath = work.tmp / INT8_FILE
    unfused = work.unfused if work.unfused.is_file() else None
    recipes = int8_recipes(work.fp32, num_layers, unfused)
    if work.base.get("token_scores") is not None:
        recipes = TS.keep_head_fp32(recipes, work.fp32)
    for recipe in tqdm(recipes, desc="int8 recipes", unit="recipe",
                       disable=not show, leave=False):
        shown = {k: (len(v) if isinstance(v, list) else v) for k, v in recipe.items()}  # node lists: counted
        try:
            quantize(unfused if recipe.get("source") == "unfused" else work.fp32, qpath, recipe)
            logits8, seconds = work.onnx_logits("int8")
        except Exception as e:  # a recipe ONNX Runtime cannot build or run is a failed recipe
            record["attempts"].append({**shown, "error": _first_line(e)})
            qpath.unlink(missing_ok=True)
            continue
        p8 = spam_probability(logits8)
        gate = int8_parity(labels, langs, p32, p8, work.threshold, cfg_export.int8_min_agreement,
                           cfg_export.int8_max_f1_drop)
        scores = work.token_scores_gate("int8") if gate["passed"] else None
        if scores and not scores["passed"]:  # the explanations of this graph would not add up to its logits
            gate.update(passed=False, reason=f"token_scores: max |sum + bias - z| {scores['max_abs_sum_error']:.3g} "
                                             f"> {scores['limit']}")
        record["attempts"].append({**shown, "label_agreement": gate["label_agreement"],
                                   "f1_drop": gate["scopes"]["overall"]["f1_drop"],
                                   "passed": gate["passed"], "reason": gate["reason"]})
        if gate["passed"]:
            record.update(status="passed", recipe=recipe)
            return record, {**gate, "token_scores": scores}, np.asarray(p8), seconds
        qpath.unlink(missing_ok=True)
    record["reason"] = "no int8 recipe passed the gates (" + "; ".join(
        f"{a['name']}: {a.get('reason') or a.get('error')}" for a in record["attempts"]) + ")"
    return record, None, None, None


def _metrics_at(labels, probs, langs, threshold) -> dict:
    from training.metrics import grouped_metrics

    keep = ("support", "positives", "precision", "recall", "f1", "fpr", "accuracy", "roc_auc", "pr_auc")
    g = grouped_metrics(labels, probs, threshold, {"lang": list(langs)})
    return {scope: {k: m[k] for k in keep} for scope, m in g.items()}


def _publish(tmp: Path, target: Path) -> None:
    """Swap the finished bundle into place; a server reading the old one never sees a half-written one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{time.time_ns()}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(
    cfg: Config,
    model_dir: str | Path,
    *,
    texts: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    out_root: str | Path | None = None,
    name: str | None = None,
    exporter: str = "auto",
    show: bool = True,
    threads: int = 0,
) -> ExportResult:
    """Export `model_dir` (DESIGN §3) into `<out_root or export.output_dir>/<name>/`.

    Parity is measured on `texts`/`labels` when given, else on the model's validation split. Raises
    ExportError when fp32 parity fails (nothing is written then). `threads`: torch and ONNX Runtime
    threads for the parity passes (0 = their defaults)."""
    import onnxruntime
    import torch

    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    # a bundle is one directory under export.output_dir; a leading dot would hide it from newest_bundle
    if name and (name.startswith(".") or "/" in name or "\\" in name):
        raise ExportError(f"--name must be a plain directory name (no '/', not starting with '.'), got {name!r}")
    ecfg = cfg.export
    check_export_config(ecfg)
    model_dir = Path(model_dir).resolve()
    meta = read_model_meta(model_dir)
    try:
        settings = TextSettings.from_dict(meta["text"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"{model_dir / MODEL_META}: invalid 'text' settings: {e}") from None
    policy = TH.from_manifest(meta)  # checked by read_model_meta
    threshold = policy["default"]
    run_id = meta.get("mlflow_run_id")
    if texts is None:
        data = load_parity_data(model_dir, meta, cfg, ecfg.parity_rows)
    elif labels is None or len(labels) != len(texts):
        raise ExportError("explicit parity texts need one label each")
    else:
        data = ParityData(list(texts), [int(x) for x in labels], f"{len(texts)} given texts")
    if not data.texts:
        raise ExportError("no texts for the parity gates")

    out_root = resolve_path(out_root or ecfg.output_dir)
    name = name or bundle_name(model_dir, meta, _mlflow_run_name(run_id, cfg))
    out_root.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if show else (lambda msg: None)
    say(f"export: {model_dir} -> {out_root / name}  (parity rows: {data.source})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_root))  # dot: newest_bundle skips it
    torch_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        shutil.copyfile(model_dir / TOKENIZER, tmp / TOKENIZER)
        base = {"format_version": FORMAT_VERSION, "labels": list(meta["labels"]), "threshold": threshold,
                "thresholds": policy, "threshold_rule": meta.get("threshold_rule"), "text": settings.to_dict(),
                "inputs": list(GRAPH_INPUTS), "output": OUTPUT}
        model = load_torch_model(model_dir)
        base["outputs"] = TS.outputs(model, OUTPUT)  # a mean-pooled model's graph also has token_scores
        if len(base["outputs"]) > 1:
            base["token_scores"] = TS.manifest_entry(model)
        # Text prepared once through serving's path, with the bundle's own tokenizer.json and settings;
        # the PyTorch reference runs on exactly those token ids.
        encoder = Encoder.from_file(str(tmp / TOKENIZER), settings)
        prepared = prepare_texts(encoder, settings, data.texts)
        langs = [p.lang for p in prepared]
        row_thresholds = TH.thresholds_for(policy, langs)[0]  # the labels the server will give these rows
        torch_logits(model, encoder, prepared[:1])  # warm-up, kept out of the timing
        t0 = time.perf_counter()
        ref = torch_logits(model, encoder, prepared, show=show)
        torch_seconds = time.perf_counter() - t0
        work = _Work(tmp, base, prepared, ref, row_thresholds, threads)

        if hasattr(model, "set_attn_implementation"):
            with contextlib.suppress(Exception):  # the attention pattern ONNX Runtime's fusions match
                model.set_attn_implementation("eager")
        graph, fp32_gate = _export_fp32(work, model, example_batch(encoder, prepared), ecfg, exporter, say)
        graph["onnxruntime"] = onnxruntime.__version__
        if ecfg.optimize:
            graph["optimization"], fp32_gate = _fuse(work, model.config, fp32_gate, ecfg.max_abs_logit_diff)
        else:
            graph["optimization"] = {"applied": False, "reason": "export.optimize=false"}
        logits32, fp32_seconds = work.onnx_logits("fp32")
        p32 = spam_probability(logits32)
        scores_gate = {"fp32": work.token_scores_gate("fp32"), "int8": None}
        if scores_gate["fp32"] and not scores_gate["fp32"]["passed"]:
            g = scores_gate["fp32"]
            raise ExportError(f"token_scores do not decompose the logits in the fp32 graph: max |sum + bias - z| "
                              f"{g['max_abs_sum_error']:.3g} (limit {g['limit']}), padding up to "
                              f"{g['max_abs_padding_score']:.3g}")

        num_layers = int(getattr(model.config, "num_hidden_layers", 1) or 1)
        int8, int8_gate, p8, int8_seconds = _int8(work, data.labels, langs, p32, num_layers, ecfg, show)
        if p8 is not None:
            scores_gate["int8"] = int8_gate.pop("token_scores", None)
        notes = [] if p8 is not None else [f"int8 not shipped: {int8['reason']}"]

        own, why_not = None, ""
        if p8 is not None and ecfg.int8_own_thresholds:
            pool = _int8_pool(cfg, policy, data, work, encoder, settings, show, meta.get("rows_read"))
            own, why_not = variant_policy(policy, data, p8, langs, pool)
        if why_not:
            notes.append(f"int8 served at the model's thresholds: {why_not}")
        n = len(prepared)
        speed = {"rows": n, "torch_ms_per_text": 1000 * torch_seconds / n, "fp32_ms_per_text": 1000 * fp32_seconds / n}
        metrics = {"rows": n, "fp32": _metrics_at(data.labels, p32, langs, row_thresholds)}
        if p8 is not None:
            speed["int8_ms_per_text"] = 1000 * int8_seconds / n
            metrics["int8"] = _metrics_at(data.labels, p8, langs, TH.thresholds_for(own or policy, langs)[0])
        manifest = {
            **base,
            **({"thresholds_by_model": {"int8": own}} if own else {}),
            "models": {"fp32": FP32_FILE, "int8": INT8_FILE if p8 is not None else None},
            "int8": int8,
            "parity": {"rows": n, "data": data.source, "fp32": fp32_gate, "int8": int8_gate,
                       **({"token_scores": scores_gate} if scores_gate["fp32"] else {})},
            "graph": graph,
            "metrics": {"training": meta.get("metrics", {}), "export": metrics, "speed_at_export": speed},
            "source": {"mlflow_run_id": run_id, "backbone": meta.get("backbone"), "model_dir": str(model_dir),
                       "data_dir": meta.get("data_dir"), "data_hash": meta.get("data_hash")},
            "export_config": asdict(ecfg),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for p in tmp.iterdir():  # scratch files (.plain/.fused/.shapes graphs, manifest temp files)
            if p.name.startswith("."):
                p.unlink()
        write_manifest(tmp, _nan_to_none(manifest))
        load_bundle(tmp)  # verifies as the server will load it
        target = out_root / name
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(torch_threads)
    manifest = json.loads((target / "bundle.json").read_text(encoding="utf-8"))
    return ExportResult(target, manifest, p8 is not None, parity_table(manifest), notes)


def _int8_pool(cfg: Config, policy: dict, data: ParityData, work: _Work, encoder, settings, show: bool,
               read: dict | None):
    """The unread training ham scored by the int8 graph, when the model's threshold was chosen with it
    (`eval.threshold_unread_ham`), so that the graph's own threshold is chosen by the same rule; else None."""
    if not (policy.get("global") or {}).get("pool") or data.train is None or not data.whole_validation:
        return None
    import numpy as np
    from tqdm.auto import tqdm

    from training.config import with_overrides
    from training.rows import ham_pool

    clf = work.classifier("int8")

    def score(texts: list[str]):
        chunks = range(0, len(texts), 256)
        return np.concatenate([spam_probability(clf.logits(prepare_texts(encoder, settings, texts[i:i + 256])))
                               for i in tqdm(chunks, desc="int8 graph: unread training ham", unit="batch",
                                             disable=not show, leave=False, file=sys.stderr)])

    return ham_pool(with_overrides(cfg, ["eval.threshold_unread_ham=true"]), data.train, data.sources, score, read,
                    show=show)


def variant_policy(policy: dict, data: ParityData, p_spam, langs: list[str], pool=None) -> tuple[dict | None, str]:
    """(policy, "") of the model's threshold rule applied again to a graph's own scores on the whole
    validation split (and on `pool`, the unread training ham as the graph scores it, when the model's was
    chosen with it): an int8 graph's scores move a little near the threshold, and the served graph should
    flag the share of validation ham the rule says. (None, why) when that cannot be done."""
    from training.metrics import THRESHOLD_RULES, threshold_policy

    if policy.get("rule") not in THRESHOLD_RULES or policy.get("target_fpr") is None:
        return None, f"the model's threshold records no rule to apply again ({policy.get('rule') or 'none'})"
    if not data.whole_validation:
        return None, (f"the parity rows ({data.source}) are not the whole validation split "
                      "(export.parity_rows=0 reads it all)")
    rows = policy.get("min_rows") or {}
    spread = (policy.get("global") or {}).get("spread") or {}
    return threshold_policy(data.labels, p_spam, langs, policy["rule"], float(policy["target_fpr"]),
                            int(rows.get("ham", 100)), int(rows.get("spam", 20)),
                            per_language=bool(policy.get("per_language", bool(policy.get("by_lang")))),
                            raise_only=bool(policy.get("raise_only", False)),
                            spread_resamples=int(spread.get("resamples", 0)), pool=pool,
                            language_balanced=bool(policy.get("language_balanced", False)),
                            max_language_fpr=float(policy.get("max_language_fpr") or 0.0)), ""


# ------------------------------------------------------------------------------------------ MLflow


def log_to_mlflow(result: ExportResult, cfg: Config, register: str | None = None) -> dict:
    """Log the bundle to its source run as artifacts `bundle/`; with `register`, register it."""
    run_id = result.manifest["source"].get("mlflow_run_id")
    if not run_id:
        return {}
    from mlflow import MlflowClient

    from training import tracking

    tracking.setup(cfg)
    MlflowClient().log_artifacts(run_id, str(result.bundle_dir), "bundle")
    out = {"logged": f"runs:/{run_id}/bundle"}
    if register:
        out["registered"] = tracking.register(run_id, register, "", cfg)
    return out


# ------------------------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    parser = cli_args(argv, "Export a trained model to an ONNX bundle (fp32 + int8), parity-gated.")
    parser.add_argument("--run", default=None, help="MLflow run id or model directory (default: newest run)")
    parser.add_argument("--register", default=None, metavar="NAME",
                        help="also register the bundle as a version of MLflow model NAME")
    parser.add_argument("--exporter", default="auto", choices=EXPORTERS,
                        help="torch.onnx path: auto = TorchScript, then dynamo (default: %(default)s)")
    parser.add_argument("--name", default=None, help="bundle directory name (default: run name)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        model_dir = resolve_source(args.run, cfg)
        meta = read_model_meta(model_dir)
        if args.register and not meta.get("mlflow_run_id"):
            raise ExportError(f"--register needs a model from an MLflow run; {model_dir} has no mlflow_run_id")
        result = export_bundle(cfg, model_dir, name=args.name, exporter=args.exporter)
    except (ConfigError, ExportError, BundleError) as e:
        fail(str(e))
    print(result.table)
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    try:
        logged = log_to_mlflow(result, cfg, args.register)
    except Exception as e:  # the bundle is on disk and valid; a tracking problem must not hide that
        msg = getattr(e, "message", None) or _first_line(e)
        print(f"warning: bundle not logged to MLflow: {msg}", file=sys.stderr)
        if args.register:
            fail(f"registering the bundle failed: {msg}")
        logged = {}
    if logged.get("logged"):
        print(f"logged {logged['logged']}")
    if logged.get("registered"):
        r = logged["registered"]
        print(f"registered {r['source']} as {r['name']} version {r['version']}")
    print(f"bundle: {result.bundle_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
