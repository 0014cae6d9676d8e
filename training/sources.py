"""Read labelled corpora: steps 1-2 of `training.data` (one reader for CSV/TSV/JSONL, optionally .gz).

Every row is normalised with `serving.text.normalize` (the function serving uses); bad rows are dropped and
counted per reason in a `DropLog`; a missing file or column, or a file whose labels mostly cannot be parsed,
is a `DataError`. `read_labelled_file` is the same reader for any file outside the config (`make eval DATA=`).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from serving.text import language_tag, normalize
from training.config import CorpusConfig, DataConfig, resolve_path

CHANNELS = ("sms", "email", "other")
FORMATS = ("csv", "tsv", "jsonl")
FEEDBACK = "feedback"  # a corpus read from the server's feedback store (training/feedback_data.py)
_LABELS = {"spam": 1, "ham": 0, "1": 1, "0": 0, "true": 1, "false": 0, "1.0": 1, "0.0": 0}
# A file where more than this share of the labels is unknown has the wrong column or label scheme.
MAX_UNKNOWN_LABEL_SHARE = 0.5
# Lone surrogates: what undecodable bytes become under errors="surrogateescape".
_SURROGATE = re.compile("[\ud800-\udfff]")

csv.field_size_limit(sys.maxsize)  # e-mail bodies exceed the 128 kB default

class DataError(ValueError):
    """A user mistake in the data (missing file or column, unparseable labels): names file, column, value."""


def parse_label(value: Any) -> int | None:
    """spam/ham, 1/0, true/false (any case, surrounding spaces ignored) -> 1/0; anything else -> None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value) if value in (0, 1) else None
    if isinstance(value, str):
        return _LABELS.get(value.strip().lower())
    return None


# ------------------------------------------------------------------------------------------ drop log


@dataclass
class DropLog:
    """Rows left out, counted per source and reason, with a few examples (ids or label values)."""

    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    examples: dict[str, dict[str, list[str]]] = field(default_factory=lambda: defaultdict(dict))
    unknown_labels: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def add(self, source: str, reason: str, example: str = "") -> None:
        self.counts[source][reason] += 1
        ex = self.examples[source].setdefault(reason, [])
        if example and len(ex) < 3:
            ex.append(example)

    def by_reason(self) -> dict[str, int]:
        total: Counter = Counter()
        for c in self.counts.values():
            total.update(c)
        return dict(sorted(total.items()))

    def total(self, source: str) -> int:
        return sum(self.counts[source].values()) if source in self.counts else 0

    def summary(self) -> str:
        return ", ".join(f"{r}: {n}" for r, n in self.by_reason().items()) or "none"


# ------------------------------------------------------------------------------------------ reading files


@dataclass
class FileSpec:
    """How to read one labelled file: the CorpusConfig fields that matter to the reader."""

    text: str = "text"
    label: str = "label"
    subject: str = ""
    id: str = ""
    source_column: str = ""  # read_labelled_file: optional per-row source column
    format: str = ""
    header: bool = True
    columns: list[str] = field(default_factory=list)
    quoting: str = "minimal"
    hint: str = ""  # where the setting lives, for error messages (e.g. "data.corpora.uci_sms")


def _file_format(path: Path, fmt: str, hint: str) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise DataError(f"{hint + '.format: ' if hint else ''}unknown format {fmt!r} for {path} "
                            f"(expected one of {', '.join(FORMATS)})")
        return fmt
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    ext = {"ndjson": "jsonl", "txt": "tsv"}.get(ext, ext)
    if ext not in FORMATS:
        raise DataError(f"{path}: cannot tell the format from the extension; set "
                        f"{hint + '.format' if hint else 'the format'} to one of {', '.join(FORMATS)}")
    return ext


def _open_text(path: Path):
    # surrogateescape: undecodable bytes survive as lone surrogates, so the row (not the file) is dropped.
    raw = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _required_columns(spec: FileSpec) -> list[tuple[str, str]]:
    cols = [("text", spec.text), ("label", spec.label)]
    if spec.subject:
        cols.append(("subject", spec.subject))
    if spec.id:
        cols.append(("id", spec.id))
    return cols


