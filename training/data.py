"""Prepare the labelled corpora into train/validation/test splits: `python -m training.data --config FILE`.

    data/raw/<corpus>/*  ->  <data.output_dir>/dataset/        (datasets.DatasetDict, save_to_disk)
                            <data.output_dir>/manifest.json   (counts, hashes, drops, duplicates)
                            <data.output_dir>/config.yaml     (the resolved config)
                            <data.mix_card>                   (Markdown mix card, when set)

Steps, in order (each is deterministic for `data.seed`):
1. Read every enabled corpus (CSV/TSV/JSONL, optionally .gz) through one reader. Bad rows are dropped and
   counted per reason (`malformed_row`, `bad_encoding`, `unknown_label`, `empty_text`, `too_short`,
   `too_long`); a missing column or a file whose labels mostly cannot be parsed is a `DataError`.
2. Normalise the text with `serving.text.normalize` (the same function serving uses).
3. Remove exact duplicates of the normalised text across all corpora (the first copy in config order is
   kept); a text seen with both labels is dropped in every copy (`label_conflict`).
4. Apply each corpus's `cap` (sampled by seed, stratified by label).
5. Tag the language (`serving.text.language_tag`) and group near-duplicates: MinHash LSH over character
   shingles of a canonical form (lower case, letters/digits/CJK only, no spaces, first
   `near_dup_max_chars` characters), candidate pairs confirmed by their estimated Jaccard, then union-find.
   Near-duplicates are kept, but a group always lands in one split.
6. Split groups stratified by source x label (a group counts towards the stratum of its first row).
7. Apply each corpus's `weight` to its training rows only: 2.0 repeats every row twice, 1.5 repeats the
   rows once and adds a label-stratified half again, 0.5 keeps a label-stratified half; 1.0 leaves them
   as they are. Repeated rows keep their id. Validation and test are never re-weighted.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import hashlib
import io
import json
import random
import re
import shutil
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from serving.text import LANGS, NORMALIZER_VERSION, language_tag, normalize
from training import feedback_data
from training.config import (
    ROOT,
    Config,
    ConfigError,
    CorpusConfig,
    DataConfig,
    cli_args,
    fail,
    load_config,
    resolve_path,
    save_resolved,
    to_dict,
)

# Bump when the pipeline's output for the same config changes, so `ensure_prepared` re-prepares; a new
# normaliser (serving.text.NORMALIZER_VERSION) changes every prepared text, so it counts too.
PIPELINE_VERSION = f"1.n{NORMALIZER_VERSION}"
SPLITS = ("train", "validation", "test")
LABEL_NAMES = {0: "ham", 1: "spam"}
CHANNELS = ("sms", "email", "other")
FORMATS = ("csv", "tsv", "jsonl")
FEEDBACK = "feedback"  # a corpus read from the server's feedback store (training/feedback_data.py)
FEEDBACK_CARD = "feedback_card.md"  # written into the prepared data directory (reports may be personal)
_LABELS = {"spam": 1, "ham": 0, "1": 1, "0": 0, "true": 1, "false": 0, "1.0": 1, "0.0": 0}
# A file where more than this share of the labels is unknown has the wrong column or label scheme.
MAX_UNKNOWN_LABEL_SHARE = 0.5
# Lone surrogates: what undecodable bytes become under errors="surrogateescape".
_SURROGATE = re.compile("[\ud800-\udfff]")
# Canonical form for near-duplicate shingles: \W is every non-letter/digit (CJK counts as letters).
_NON_WORD = re.compile(r"[\W_]+")

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


def _feedback_call(fn, *args):
    try:
        return fn(*args)
    except feedback_data.FeedbackDataError as e:
        raise DataError(str(e)) from None


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


# ------------------------------------------------------------------------------------------ sampling


def _rng(seed: int, *parts: str) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`, so this is stable across processes (unlike hash()).
    return random.Random(":".join([str(seed), *parts]))


def _allocate(sizes: dict[int, int], total: int) -> dict[int, int]:
    """Split `total` over labels in proportion to `sizes` (largest remainder), never above a label's size."""
    n = sum(sizes.values())
    if total >= n:
        return dict(sizes)
    exact = {k: total * v / n for k, v in sizes.items()}
    out = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (out[k] - exact[k], k))[: total - sum(out.values())]:
        out[k] += 1
    return out


