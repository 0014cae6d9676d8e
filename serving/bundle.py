"""The model bundle: the only thing the server reads (docs/DESIGN.md §5).

A bundle is a directory with an ONNX graph (fp32, and int8 when the export's gates passed), the
tokenizer.json the model was trained with and `bundle.json`: labels, thresholds (the global `threshold`
and the per-language policy `thresholds`, serving/thresholds.py), text settings, graph input names, and
the sha256 and size of every other file. `load_bundle` refuses a bundle whose files do
not match their checksums, so a half-copied or edited bundle never serves. No torch or transformers here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import thresholds as TH
from serving.text import Encoder, TextSettings

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
TOKENIZER = "tokenizer.json"
VARIANTS = ("fp32", "int8")
_ROOT = Path(__file__).resolve().parent.parent


class BundleError(RuntimeError):
    """A bundle that cannot be served: missing file, checksum mismatch, unsupported format. One line."""


def file_digest(path: str | Path) -> dict:
    """{"sha256": hex, "bytes": n} of a file, read in chunks (an ONNX graph can be hundreds of MB)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": n}


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Fill `manifest["files"]` with the digest of every file in `directory` (except bundle.json itself)
    and write bundle.json atomically. Returns its path."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            files[p.name] = file_digest(p)
    manifest = {**manifest, "format_version": manifest.get("format_version", FORMAT_VERSION), "files": files}
    out = directory / MANIFEST
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bundle.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")
    os.replace(tmp, out)
    return out


@dataclass
class Bundle:
    """A loaded (and, by default, verified) bundle. `manifest` is bundle.json as read."""

    path: Path
    manifest: dict
    labels: list[str]
    threshold: float  # the global threshold (thresholds["default"])
    text: TextSettings
    inputs: list[str]
    output: str
    models: dict[str, str | None]
    int8: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    created_at: str = ""
    # serving.thresholds policy: bundle.json's "thresholds", or the single threshold of an older bundle
    thresholds: dict = field(default_factory=dict)
    # graph outputs: [output] or [output, "token_scores"] (a mean-pooled model's per-token decomposition of
    # the logit, training/token_scores.py); a bundle exported before lists none: [output]
    outputs: list[str] = field(default_factory=list)
    # a variant's own policy, chosen at export by the model's rule on that graph's validation scores
    # ({"int8": {...}}); a variant without one (fp32, whose scores are the model's) is served with `thresholds`
    thresholds_by_model: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.thresholds:
            self.thresholds = TH.from_threshold(self.threshold)
        if not self.outputs:
            self.outputs = [self.output]

    def policy_for(self, variant: str) -> dict:
        """The threshold policy the `variant` graph is served with: its own when bundle.json has one, else the
        bundle's (the model's, chosen on the PyTorch model's validation scores)."""
        return self.thresholds_by_model.get(variant) or self.thresholds

    @property
    def has_token_scores(self) -> bool:
        return "token_scores" in self.outputs

    @property
    def name(self) -> str:
        return self.path.name

    def has(self, variant: str) -> bool:
        return bool(self.models.get(variant))

    def model_path(self, variant: str) -> Path:
        if variant not in VARIANTS:
            raise BundleError(f"unknown model variant {variant!r} (expected one of {', '.join(VARIANTS)})")
        name = self.models.get(variant)
        if not name:
            why = self.int8.get("reason") if variant == "int8" else ""
            raise BundleError(f"bundle {self.path} has no {variant} model" + (f": {why}" if why else ""))
        return self.path / name

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    def encoder(self) -> Encoder:
        return Encoder.from_file(str(self.tokenizer_path), self.text)

    def summary(self) -> dict[str, Any]:
        """What a server's /info or a log line shows about the bundle."""
        return {
            "name": self.name,
            "format_version": self.manifest.get("format_version"),
            "labels": self.labels,
            "threshold": self.threshold,
            "thresholds_by_lang": dict(self.thresholds.get("by_lang") or {}),
            "text": self.text.to_dict(),
            "models": self.models,
            "int8": self.int8.get("status"),
            "source": self.source,
            "created_at": self.created_at,
        }


def _require(manifest: dict, key: str, directory: Path) -> Any:
    if key not in manifest:
        raise BundleError(f"{directory / MANIFEST}: missing key '{key}'")
    return manifest[key]


