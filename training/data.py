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
import glob
import hashlib
import json
import random
import re
import shutil
import sys
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

from serving.text import LANGS, NORMALIZER_VERSION, language_tag
from training import feedback_data
from training.config import (
    ROOT,
    Config,
    ConfigError,
    DataConfig,
    cli_args,
    fail,
    load_config,
    resolve_path,
    save_resolved,
    to_dict,
)
from training.sources import FEEDBACK, DataError, DropLog, load_corpus

# Bump when the pipeline's output for the same config changes, so `ensure_prepared` re-prepares; a new
# normaliser (serving.text.NORMALIZER_VERSION) changes every prepared text, so it counts too.
PIPELINE_VERSION = f"1.n{NORMALIZER_VERSION}"
SPLITS = ("train", "validation", "test")
LABEL_NAMES = {0: "ham", 1: "spam"}
FEEDBACK_CARD = "feedback_card.md"  # written into the prepared data directory (reports may be personal)
# Canonical form for near-duplicate shingles: \W is every non-letter/digit (CJK counts as letters).
_NON_WORD = re.compile(r"[\W_]+")

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


def _feedback_call(fn, *args):
    try:
        return fn(*args)
    except feedback_data.FeedbackDataError as e:
        raise DataError(str(e)) from None


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
        from training.mix_card import mix_card

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


# ------------------------------------------------------------------------------------------ summary


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
