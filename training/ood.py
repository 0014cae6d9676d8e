"""The out-of-distribution benchmark: how the model does on traffic it never saw, beside the TF-IDF baseline.

    python -m bench.run --only ood [--run <run>] [--bundle <dir>]        # make ood: every protocol
    make ood ARGS="--protocols unseen_ham,evasion"                       # a subset (the folds train models)

Protocols (configured in the config's `ood:` section):
- `unseen_ham`: ham from sources outside the training mix (`ood.unseen_ham`), FPR per language (and per
  Chinese script) at the shipped thresholds. Nothing else to score: every row is ham.
- `eval_sets`: labelled sets written apart from the training data and never used for training or for the
  threshold (`ood.eval_sets`), per language. The first file is the headline set: its scopes are `overall` and
  `lang:<tag>`, the names every earlier run logged; each further file adds `set:<stem>`, `set:<stem>:lang:<tag>`
  (when it has more than one language) and `set:<stem>:script:<script>` (where its rows say their script).
- `evasion`: test-split spam perturbed by code (training/evasion.py), each perturbation scored beside the
  same clean test ham: recall drop against the same spam unperturbed; plus the hard-negative ham
  (`ood.hard_negatives`), FPR per language.
- `loco`: leave-one-corpus-out folds (`ood.folds`): for each, the config's recipe trains on the mix without
  the fold's sources (with the smaller budget `ood.fold_overrides`), and so does the baseline, on the same
  rows; both score the held-out rows (all its splits, at most `ood.fold_max_test_rows`) or the fold's files.

The model is scored through its bundle's int8 graph when it has one (what is served), else through the
PyTorch model directory; the baseline is the newest TF-IDF run on the model's data whose threshold was chosen
by the model's rule (trained with that rule when there is none). Each at its own shipped thresholds (per language where the policy has them). Results: one dict per
protocol, `{"name", "scopes": [{"scope", "rows", "spam", "model": {...}, "baseline": {...}}]}` with `f1`,
`roc_auc`, `recall`, `fpr` (null where undefined: no spam, or one class only) in each side. A side whose one
global threshold came with its spread (training.metrics.threshold_spread) also has `at_spread`: `{"low",
"high"}`, each `{"threshold", "f1", "recall", "fpr"}`, the figures at the ends of that interval. Two runs whose
figures differ by less than that are not told apart by this benchmark: their thresholds are noise.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from training.config import Config, repo_relative, resolve_path, with_overrides

PROTOCOLS = ("unseen_ham", "eval_sets", "evasion", "loco")
SIDES = ("model", "baseline")
METRICS = ("f1", "roc_auc", "recall", "fpr")


class OodError(Exception):
    """A user-facing benchmark problem (a missing file, a fold naming an unknown source): one line."""


# ------------------------------------------------------------------------------------------ scorers


@dataclass
class Scorer:
    """p_spam and the threshold each text gets, for raw texts (normalised inside, as the server does)."""

    name: str
    proba: Callable[[list[str]], np.ndarray]
    policy: dict
    describe: str

    def score(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        from serving.text import language_tag, normalize
        from serving.thresholds import thresholds_for

        mask = bool(self.policy.get("mask_digits", True))
        langs = [language_tag(normalize(t, mask)) for t in texts]
        p = self.proba(texts) if texts else np.empty(0)
        thresholds, _ = thresholds_for(self.policy, langs)
        return p, thresholds, langs

    def band(self) -> tuple[float, float] | None:
        """The global threshold's spread (low, high: training.metrics.threshold_spread) where every text gets
        the global threshold and the policy measured one, else None: the thresholds a validation split drawn
        again would have chosen, so a figure that moves between them is threshold noise."""
        spread = (self.policy.get("global") or {}).get("spread")
        if not spread or self.policy.get("by_lang"):
            return None
        return float(spread["low"]), float(spread["high"])


def bundle_scorer(bundle_dir: Path, threads: int) -> Scorer:
    from serving.bundle import load_bundle
    from serving.inference import Classifier

    bundle = load_bundle(bundle_dir)
    variant = "int8" if bundle.manifest.get("models", {}).get("int8") else "fp32"
    clf = Classifier(bundle, variant=variant, threads=threads)

    def proba(texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 64):
            out += [r["spam_probability"] for r in clf.classify(texts[start:start + 64])]
        return np.asarray(out, dtype=np.float64)

    policy = dict(clf.policy)  # the served graph's own thresholds where the export chose them
    policy["mask_digits"] = bool(bundle.manifest.get("text", {}).get("mask_digits", True))
    return Scorer("model", proba, policy, f"bundle {bundle_dir.name} ({variant})")


def model_dir_scorer(model_dir: Path, batch_size: int = 64) -> Scorer:
    from serving.thresholds import from_manifest
    from training.evaluate import load_model, predict_proba

    model, encoder, meta = load_model(model_dir)
    mask = bool(meta["text"].get("mask_digits", True))

    def proba(texts: list[str]) -> np.ndarray:
        return predict_proba(model, encoder, texts, batch_size, mask, desc="scoring")

    policy = dict(from_manifest(meta))
    policy["mask_digits"] = mask
    return Scorer("model", proba, policy, f"model dir {repo_relative(model_dir)} (PyTorch)")


def baseline_scorer(directory: Path) -> Scorer:
    from serving.thresholds import from_manifest
    from training.baseline import load_pipeline

    pipe, info = load_pipeline(directory)

    def proba(texts: list[str]) -> np.ndarray:
        return pipe.predict_proba(texts)[:, 1].astype(np.float64)

    policy = dict(from_manifest(info))
    policy["mask_digits"] = bool(info.get("mask_digits", True))
    return Scorer("baseline", proba, policy, f"TF-IDF baseline {repo_relative(directory)}")


def find_baseline(cfg: Config, meta: dict, train_if_missing: bool = True) -> Path:
    """The saved pipeline of the newest finished baseline run on the model's data whose threshold was chosen by
    the model's rule (training.baseline.find_runs; trained, with that rule, when there is none)."""
    from training import tracking
    from training.baseline import find_runs, run_baseline, same_rule_config

    data_hash = meta.get("data_hash")
    run, same_rule = find_runs(cfg, meta)
    if run is None:
        from training.data import ensure_prepared

        own = tracking.data_hash_of(ensure_prepared(cfg))
        run = next((r for r in same_rule if r.data.tags.get("data_hash") == own), None)
        if run is not None or not train_if_missing:
            print(f"note: no baseline run on the model's data {str(data_hash)[:12]}: using the baseline of the "
                  f"config's data {own[:12]}", file=sys.stderr)
    if run is None:
        if not train_if_missing:
            raise OodError(f"no baseline run on data {str(data_hash)[:12]} with the model's threshold rule: run "
                           "`make baseline` first")
        print(f"no baseline run on data {str(data_hash)[:12]} with the model's threshold rule: training one on "
              "the config's data", flush=True)
        return run_baseline(same_rule_config(cfg, meta)).model_path.parent
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="baseline",
                                                    dst_path=str(resolve_path("runs/_mlflow") / run.info.run_id)))