def _missing_column(path: Path, key: str, column: str, available: list[str], hint: str) -> DataError:
    where = f" (set {hint}.{key})" if hint else ""
    return DataError(f"{path}: no column {column!r} for the {key}{where}; columns are: "
                     f"{', '.join(map(repr, available)) or 'none'}")


def _iter_records(path: Path, spec: FileSpec) -> Iterator[tuple[int, dict | None]]:
    """Yield (line number where the record starts, {column: value}) or (line, None) for a malformed row."""
    fmt = _file_format(path, spec.format, spec.hint)
    with _open_text(path) as f:
        if fmt == "jsonl":
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    rec = None
                yield line_no, rec if isinstance(rec, dict) else None
            return
        quoting = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}.get(spec.quoting)
        if quoting is None:
            raise DataError(f"{spec.hint + '.quoting: ' if spec.hint else ''}unknown quoting "
                            f"{spec.quoting!r} (expected minimal or none)")
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",", quoting=quoting)
        if spec.header:
            try:
                names = next(reader)
            except StopIteration:
                raise DataError(f"{path}: the file is empty (no header row)") from None
        else:
            if not spec.columns:
                raise DataError(f"{path}: header is false but no columns are named "
                                f"(set {spec.hint + '.columns' if spec.hint else 'columns'})")
            names = list(spec.columns)
        for key, col in _required_columns(spec):
            if col not in names:
                raise _missing_column(path, key, col, names, spec.hint)
        start = reader.line_num + 1
        for row in reader:
            line_no, start = start, reader.line_num + 1
            if not row:
                continue  # a blank line is not a record
            yield line_no, dict(zip(names, row)) if len(row) == len(names) else None


def _read_file(path: Path, spec: FileSpec, source: str, channel: str, dcfg: DataConfig,
               drops: DropLog, progress=None) -> list[dict]:
    """Rows {id, text (normalised), label, source, channel} of one file; bad rows go to `drops`."""
    rows: list[dict] = []
    seen_records = 0
    label_checked = unknown = 0
    missing: Counter = Counter()  # JSONL: records without a required key
    unknown_values: Counter = Counter()
    seen_keys: list[str] = []  # JSONL: the keys of the first record, for the missing-column message
    try:
        records = list(_iter_records(path, spec))
    except (OSError, EOFError, csv.Error) as e:  # truncated gzip, unreadable file, broken CSV
        raise DataError(f"{path}: cannot read the file: {e}") from None
    for line_no, rec in records:
        seen_records += 1
        if progress is not None:
            progress.update(1)
        rid = f"{path.name}:{line_no}"
        if rec is None:
            drops.add(source, "malformed_row", rid)
            continue
        if not seen_keys:
            seen_keys = list(rec)
        absent = [col for _, col in _required_columns(spec) if col not in rec]
        if absent:
            missing.update(absent)
            drops.add(source, "malformed_row", rid)
            continue
        if spec.id and rec[spec.id] not in (None, ""):
            rid = str(rec[spec.id])
        body, subject, raw_label = rec[spec.text], rec[spec.subject] if spec.subject else "", rec[spec.label]
        body = "" if body is None else str(body)
        subject = "" if subject is None else str(subject)
        if any(isinstance(v, str) and _SURROGATE.search(v) for v in (body, subject, raw_label, rid)):
            drops.add(source, "bad_encoding", _SURROGATE.sub("?", rid))
            continue
        label_checked += 1
        label = parse_label(raw_label)
        if label is None:
            unknown += 1
            value = str(raw_label)[:40]
            unknown_values[value] += 1
            drops.unknown_labels[source][value] += 1
            drops.add(source, "unknown_label", rid)
            continue
        text = normalize(f"{subject}\n{body}" if subject else body, mask_digits=dcfg.mask_digits)
        if not text:
            drops.add(source, "empty_text", rid)
            continue
        if len(text) < dcfg.min_chars:
            drops.add(source, "too_short", rid)
            continue
        if len(text) > dcfg.max_chars:
            drops.add(source, "too_long", rid)
            continue
        row_source = source
        if spec.source_column and rec.get(spec.source_column) not in (None, ""):
            row_source = str(rec[spec.source_column])
        rows.append({"id": f"{row_source}:{rid}", "text": text, "label": label, "source": row_source,
                     "channel": channel})
    if seen_records == 0:
        raise DataError(f"{path}: no data rows")
    for key, col in _required_columns(spec):
        if missing[col] and missing[col] == seen_records:  # JSONL: a key no record has
            raise _missing_column(path, key, col, seen_keys, spec.hint)
    if label_checked and unknown > MAX_UNKNOWN_LABEL_SHARE * label_checked:
        examples = ", ".join(f"{v!r} ({n})" for v, n in unknown_values.most_common(5))
        raise DataError(f"{path}: column {spec.label!r}: {unknown} of {label_checked} labels are not "
                        f"spam/ham, 1/0 or true/false, e.g. {examples}")
    return rows


