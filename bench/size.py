"""Figure size: bundle files on disk, the trained model directory, and parameters before and after the
vocabulary trimming (the backbone report training.backbone.load_backbone returned for the run)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.inputs import Inputs, rel

TITLE = "Model size"
NEEDS = ("model", "bundle")
MB = 1024 * 1024
MODEL_META_NAME = "spamlingo.json"


def backbone_info(inputs: Inputs) -> tuple[dict | None, str]:
    """The run's backbone report: in spamlingo.json, beside the model, or the run's backbone.json artifact."""
    for key in ("backbone_info", "info"):
        if isinstance(inputs.meta.get(key), dict):
            return inputs.meta[key], f"{MODEL_META_NAME}:{key}"
    if inputs.model_dir is not None:
        for p in (inputs.model_dir / "backbone.json", inputs.model_dir.parent / "backbone.json"):
            if p.is_file():
                return json.loads(p.read_text(encoding="utf-8")), rel(p)
    if inputs.run_id:
        try:
            import mlflow

            from training.tracking import setup

            setup(inputs.cfg)
            return mlflow.artifacts.load_dict(f"runs:/{inputs.run_id}/backbone.json"), \
                f"MLflow run {inputs.run_id} backbone.json"
        except Exception:  # an older run without the artifact: report what the files say
            pass
    return None, "not found"



def _dir_mb(d: Path) -> dict[str, float]:
    return {p.name: p.stat().st_size / MB for p in sorted(d.iterdir()) if p.is_file()}


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0) -> dict:
    manifest = json.loads((inputs.bundle_dir / "bundle.json").read_text(encoding="utf-8"))
    files = {name: f["bytes"] / MB for name, f in manifest.get("files", {}).items()}
    files["bundle.json"] = (inputs.bundle_dir / "bundle.json").stat().st_size / MB
    models = manifest.get("models", {})
    out = {"bundle_files_mb": files, "bundle_total_mb": sum(files.values()), "models": models,
           "int8": {k: (manifest.get("int8") or {}).get(k) for k in ("status", "reason")}}
    if models.get("fp32") and models.get("int8") and models["int8"] in files:
        out["int8_over_fp32"] = files[models["int8"]] / files[models["fp32"]]
    if inputs.model_dir is not None:
        md = _dir_mb(inputs.model_dir)
        out["model_dir_files_mb"] = md
        out["model_dir_total_mb"] = sum(md.values())
    info, source = backbone_info(inputs)
    out["backbone_info_source"] = source
    if info:
        trim = info.get("vocab_trim") or {}
        out["parameters"] = {
            "loaded": info.get("parameters_loaded"),
            "before_trimming": trim.get("parameters_before"),
            "after_trimming": trim.get("parameters_after"),
            "final": info.get("parameters"),
            "trainable": info.get("trainable_parameters"),
        }
        out["vocabulary"] = {k: trim.get(k) for k in ("pieces_before", "pieces_kept", "heldout_unk_rate_before",
                                                       "heldout_unk_rate_after", "heldout_resegmented_share")}
        out["vocabulary"]["trimmed"] = bool(trim)
        out["layers"] = info.get("layers")
    return out


def _n(v) -> str:
    return f"{v:,}" if isinstance(v, int) else "—"


def render(result: dict) -> str:
    lines = ["| bundle file | MiB |", "|---|---:|"]
    for name, mb in sorted(result["bundle_files_mb"].items()):
        lines.append(f"| {name} | {mb:.2f} |")
    lines.append(f"| **total** | **{result['bundle_total_mb']:.2f}** |")
    if "int8_over_fp32" in result:
        lines += ["", f"int8 graph / fp32 graph: {result['int8_over_fp32']:.2f}× the size."]
    elif result["int8"].get("status"):
        lines += ["", f"No int8 graph ({result['int8']['status']}: {result['int8'].get('reason') or '—'})."]
    if "model_dir_total_mb" in result:
        lines += ["", f"Trained model directory (PyTorch, save_pretrained): {result['model_dir_total_mb']:.2f} MiB."]
    p = result.get("parameters")
    if p:
        v = result["vocabulary"]
        lines += ["", "| parameters | count |", "|---|---:|",
                  f"| backbone as loaded | {_n(p['loaded'])} |",
                  f"| before vocabulary trimming | {_n(p['before_trimming'])} |",
                  f"| after vocabulary trimming | {_n(p['after_trimming'])} |",
                  f"| final model | {_n(p['final'])} |",
                  f"| trainable | {_n(p['trainable'])} |"]
        if v.get("trimmed"):
            lines += ["", f"Vocabulary: {_n(v['pieces_before'])} → {_n(v['pieces_kept'])} pieces; "
                      "held-out <unk> rate "
                      f"{v['heldout_unk_rate_before']:.4%} → {v['heldout_unk_rate_after']:.4%}, held-out texts "
                      f"segmented differently {v['heldout_resegmented_share']:.2%}."]
        else:
            lines += ["", "Vocabulary not trimmed for this run (model.trim_vocab=false or unsupported tokenizer)."]
        lines += ["", f"Parameter counts from {result['backbone_info_source']}."]
    else:
        lines += ["", "Parameter counts: the run's backbone report was not found."]
    return "\n".join(lines)