# ------------------------------------------------------------------------------------------ metrics


def side_metrics(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray, ranking: bool = True) -> dict:
    """f1, roc_auc, recall, fpr of one side on one scope (None where undefined; roc_auc None without
    `ranking`, for a second threshold on the same scores)."""
    from training.metrics import binary_metrics

    m = binary_metrics(y, p, thresholds, ranking=ranking)

    def clean(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)

    out = {k: clean(m.get(k)) for k in METRICS}
    if not y.any():  # ham only: spam metrics are undefined, not 0
        out.update(f1=None, recall=None, roc_auc=None)
    if y.all():
        out.update(fpr=None, roc_auc=None)
    return out


class Scored(NamedTuple):
    """One side's scores on a batch: p_spam, each text's threshold, the threshold's spread (Scorer.band)."""

    p: np.ndarray
    thr: np.ndarray
    band: tuple[float, float] | None = None


def scope_entry(scope: str, y, scored: dict[str, Scored], idx=None) -> dict:
    """One scope: rows, spam and each side's metrics on the rows `idx` (all when None); with a band, also
    `at_spread`: f1, recall and fpr at the spread's low and high thresholds."""
    y = np.asarray(y, dtype=int)
    idx = np.arange(len(y)) if idx is None else np.asarray(idx, dtype=int)
    entry = {"scope": scope, "rows": int(len(idx)), "spam": int(y[idx].sum())}
    for side, sc in scored.items():
        p = np.asarray(sc.p)[idx]
        entry[side] = side_metrics(y[idx], p, np.asarray(sc.thr)[idx])
        if sc.band:
            entry[side]["at_spread"] = {
                end: {"threshold": t, **{k: v for k, v in side_metrics(y[idx], p, np.full(len(idx), t),
                                                                        ranking=False).items()
                                         if k != "roc_auc"}}
                for end, t in zip(("low", "high"), sc.band)}
    return entry