def cap_rows(rows: list[dict], cap: int, rng: random.Random) -> list[dict]:
    """At most `cap` rows, label proportions kept; the original order is kept."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_label[r["label"]].append(i)
    quota = _allocate({k: len(v) for k, v in by_label.items()}, cap)
    keep: list[int] = []
    for label in sorted(by_label):
        keep.extend(rng.sample(by_label[label], quota[label]))
    return [rows[i] for i in sorted(keep)]


def weight_rows(rows: list[dict], weight: float, rng: random.Random) -> list[dict]:
    """Repeat rows floor(weight) times and add a label-stratified sample for the fraction."""
    if weight == 1.0:
        return list(rows)
    whole = int(weight)
    out = [r for _ in range(whole) for r in rows]
    frac = weight - whole
    if frac > 1e-9:
        out.extend(cap_rows(rows, round(frac * len(rows)), rng))
    return out


# ------------------------------------------------------------------------------------------ duplicates


def remove_exact_duplicates(rows: list[dict], drops: DropLog) -> tuple[list[dict], Counter]:
    """Keep the first copy of each normalised text; a text with both labels is dropped in every copy."""
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_text[r["text"]].append(i)
    keep, removed = [], Counter()
    for idx in by_text.values():
        if len({rows[i]["label"] for i in idx}) > 1:
            for i in idx:
                drops.add(rows[i]["source"], "label_conflict", rows[i]["id"])
            continue
        keep.append(idx[0])
        for i in idx[1:]:
            removed[rows[i]["source"]] += 1
    return [rows[i] for i in sorted(keep)], removed


def canonical(text: str, max_chars: int) -> str:
    """Lower case, letters/digits/CJK only, no spaces: Enron's tokenised copy of a SpamAssassin mail
    ("2 : 00 p . m .") and the original ("2:00 p.m.") become the same string."""
    return _NON_WORD.sub("", text[: 4 * max_chars].lower())[:max_chars]


def _shingles(text: str, k: int) -> list[bytes]:
    if len(text) <= k:
        return [text.encode("utf-8")]
    return list({text[i: i + k].encode("utf-8") for i in range(len(text) - k + 1)})


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller index is the root: deterministic


def near_duplicate_groups(texts: list[str], threshold: float, shingle: int, num_perm: int,
                          max_chars: int) -> list[int]:
    """Group id per text (0..G-1 in order of first appearance); near-duplicates share a group."""
    from datasketch import MinHash, MinHashLSH
    from tqdm import tqdm

    n = len(texts)
    uf = _UnionFind(n)
    canon = [canonical(t, max_chars) for t in texts]
    idx = [i for i, c in enumerate(canon) if c]  # nothing to shingle: a group of its own
    # crc32 as the shingle hash: deterministic and several times faster than datasketch's SHA-1 default.
    gen = MinHash.generator((_shingles(canon[i], shingle) for i in idx), num_perm=num_perm, seed=1,
                            hashfunc=zlib.crc32)
    hashes = list(tqdm(gen, total=len(idx), desc="minhash", unit=" rows", disable=None, leave=False))
    # datasketch's default band layout weighs misses and false candidates equally, which finds only about a
    # third of the pairs at the threshold (64 permutations). Favour recall: every candidate is confirmed below.
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    with lsh.insertion_session() as session:
        for i, m in zip(idx, hashes):
            session.insert(i, m, check_duplication=False)
    pos = {i: p for p, i in enumerate(idx)}
    for i, m in zip(idx, hashes):
        for j in lsh.query(m):
            # LSH gives candidates; confirm with the estimated Jaccard to keep false merges out.
            if j > i and m.jaccard(hashes[pos[j]]) >= threshold:
                uf.union(i, j)
    ids: dict[int, int] = {}
    return [ids.setdefault(uf.find(i), len(ids)) for i in range(n)]


# ------------------------------------------------------------------------------------------ splitting


def split_groups(rows: list[dict], fractions: dict[str, float], seed: int,
                 train_only: frozenset[str] = frozenset()) -> list[str]:
    """The split of every row. Groups are stratified by (source, label) of their first row; within a
    stratum they are shuffled by seed, placed largest first, each into the split furthest below its target.
    A group with a row of a `train_only` source goes to train whole (a group never straddles splits)."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        members[r["group"]].append(i)
    strata: dict[tuple[str, int], list[int]] = defaultdict(list)
    out = [""] * len(rows)
    for g, idx in members.items():
        if any(rows[i]["source"] in train_only for i in idx):
            for i in idx:
                out[i] = "train"
            continue
        first = rows[idx[0]]
        strata[(first["source"], first["label"])].append(g)
    for (source, label), groups in sorted(strata.items()):
        rng = _rng(seed, "split", source, str(label))
        rng.shuffle(groups)
        groups.sort(key=lambda g: -len(members[g]))  # stable: shuffled order among equal sizes
        total = sum(len(members[g]) for g in groups)
        target = {s: fractions[s] * total for s in SPLITS}
        filled = dict.fromkeys(SPLITS, 0)
        for g in groups:
            s = max(SPLITS, key=lambda s: target[s] - filled[s])
            filled[s] += len(members[g])
            for i in members[g]:
                out[i] = s
    return out