def read_labelled_file(path: str | Path, text: str = "text", label: str = "label", source: str = "source", *,
                       subject: str = "", id: str = "", format: str = "", mask_digits: bool = True,
                       max_chars: int = 50_000, channel: str = "other") -> list[dict]:
    """Read any CSV/TSV/JSONL (optionally .gz) with a text and a label column, e.g. for `make eval DATA=...`.

    Rows are dicts {id, text (normalised), label (0/1), source, channel, lang}; `source` names an optional
    column (default: the file name's stem). Bad rows are dropped and summarised on stderr; a missing file
    or column, or a file whose labels are mostly unparseable, raises `DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    spec = FileSpec(text=text, label=label, subject=subject, id=id, source_column=source, format=format)
    drops = DropLog()
    name = path.name.split(".")[0]
    dcfg = DataConfig(mask_digits=mask_digits, max_chars=max_chars)
    rows = _read_file(path, spec, name, channel, dcfg, drops)
    if drops.counts:
        print(f"{path}: dropped {drops.total(name)} rows ({drops.summary()})", file=sys.stderr)
    if not rows:
        raise DataError(f"{path}: no usable rows ({drops.summary()})")
    for r in rows:
        r["lang"] = language_tag(r["text"])
    return rows


def _corpus_files(name: str, cc: CorpusConfig) -> list[Path]:
    pattern = str(resolve_path(cc.path))
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise DataError(f"data.corpora.{name}.path: no file matches {cc.path}")
    return files


def load_corpus(name: str, cc: CorpusConfig, dcfg: DataConfig, drops: DropLog) -> list[dict]:
    """Every usable row of one corpus (all files of its glob, in name order)."""
    from tqdm import tqdm

    hint = f"data.corpora.{name}"
    if cc.channel not in CHANNELS:
        raise DataError(f"{hint}.channel: expected one of {', '.join(CHANNELS)}, got {cc.channel!r}")
    if cc.format == FEEDBACK:
        raise DataError(f"{hint}: a feedback store is read by training.feedback_data.load")
    spec = FileSpec(text=cc.text, label=cc.label, subject=cc.subject, id=cc.id, format=cc.format,
                    header=cc.header, columns=list(cc.columns), quoting=cc.quoting, hint=hint)
    rows: list[dict] = []
    with tqdm(desc=f"load {name}", unit=" rows", disable=None, leave=False) as bar:
        for path in _corpus_files(name, cc):
            rows.extend(_read_file(path, spec, name, cc.channel, dcfg, drops, progress=bar))
    for wanted, value, reason in ((cc.langs, lambda r: language_tag(r["text"]), "other_language"),
                                  ([_LABELS[x] for x in cc.keep_labels], lambda r: r["label"], "other_label")):
        if wanted:
            kept = []
            for r in rows:
                if value(r) in wanted:
                    kept.append(r)
                else:
                    drops.add(name, reason, r["id"])
            rows = kept
    return rows