def _group_scopes(groups: Sequence[str], y, scored, prefix: str = "lang:", min_rows: int = 1) -> list[dict]:
    """A scope `<prefix><group>` per distinct value of `groups` (a language tag, a script, ...; "" is in no
    group) that has at least `min_rows` rows."""
    groups = np.asarray(groups)
    return [scope_entry(f"{prefix}{g}", y, scored, np.flatnonzero(groups == g))
            for g in sorted(set(groups.tolist()) - {""}) if (groups == g).sum() >= min_rows]


def _score_both(scorers: dict[str, Scorer], texts: list[str]) -> tuple[dict[str, Scored], list[str]]:
    scored, langs = {}, []
    for side, scorer in scorers.items():
        p, thr, langs = scorer.score(texts)
        scored[side] = Scored(p, thr, scorer.band())
    return scored, langs


# ------------------------------------------------------------------------------------------ inputs


def read_rows(paths: Sequence[str], what: str) -> list[dict]:
    """Rows of labelled files (training.sources.read_labelled_file: text, label, source, lang) plus their
    `script` column where the file has one."""
    import json

    from training.sources import DataError, read_labelled_file

    rows: list[dict] = []
    for p in paths:
        path = resolve_path(p)
        if not path.exists():
            raise OodError(f"ood.{what}: {p} does not exist")
        try:
            got = read_labelled_file(path)
        except DataError as e:
            raise OodError(f"ood.{what}: {e}") from None
        scripts = []
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                scripts = [json.loads(line).get("script", "") for line in f if line.strip()]
        for i, r in enumerate(got):
            r["file"] = path.name
            r["script"] = scripts[i] if len(scripts) == len(got) else ""
        rows += got
    return rows


# ------------------------------------------------------------------------------------------ protocols


def unseen_ham(cfg: Config, scorers: dict[str, Scorer]) -> dict:
    rows = read_rows(cfg.ood.unseen_ham, "unseen_ham")
    if not rows:
        raise OodError("ood.unseen_ham names no file")
    texts, y = [r["text"] for r in rows], np.array([r["label"] for r in rows])
    if y.any():
        raise OodError("ood.unseen_ham: the files must hold ham only")
    scored, langs = _score_both(scorers, texts)
    scopes = [scope_entry("overall", y, scored)] + _group_scopes(langs, y, scored)
    scopes += _group_scopes([r["script"] or "" for r in rows], y, scored, prefix="script:")
    return {"name": "unseen_ham", "description": "ham from sources outside the training mix: FPR at the "
            "shipped thresholds", "files": list(cfg.ood.unseen_ham), "scopes": scopes}


def eval_sets(cfg: Config, scorers: dict[str, Scorer]) -> dict:
    rows = read_rows(cfg.ood.eval_sets, "eval_sets")
    if not rows:
        raise OodError("ood.eval_sets names no file")
    texts, y = [r["text"] for r in rows], np.array([r["label"] for r in rows])
    scored, langs = _score_both(scorers, texts)
    files, langs = np.array([r["file"] for r in rows]), np.asarray(langs)
    scripts = np.array([r["script"] or "" for r in rows])
    scopes = []
    for i, name in enumerate(dict.fromkeys(files.tolist())):  # in the config's order; the first keeps its names
        mine = files == name
        prefix = f"set:{Path(name).stem}:" if i else ""
        scopes.append(scope_entry(prefix.rstrip(":") or "overall", y, scored, np.flatnonzero(mine)))
        if i == 0 or len(set(langs[mine].tolist())) > 1:  # a one-language set's lang scope would repeat it
            scopes += _group_scopes(np.where(mine, langs, ""), y, scored, prefix=f"{prefix}lang:", min_rows=10)
        if i:
            scopes += _group_scopes(np.where(mine, scripts, ""), y, scored, prefix=f"{prefix}script:", min_rows=10)
    return {"name": "eval_sets", "description": "labelled sets written apart from the training data",
            "files": list(cfg.ood.eval_sets), "scopes": scopes}