# ------------------------------------------------------------------------------------------ config hash


def data_config_hash(cfg: Config) -> str:
    """What the prepared data depends on: the data section, the pipeline version, the raw files' sizes."""
    files = []
    for name, cc in sorted(cfg.data.corpora.items()):
        if cc.enabled and cc.format == FEEDBACK:
            files.append(_feedback_call(feedback_data.fingerprint, name, cc))
        elif cc.enabled:
            for p in sorted(glob.glob(str(resolve_path(cc.path)))):
                files.append([name, Path(p).name, Path(p).stat().st_size])
    blob = json.dumps({"version": PIPELINE_VERSION, "data": to_dict(cfg.data), "files": files},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _check_config(d: DataConfig) -> None:
    # both > 0: training picks the threshold on validation and evaluation scores test (and an empty
    # split saved by datasets cannot be loaded back)
    if not 0 < d.validation_fraction < 1 or not 0 < d.test_fraction < 1 \
            or d.validation_fraction + d.test_fraction >= 1:
        raise DataError("data.validation_fraction and data.test_fraction must be > 0 and sum to less than 1")
    if not 0 < d.near_dup_threshold <= 1:
        raise DataError("data.near_dup_threshold must be in (0, 1]")
    if d.near_dup_shingle < 1 or d.near_dup_num_perm < 2 or d.near_dup_max_chars < 1:
        raise DataError("data.near_dup_shingle, near_dup_num_perm (>= 2) and near_dup_max_chars must be positive")
    for name, cc in d.corpora.items():
        if cc.format == FEEDBACK:
            _feedback_call(feedback_data.check, name, cc)
        if cc.weight <= 0:
            raise DataError(f"data.corpora.{name}.weight must be > 0 (use enabled: false to leave it out)")
        if cc.cap is not None and cc.cap < 1:
            raise DataError(f"data.corpora.{name}.cap must be a positive number of rows (or null)")
        unknown = sorted(set(cc.langs) - set(LANGS))
        if unknown:
            raise DataError(f"data.corpora.{name}.langs: {unknown} not among the language tags {', '.join(LANGS)}")
        unknown = sorted(set(cc.keep_labels) - {"spam", "ham"})
        if unknown:
            raise DataError(f"data.corpora.{name}.keep_labels: {unknown} is not a list of 'spam' and/or 'ham'")
    if not any(cc.enabled for cc in d.corpora.values()):
        raise DataError("no enabled corpus in data.corpora")


# ------------------------------------------------------------------------------------------ prepare


def _split_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["id"], r["text"], r["label"], r["source"], r["channel"], r["lang"], r["group"]],
                            ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _counts(rows: list[dict], *keys: str) -> dict:
    out: dict = {}
    for r in rows:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(str(r[k]) if k != "label" else LABEL_NAMES[r[k]], {})
        last = LABEL_NAMES[r[keys[-1]]] if keys[-1] == "label" else r[keys[-1]]
        node[last] = node.get(last, 0) + 1
    return out


def _sorted_tree(d):
    return {k: _sorted_tree(v) for k, v in sorted(d.items())} if isinstance(d, dict) else d