def verify_files(directory: Path, manifest: dict) -> None:
    """Every file listed must exist with its recorded size and sha256; every file the bundle needs must be
    listed (otherwise an unlisted, unverified file could be served)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{directory / MANIFEST}: no 'files' checksums")
    needed = [TOKENIZER] + [m for m in manifest.get("models", {}).values() if m]
    for name in needed:
        if name not in files:
            raise BundleError(f"{directory}: {name} is not listed in {MANIFEST} (no checksum to verify)")
    for name, want in sorted(files.items()):
        p = directory / name
        if not p.is_file():
            raise BundleError(f"{directory}: file {name} is missing")
        got = file_digest(p)
        if got["bytes"] != want.get("bytes") or got["sha256"] != want.get("sha256"):
            raise BundleError(
                f"{directory}: checksum mismatch for {name} (expected sha256 {str(want.get('sha256'))[:12]}… "
                f"{want.get('bytes')} bytes, found {got['sha256'][:12]}… {got['bytes']} bytes)"
            )


def load_bundle(directory: str | Path, verify: bool = True) -> Bundle:
    """Read bundle.json and (verify=True) check every file's size and sha256. Raises `BundleError`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle directory not found: {directory}")
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{directory}: file {MANIFEST} is missing (not a bundle; run `make export`)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: expected a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: unsupported format version {version!r} (this build reads version {FORMAT_VERSION}; "
            "re-export the bundle with this version of spamlingo)"
        )
    models = _require(manifest, "models", directory)
    if not isinstance(models, dict) or not models.get("fp32"):
        raise BundleError(f"{mpath}: 'models' must name at least the fp32 graph")
    if verify:
        verify_files(directory, manifest)
    try:
        text = TextSettings.from_dict(_require(manifest, "text", directory))
    except (TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: invalid 'text' settings: {e}") from None
    labels = list(_require(manifest, "labels", directory))
    if len(labels) != 2:
        raise BundleError(f"{mpath}: expected 2 labels, got {labels}")
    _require(manifest, "threshold", directory)
    try:  # a bundle exported before per-language thresholds has only "threshold": a policy of that alone
        policy = TH.from_manifest(manifest)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: invalid thresholds: {e}") from None
    by_model = manifest.get("thresholds_by_model") or {}
    if not isinstance(by_model, dict) or set(by_model) - set(VARIANTS):
        raise BundleError(f"{mpath}: 'thresholds_by_model' must map model variants ({', '.join(VARIANTS)}) "
                          f"to threshold policies, got {by_model!r:.80}")
    try:
        by_model = {v: TH.validate(p) for v, p in by_model.items()}
    except (TypeError, ValueError) as e:
        raise BundleError(f"{mpath}: invalid thresholds_by_model: {e}") from None
    return Bundle(
        path=directory,
        manifest=manifest,
        labels=labels,
        threshold=policy["default"],
        thresholds=policy,
        thresholds_by_model=by_model,
        text=text,
        inputs=list(_require(manifest, "inputs", directory)),
        output=str(manifest.get("output", "logits")),
        outputs=[str(o) for o in manifest.get("outputs") or []],
        models={v: models.get(v) for v in VARIANTS},
        int8=dict(manifest.get("int8") or {}),
        parity=dict(manifest.get("parity") or {}),
        metrics=dict(manifest.get("metrics") or {}),
        source=dict(manifest.get("source") or {}),
        created_at=str(manifest.get("created_at", "")),
    )


def newest_bundle(root: str | Path = "bundles") -> Path:
    """The most recently exported bundle under `root` (by bundle.json's created_at, then mtime)."""
    root = Path(root)
    if not root.is_absolute() and not root.exists() and (_ROOT / root).exists():
        root = _ROOT / root  # `make serve` runs from the repository root; tests and scripts may not
    candidates = []
    for m in root.glob(f"*/{MANIFEST}") if root.is_dir() else []:
        if m.parent.name.startswith("."):  # an export still being written
            continue
        try:
            created = str(json.loads(m.read_text(encoding="utf-8")).get("created_at", ""))
        except (OSError, ValueError):
            created = ""
        candidates.append((created, m.stat().st_mtime, m.parent))
    if not candidates:
        raise BundleError(f"no bundle found under {root} (run `make export` first, or pass --bundle DIR)")
    return max(candidates, key=lambda c: (c[0], c[1]))[2]