def _sample(rows, n: int, seed: int, key: str) -> list[int]:
    """At most `n` indices of `rows` (dicts with source), stratified by source, seeded, in order."""
    from training.data import cap_rows

    recs = [{"label": 0, "source": r, "i": i} for i, r in enumerate(rows)]
    if n <= 0 or len(recs) <= n:
        return list(range(len(recs)))
    rng = random.Random(f"{seed}:{key}")
    by_source: dict[str, list] = {}
    for r in recs:
        by_source.setdefault(r["source"], []).append(r)
    share = n / len(recs)
    picked = []
    for src in sorted(by_source):
        picked += cap_rows(by_source[src], max(1, round(share * len(by_source[src]))), rng)
    return sorted(r["i"] for r in picked)[:n]


def evasion(cfg: Config, scorers: dict[str, Scorer], test) -> dict:
    from training.evasion import PERTURBATIONS, perturb

    o = cfg.ood
    names = o.perturbations or list(PERTURBATIONS)
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise OodError(f"ood.perturbations: unknown {', '.join(unknown)} (known: {', '.join(PERTURBATIONS)})")
    labels = list(test["label"])
    texts, sources = list(test["text"]), list(test["source"])
    spam = [i for i, y in enumerate(labels) if y == 1]
    ham = [i for i, y in enumerate(labels) if y == 0]
    spam = [spam[j] for j in _sample([sources[i] for i in spam], o.evasion_spam_rows, o.seed, "spam")]
    ham = [ham[j] for j in _sample([sources[i] for i in ham], o.evasion_ham_rows, o.seed, "ham")]
    spam_texts = [texts[i] for i in spam]
    variants = {name: perturb(spam_texts, name, o.seed) for name in names}
    changed = {name: [k for k, (a, b) in enumerate(zip(spam_texts, v)) if a != b] for name, v in variants.items()}
    batch = [texts[i] for i in ham] + spam_texts
    for name in names:
        batch += [variants[name][k] for k in changed[name]]
    scored, _ = _score_both(scorers, batch)
    nh, ns = len(ham), len(spam)
    y_all = np.array([0] * nh + [1] * (len(batch) - nh))  # clean ham, clean spam, perturbed spam
    scopes = [scope_entry("clean", y_all, scored, np.arange(nh + ns))]
    offset = nh + ns
    examples = {}
    for name in names:
        k = np.asarray(changed[name], dtype=int)
        pert_idx = np.arange(offset, offset + len(k))
        offset += len(k)
        if not len(k):
            scopes.append({"scope": name, "rows": 0, "spam": 0, **{s: None for s in scored}})
            continue
        entry = scope_entry(name, y_all, scored, np.concatenate([np.arange(nh), pert_idx]))
        for side, sc in scored.items():
            clean_idx = nh + k
            clean_recall = float((np.asarray(sc.p)[clean_idx] >= np.asarray(sc.thr)[clean_idx]).mean())
            entry[side]["recall_clean"] = clean_recall
            entry[side]["recall_drop"] = clean_recall - entry[side]["recall"]
        scopes.append(entry)
        examples[name] = variants[name][int(k[0])][:160]
    hard = read_rows(o.hard_negatives, "hard_negatives")
    if hard:
        texts_h, y_h = [r["text"] for r in hard], np.zeros(len(hard), dtype=int)
        scored_h, langs_h = _score_both(scorers, texts_h)
        scopes.append(scope_entry("hard_negative_ham", y_h, scored_h))
        scopes += _group_scopes(langs_h, y_h, scored_h, prefix="hard_negative_ham:lang:")
    return {"name": "evasion", "description": "test-split spam perturbed by code beside clean test ham "
            "(recall drop against the same spam unperturbed); hard-negative ham (FPR)",
            "spam_rows": ns, "ham_rows": nh, "seed": o.seed, "examples": examples,
            "files": list(o.hard_negatives), "scopes": scopes}