def build_splits(cfg: Config) -> dict:
    """Run steps 1-7 in memory. Returns {"splits": {split: rows}, "stats": {...}} (no files written)."""
    d = cfg.data
    _check_config(d)
    drops = DropLog()
    corpora: dict[str, dict] = {}
    rows: list[dict] = []
    for name, cc in d.corpora.items():
        if not cc.enabled:
            corpora[name] = {"enabled": False, "channel": cc.channel, "path": cc.path}
            continue
        if cc.format == FEEDBACK:
            got, info = _feedback_call(feedback_data.load, name, cc, d, drops)
        else:
            got, info = load_corpus(name, cc, d, drops), None
        corpora[name] = {"enabled": True, "channel": cc.channel, "path": cc.path, "lang_hint": cc.lang_hint,
                         "cap": cc.cap, "weight": cc.weight, "train_only": cc.train_only,
                         "rows_usable": len(got)}
        if info is not None:
            corpora[name]["feedback"] = info
        rows.extend(got)
    rows, exact = remove_exact_duplicates(rows, drops)
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    rows = []
    for name, info in corpora.items():
        if not info["enabled"]:
            continue
        got = by_source.get(name, [])
        info["exact_duplicates"] = exact.get(name, 0)
        info["label_conflicts"] = drops.counts[name].get("label_conflict", 0) if name in drops.counts else 0
        info["rows_unique"] = len(got)
        cap = d.corpora[name].cap
        if cap is not None and len(got) > cap:
            got = cap_rows(got, cap, _rng(d.seed, "cap", name))
        info["rows_kept"] = len(got)
        rows.extend(got)
    if not rows:
        raise DataError(f"no usable rows in any enabled corpus (drops: {drops.summary()})")
    for r in rows:
        r["lang"] = language_tag(r["text"])
    groups = near_duplicate_groups([r["text"] for r in rows], d.near_dup_threshold, d.near_dup_shingle,
                                   d.near_dup_num_perm, d.near_dup_max_chars)
    for r, g in zip(rows, groups):
        r["group"] = g
    sizes = Counter(groups)
    near_groups = [g for g, n in sizes.items() if n > 1]
    group_sources: dict[int, set] = defaultdict(set)
    for r in rows:
        if sizes[r["group"]] > 1:
            group_sources[r["group"]].add(r["source"])
    fractions = {"validation": d.validation_fraction, "test": d.test_fraction,
                 "train": 1 - d.validation_fraction - d.test_fraction}
    train_only = frozenset(n for n, cc in d.corpora.items() if cc.enabled and cc.train_only)
    assigned = split_groups(rows, fractions, d.seed, train_only)
    splits = {s: [r for r, a in zip(rows, assigned) if a == s] for s in SPLITS}
    unweighted_train = splits["train"]
    train: list[dict] = []
    for name in corpora:
        part = [r for r in unweighted_train if r["source"] == name]
        if part:
            train.extend(weight_rows(part, d.corpora[name].weight, _rng(d.seed, "weight", name)))
    splits["train"] = train
    for s in SPLITS:
        _rng(d.seed, "order", s).shuffle(splits[s])
    stats = {
        "corpora": corpora,
        "drops": drops,
        "duplicates": {
            "exact": sum(exact.values()),
            "exact_by_source": dict(sorted(exact.items())),
            "label_conflict": drops.by_reason().get("label_conflict", 0),
            "near_groups": len(near_groups),
            "near_rows": sum(sizes[g] for g in near_groups),
            "near_cross_source_groups": sum(1 for s in group_sources.values() if len(s) > 1),
        },
        "unweighted_train": unweighted_train,
    }
    return {"splits": splits, "stats": stats}


def _features():
    from datasets import Features, Value

    return Features({"id": Value("string"), "text": Value("string"), "label": Value("int64"),
                     "source": Value("string"), "channel": Value("string"), "lang": Value("string"),
                     "group": Value("int64")})


def _save_quietly(dd, path: Path) -> None:
    # datasets prints three "Saving the dataset" bars for a sub-second write; keep the terminal readable.
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        dd.save_to_disk(str(path))
    finally:
        if not was_disabled:
            enable_progress_bars()