def fold_rows(cfg: Config, fold, splits) -> list[dict]:
    """The rows fold `fold` is scored on (text, label, source, lang), from the config's prepared `splits`."""
    from training.data import cap_rows

    # the held-out sources' own rows, unless the fold names files instead (then only those, or both)
    sources = set(fold.test_sources or ([] if fold.test_files else fold.exclude))
    rows = []
    for split in ("train", "validation", "test"):
        ds = splits[split]
        for text, label, source, lang in zip(ds["text"], ds["label"], ds["source"], ds["lang"]):
            if source in sources:
                rows.append({"text": text, "label": label, "source": source, "lang": lang})
    if cfg.ood.fold_max_test_rows and len(rows) > cfg.ood.fold_max_test_rows:
        rows = cap_rows(rows, cfg.ood.fold_max_test_rows, random.Random(f"{cfg.ood.seed}:fold"))
    if fold.test_files:
        rows += read_rows(fold.test_files, "folds.test_files")
    return rows


def fold_output_dir(cfg: Config, name: str) -> str:
    """Where fold `name` trains (its model/ and baseline/ stay there): <train.output_dir>-ood/<name>."""
    return f"{Path(cfg.train.output_dir).as_posix()}-ood/{name}"


def model_scorer(cfg: Config, model_dir: Path, bundle_dir: Path | None, threads: int) -> Scorer:
    """The bundle's graph when there is a bundle (what is served), else the PyTorch model directory."""
    return bundle_scorer(bundle_dir, threads) if bundle_dir else model_dir_scorer(model_dir, cfg.eval.batch_size)


def loco(cfg: Config, base_overrides: Sequence[str] = (), only: Sequence[str] = ()) -> dict:
    """Train the recipe and the baseline per fold (on the same rows) and score the held-out rows."""
    from training.baseline import run_baseline
    from training.data import ensure_prepared, load_splits
    from training.train import train

    if not cfg.ood.folds:
        raise OodError("ood.folds defines no fold")
    ensure_prepared(cfg)
    splits = load_splits(cfg)
    known = set(splits["train"]["source"])
    folds_out = []
    scopes = []
    for name, fold in cfg.ood.folds.items():
        if only and name not in only:
            continue
        # a corpus the config defines but leaves out (enabled: false) is already absent from the fold
        off = [s for s in fold.exclude if s not in known and s in cfg.data.corpora and not cfg.data.corpora[s].enabled]
        if off:
            fold = replace(fold, exclude=[s for s in fold.exclude if s not in off])
            print(f"[loco {name}] {', '.join(off)}: not in this mix (enabled: false), nothing to leave out", flush=True)
        bad = sorted(set(fold.exclude) - known) or sorted(set(fold.test_sources) - known)
        # a fold that excludes nothing is the same-budget reference of the others (it must score files)
        if bad or not (fold.exclude or fold.test_files):
            raise OodError(f"ood.folds.{name}: " + (f"unknown source(s) {', '.join(bad)} (sources: "
                           f"{', '.join(sorted(known))})" if bad else "exclude names no source and no "
                           "test_files are given"))
        t0 = time.perf_counter()
        fold_cfg = with_overrides(cfg, [
            *base_overrides, *cfg.ood.fold_overrides,
            f"train.exclude_sources={','.join(fold.exclude)}",
            f"train.output_dir={fold_output_dir(cfg, name)}",
            f"tracking.experiment={cfg.tracking.experiment}-ood", f"tracking.run_name=ood-{name}",
            "tracking.register_as=", "train.resume=false",
        ])
        print(f"\n[loco {name}] training {_without(fold.exclude)}", flush=True)
        model_dir = train(fold_cfg).model_dir
        base = run_baseline(fold_cfg, capped=True, out_dir=resolve_path(fold_cfg.train.output_dir) / "baseline")
        scorers = {"model": model_dir_scorer(model_dir, cfg.eval.batch_size),
                   "baseline": baseline_scorer(base.model_path.parent)}
        rows = fold_rows(cfg, fold, splits)
        y = np.array([r["label"] for r in rows])
        scored, langs = _score_both(scorers, [r["text"] for r in rows])
        fold_scopes = [scope_entry(f"{name}", y, scored)]
        srcs = np.array([r["source"] for r in rows])
        if len(set(srcs.tolist())) > 1:
            fold_scopes += [scope_entry(f"{name}:source:{s}", y, scored, np.flatnonzero(srcs == s))
                            for s in sorted(set(srcs.tolist()))]
        fold_scopes += _group_scopes(langs, y, scored, prefix=f"{name}:lang:", min_rows=20)
        scopes += fold_scopes
        folds_out.append({"fold": name, "exclude": list(fold.exclude), "test_rows": len(rows),
                          "model_dir": str(model_dir), "seconds": round(time.perf_counter() - t0, 1)})
        print(f"[loco {name}] done in {time.perf_counter() - t0:.0f} s: " + _one_line(fold_scopes[0]), flush=True)
    return {"name": "loco", "description": "leave-one-corpus-out: the recipe and the baseline trained without "
            "the fold's sources (same rows, budget ood.fold_overrides), scored on them",
            "fold_overrides": list(cfg.ood.fold_overrides), "folds": folds_out, "scopes": scopes}


def _one_line(entry: dict) -> str:
    parts = []
    for side in SIDES:
        m = entry.get(side) or {}
        parts.append(f"{side} " + " ".join(f"{k} {m[k]:.3f}" for k in METRICS if m.get(k) is not None))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ all


def run(cfg: Config, model_dir: Path | None, bundle_dir: Path | None, protocols: Sequence[str],
        threads: int = 2, folds: Sequence[str] = (), base_overrides: Sequence[str] = ()) -> dict:
    """Every protocol asked for; returns {"model": ..., "baseline": ..., "protocols": [...]}."""
    import json

    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise OodError(f"unknown protocol(s) {', '.join(unknown)} (protocols: {', '.join(PROTOCOLS)})")
    out = {"protocols": []}
    fixed = [p for p in protocols if p != "loco"]
    if fixed:
        if model_dir is None:
            raise OodError("no trained model to score: train one first (make train)")
        meta = json.loads((model_dir / "spamlingo.json").read_text(encoding="utf-8"))
        model = model_scorer(cfg, model_dir, bundle_dir, threads)
        baseline = baseline_scorer(find_baseline(cfg, meta))
        scorers = {"model": model, "baseline": baseline}
        out["model"], out["baseline"] = model.describe, baseline.describe
        for name in fixed:
            t0 = time.perf_counter()
            print(f"ood: {name} ...", flush=True)
            if name == "evasion":
                from training.evaluate import _split_rows

                result = evasion(cfg, scorers, _split_rows(model_dir, meta, cfg, "test")[0])
            else:
                result = {"unseen_ham": unseen_ham, "eval_sets": eval_sets}[name](cfg, scorers)
            result["seconds"] = round(time.perf_counter() - t0, 1)
            result["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            out["protocols"].append(result)
            print(render_protocol(result), flush=True)
    if "loco" in protocols:
        result = loco(cfg, base_overrides, folds)
        result["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out["protocols"].append(result)
        print(render_protocol(result), flush=True)
    return out


def log_to_mlflow(cfg: Config, run_id: str | None, result: dict) -> None:
    """ood/<protocol>/<scope>/<metric> into the model's run (model side; baseline side as ood_baseline/...),
    and <metric>_low / <metric>_high at the ends of the threshold's spread where measured (`at_spread`)."""
    if not run_id:
        return
    from training import tracking

    metrics = {}
    for proto in result["protocols"]:
        for s in proto["scopes"]:
            scope = s["scope"].replace(":", ".")
            for side, prefix in (("model", "ood"), ("baseline", "ood_baseline")):
                m = s.get(side) or {}
                named = list(m.items())
                named += [(f"{k}_{end}", v) for end, ends in (m.get("at_spread") or {}).items()
                          for k, v in ends.items() if k != "threshold"]
                for k, v in named:
                    if isinstance(v, float) and np.isfinite(v):
                        metrics[f"{prefix}/{proto['name']}/{scope}/{k}"] = v
    try:
        with tracking.resume_run(run_id, cfg):
            import mlflow

            mlflow.log_metrics(metrics)
            mlflow.log_dict(result, "ood.json")
    except Exception as e:  # a model whose run is not in this store: the JSON file still has everything
        print(f"warning: OOD results not logged to MLflow run {run_id}: {e}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ report


def _f(v, spec: str = ".3f") -> str:
    from training.metrics import fmt

    return fmt(v, spec, "—")


def _band(m: dict, keys: Sequence[str]) -> str:
    """`at_spread` in one cell: each metric at the spread's low -> high threshold ("—" when not measured)."""
    a = m.get("at_spread")
    if not a:
        return "—"
    spec = {"f1": ".3f", "recall": ".3f", "fpr": ".2%"}
    return ", ".join(f"{k} {_f(a['low'].get(k), spec[k])} → {_f(a['high'].get(k), spec[k])}" for k in keys)


# the model's figures at the two ends of its threshold's spread: what threshold noise alone would move
BAND_HEAD = " model at the spread's low → high threshold |"


def render_protocol(proto: dict) -> str:
    name = proto["name"]
    lines = [f"**{name}** — {proto.get('description', '')}", ""]
    if name == "unseen_ham" or all(s.get("spam", 0) == 0 for s in proto["scopes"]):
        lines += ["| scope | rows | model FPR |" + BAND_HEAD + " baseline FPR |", "|---|---:|---:|---|---:|"]
        for s in proto["scopes"]:
            m, b = s.get("model") or {}, s.get("baseline") or {}
            lines.append(f"| {s['scope']} | {s['rows']:,} | {_f(m.get('fpr'), '.2%')} | {_band(m, ['fpr'])} | "
                         f"{_f(b.get('fpr'), '.2%')} |")
        return "\n".join(lines)
    evasion_cols = name == "evasion"
    head = "| scope | rows (spam) | model F1 | ROC-AUC | recall | FPR |"
    head += " recall drop |" if evasion_cols else ""
    head += BAND_HEAD + " baseline F1 | ROC-AUC | recall | FPR |" + (" recall drop |" if evasion_cols else "")
    side_cols = "---:|" * (5 if evasion_cols else 4)  # each side's numbers; the model's band between them
    lines += [head, "|---|---:|" + side_cols + "---|" + side_cols]
    for s in proto["scopes"]:
        cells = [s["scope"], f"{s['rows']:,} ({s['spam']:,})"]
        for side in SIDES:
            m = s.get(side) or {}
            cells += [_f(m.get("f1")), _f(m.get("roc_auc")), _f(m.get("recall")), _f(m.get("fpr"), ".2%")]
            if evasion_cols:
                cells.append(_f(m.get("recall_drop"), "+.3f") if "recall_drop" in m else "—")
            if side == "model":
                cells.append(_band(m, ["f1", "fpr"] if s.get("spam") else ["fpr"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _without(exclude) -> str:
    return f"without {', '.join(exclude)}" if exclude else "on every corpus: the reference fold"


def _when(stamp: str) -> str:
    """A protocol's "measured" form (2026-12-07 21:05 UTC) of an ISO timestamp; anything else as it is."""
    try:
        import datetime as dt

        return dt.datetime.fromisoformat(stamp).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return stamp


def render(result: dict) -> str:
    parts = []
    if result.get("model"):
        parts.append(f"Model: {result['model']}; baseline: {result.get('baseline', '—')}.")
    for proto in result["protocols"]:
        parts.append(render_protocol(proto))
        if proto["name"] == "loco" and proto.get("fold_overrides"):
            parts.append("Fold budget: `" + " ".join(proto["fold_overrides"]) + "`; folds: " + ", ".join(
                f"{f['fold']} ({_without(f['exclude'])}, {f['test_rows']:,} rows scored, "
                f"{f['seconds']:.0f} s{', measured ' + _when(f['measured']) if f.get('measured') else ''})"
                for f in proto.get("folds", [])) + ".")
    return "\n\n".join(parts)