@contextlib.contextmanager
def _locked(out: Path):
    """One preparer per output directory at a time (e.g. `make train` and `make baseline` started together)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(cfg: Config) -> Path:
    """Build the splits from the raw corpora and write dataset/, manifest.json, config.yaml (+ mix card)."""
    with _locked(resolve_path(cfg.data.output_dir)):
        return _prepare(cfg)


def _prepare(cfg: Config) -> Path:
    from datasets import Dataset, DatasetDict

    t0 = time.time()
    out = resolve_path(cfg.data.output_dir)
    built = build_splits(cfg)
    splits, stats = built["splits"], built["stats"]
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # no manifest = not prepared, whatever happens next
    feats = _features()
    dd = DatasetDict({s: Dataset.from_dict({k: [r[k] for r in splits[s]] for k in feats}, features=feats)
                      for s in SPLITS})
    tmp = out / "dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_quietly(dd, tmp)
    shutil.rmtree(out / "dataset", ignore_errors=True)
    tmp.rename(out / "dataset")
    save_resolved(cfg, out)
    split_info = {s: {"rows": len(splits[s]), "sha256": _split_hash(splits[s]),
                      "counts": _sorted_tree(_counts(splits[s], "source", "label"))} for s in SPLITS}
    drops: DropLog = stats["drops"]
    manifest = {
        "dataset_hash": hashlib.sha256("\n".join(f"{s}:{split_info[s]['sha256']}" for s in SPLITS)
                                       .encode()).hexdigest(),
        "data_config_hash": data_config_hash(cfg),
        "pipeline_version": PIPELINE_VERSION,
        "splits": split_info,
        "unweighted_train": {"rows": len(stats["unweighted_train"]),
                             "counts": _sorted_tree(_counts(stats["unweighted_train"], "source", "label"))},
        "lang_counts": {s: _sorted_tree(_counts(splits[s], "lang", "label")) for s in SPLITS},
        "drops": drops.by_reason(),
        "drops_by_source": {s: dict(sorted(c.items())) for s, c in sorted(drops.counts.items())},
        "drop_examples": {s: dict(sorted(e.items())) for s, e in sorted(drops.examples.items()) if e},
        "unknown_labels": {s: dict(c.most_common(10)) for s, c in sorted(drops.unknown_labels.items())},
        "duplicates": stats["duplicates"],
        "corpora": stats["corpora"],
        "config": to_dict(cfg.data),
    }
    for name, info in stats["corpora"].items():
        if "feedback" in info:
            (out / FEEDBACK_CARD).write_text(
                feedback_data.card(name, info["feedback"], splits, manifest["drops_by_source"].get(name, {})),
                encoding="utf-8")
            manifest["feedback_card"] = FEEDBACK_CARD
    if cfg.data.mix_card:
        card = resolve_path(cfg.data.mix_card)
        card.parent.mkdir(parents=True, exist_ok=True)
        card.write_text(mix_card(manifest, splits, stats), encoding="utf-8")
        manifest["mix_card"] = cfg.data.mix_card
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(summary_table(manifest, time.time() - t0, out))
    return out


def ensure_prepared(cfg: Config) -> Path:
    """The prepared data directory; (re-)prepares it when missing or when the data config changed."""
    out = resolve_path(cfg.data.output_dir)
    if _up_to_date(cfg, out):
        return out
    with _locked(out):
        if _up_to_date(cfg, out):  # another process prepared it while we waited
            return out
        if (out / "manifest.json").exists():
            print(f"{_rel(out)}: the data config changed since it was prepared; preparing again", file=sys.stderr)
        return _prepare(cfg)


def _up_to_date(cfg: Config, out: Path) -> bool:
    manifest = out / "manifest.json"
    if not (manifest.exists() and (out / "dataset").is_dir()):
        return False
    try:
        stored = json.loads(manifest.read_text(encoding="utf-8")).get("data_config_hash")
    except (json.JSONDecodeError, OSError):
        return False
    return stored == data_config_hash(cfg)


def load_manifest(cfg: Config) -> dict:
    return json.loads((ensure_prepared(cfg) / "manifest.json").read_text(encoding="utf-8"))


def load_splits(cfg: Config):
    """The prepared `DatasetDict` (train/validation/test), preparing it first when needed."""
    from datasets import load_from_disk

    return load_from_disk(str(ensure_prepared(cfg) / "dataset"))


# ------------------------------------------------------------------------------------------ reports


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _percentile(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    k = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def mix_card(manifest: dict, splits: dict[str, list[dict]], stats: dict) -> str:
    """The Markdown mix card: what went into the splits and what was left out."""
    cfg = manifest["config"]
    corpora = manifest["corpora"]
    dup = manifest["duplicates"]
    disabled = [n for n, c in corpora.items() if not c["enabled"]]
    out = [
        f"# Data mix: `{cfg['output_dir']}`",
        "",
        "Generated by `python -m training.data` (training/data.py) from the data section of the config; do not "
        "edit by hand. Per-corpus provenance, licences and limits: [data_cards/README.md](README.md).",
        "",
        f"- dataset hash: `{manifest['dataset_hash']}`",
        f"- seed {cfg['seed']}, validation {cfg['validation_fraction']:g}, test {cfg['test_fraction']:g}, "
        f"digits masked: {str(cfg['mask_digits']).lower()}, rows longer than {cfg['max_chars']:,} characters "
        "dropped",
        f"- near-duplicates: MinHash LSH, Jaccard >= {cfg['near_dup_threshold']:g} over "
        f"{cfg['near_dup_shingle']}-character shingles of the first {cfg['near_dup_max_chars']:,} canonical "
        f"characters, {cfg['near_dup_num_perm']} permutations",
        "",
        "## Corpora",
        "",
    ]
    rows = []
    for n, c in corpora.items():
        if c["enabled"]:
            bad = sum(v for k, v in manifest["drops_by_source"].get(n, {}).items()
                      if k not in ("label_conflict", "other_language", "other_label"))
            rows.append([n, c["channel"], "yes", c["rows_usable"], bad, c["exact_duplicates"], c["label_conflicts"],
                         c["cap"] if c["cap"] is not None else "-", c["rows_kept"],
                         f"{c['weight']:g}" + (" (train only)" if c.get("train_only") else "")])
        else:
            rows.append([n, c["channel"], "**no**", "-", "-", "-", "-", "-", "-", "-"])
    out.append(_table(["corpus", "channel", "enabled", "usable rows", "bad rows dropped", "exact dups removed",
                       "label conflicts dropped", "cap", "rows kept", "train weight"], rows))
    out += ["", "`usable rows` are rows that passed the row checks; `rows kept` is after duplicate removal and "
            "the cap. `train weight` repeats (> 1) or subsamples (< 1) that corpus's training rows only; a "
            "*train only* corpus has no validation or test rows (they cannot move the threshold)."]
    if disabled:
        out += ["", "Left out of this mix (defined in the config with `enabled: false`): "
                + ", ".join(f"`{n}` (opt in with `data.corpora.{n}.enabled=true`; read its data card first)"
                            for n in disabled) + "."]

    out += ["", "## Rows per split, source, language and label", ""]
    table = []
    for s in SPLITS:
        counts: Counter = Counter((r["source"], r["lang"], r["label"]) for r in splits[s])
        keys = sorted({(src, lang) for src, lang, _ in counts})
        for src, lang in keys:
            ham, spam = counts[(src, lang, 0)], counts[(src, lang, 1)]
            table.append([s, src, lang, ham, spam, ham + spam])
        ham = sum(1 for r in splits[s] if r["label"] == 0)
        table.append([f"**{s}**", "**all**", "", ham, len(splits[s]) - ham, len(splits[s])])
    out.append(_table(["split", "source", "lang", "ham", "spam", "total"], table))
    weighted = any(c["enabled"] and c["weight"] != 1.0 for c in corpora.values())
    if weighted:
        ut = manifest["unweighted_train"]
        out += ["", f"Train rows before weighting: {ut['rows']:,}."]

    out += ["", "## Languages", ""]
    langs = sorted({r["lang"] for s in SPLITS for r in splits[s]})
    lt = []
    for lang in langs:
        cnt = [sum(1 for r in splits[s] if r["lang"] == lang) for s in SPLITS]
        lt.append([lang, *cnt, sum(cnt)])
    out.append(_table(["lang", *SPLITS, "total"], lt))
    cjk_sources: dict[str, int] = defaultdict(int)
    for s in SPLITS:
        for r in splits[s]:
            if r["lang"] in ("ja", "ko"):
                cjk_sources[r["source"]] += 1
    if sum(cjk_sources.values()) < 100:
        out += ["", "**No Japanese (ja) or Korean (ko) labelled spam corpus could be found in a redistributable "
                "form**, so the mix has no ja/ko rows (apart from any the script-based language tag finds inside "
                "other corpora). Scores for ja/ko are therefore not measured; the multilingual backbone's "
                "transfer to them is untested."]
    else:
        where = ", ".join(f"{src} {n:,}" for src, n in sorted(cjk_sources.items(), key=lambda kv: -kv[1]))
        out += ["", f"Japanese and Korean rows by source: {where}. No real ja/ko labelled spam corpus could be "
                "found in a redistributable form: check each source's card (a synthetic seed corpus shows what "
                "the model learns, not real traffic); ja/ko quality is measured out of distribution by "
                "`make ood` on sets written apart from the training data."]

    out += ["", "## Text length (characters, after normalisation, all splits before weighting)", ""]
    lengths: dict[str, list[int]] = defaultdict(list)
    for s in ("validation", "test"):
        for r in splits[s]:
            lengths[r["source"]].append(len(r["text"]))
    for r in stats["unweighted_train"]:
        lengths[r["source"]].append(len(r["text"]))
    lrows = []
    for src in sorted(lengths):
        v = sorted(lengths[src])
        lrows.append([src, len(v), _percentile(v, 50), _percentile(v, 90), _percentile(v, 99), v[-1]])
    out.append(_table(["source", "rows", "p50", "p90", "p99", "max"], lrows))

    out += ["", "## Duplicates", "",
            f"- exact duplicates of the normalised text removed: {dup['exact']:,} "
            + "(" + ", ".join(f"{k}: {v:,}" for k, v in dup["exact_by_source"].items()) + ")"
            if dup["exact_by_source"] else f"- exact duplicates of the normalised text removed: {dup['exact']:,}",
            f"- texts seen with both labels, every copy dropped (`label_conflict`): {dup['label_conflict']:,} rows",
            f"- near-duplicate groups (kept, each group in a single split): {dup['near_groups']:,} groups "
            f"covering {dup['near_rows']:,} rows; {dup['near_cross_source_groups']:,} groups span two or more "
            "corpora (e.g. Enron spam drawn from SpamAssassin)"]

    out += ["", "## Rows dropped", ""]
    reasons = sorted({r for c in manifest["drops_by_source"].values() for r in c})
    if reasons:
        drows = [[src, *[c.get(r, 0) for r in reasons]] for src, c in manifest["drops_by_source"].items()]
        drows.append(["**total**", *[manifest["drops"].get(r, 0) for r in reasons]])
        out.append(_table(["source", *reasons], drows))
        for src, vals in manifest["unknown_labels"].items():
            if vals:
                out += ["", f"Unknown label values in `{src}`: "
                        + ", ".join(f"`{v!r}` ({n})" for v, n in vals.items())]
        out += ["", "Reasons: `malformed_row` (wrong number of fields, not a JSON object), `bad_encoding` "
                "(bytes that are not UTF-8), `unknown_label` (not spam/ham, 1/0, true/false), `empty_text` / "
                "`too_short` / `too_long` (after normalisation), `label_conflict` (the same text with both "
                "labels)."]
    else:
        out.append("None.")
    return "\n".join(out) + "\n"


def summary_table(manifest: dict, seconds: float, out: Path) -> str:
    """A short terminal summary: rows per source x split (ham/spam), drops and duplicates."""
    counts = {s: manifest["splits"][s]["counts"] for s in SPLITS}
    sources = sorted({src for s in SPLITS for src in counts[s]})
    w = max([len(s) for s in sources] + [6])
    lines = [f"{'source':<{w}}  " + "  ".join(f"{s + ' ham/spam':>22}" for s in SPLITS)]
    for src in sources:
        cells = []
        for s in SPLITS:
            c = counts[s].get(src, {})
            cells.append(f"{c.get('ham', 0):>10,} /{c.get('spam', 0):>9,}")
        lines.append(f"{src:<{w}}  " + "  ".join(f"{c:>22}" for c in cells))
    tot = [f"{manifest['splits'][s]['rows']:>22,}" for s in SPLITS]
    lines.append(f"{'total':<{w}}  " + "  ".join(tot))
    dup = manifest["duplicates"]
    drops = ", ".join(f"{k} {v:,}" for k, v in manifest["drops"].items()) or "none"
    lines += [f"dropped: {drops}",
              f"duplicates: {dup['exact']:,} exact removed; {dup['near_groups']:,} near-duplicate groups "
              f"({dup['near_rows']:,} rows, kept within one split)",
              f"wrote {_rel(out)} (dataset_hash {manifest['dataset_hash'][:12]}) in {seconds:.1f}s"
              + (f"; mix card {manifest['mix_card']}" if manifest.get("mix_card") else "")]
    return "\n".join(lines)


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> None:
    args = cli_args(argv, "Prepare the labelled corpora into train/validation/test splits.").parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        prepare(cfg)
    except (ConfigError, DataError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
