"""Figure ood: the out-of-distribution benchmark (training/ood.py) of a run and its TF-IDF baseline.

Not part of a plain `make bench` (its leave-one-corpus-out folds train models): `make ood` runs it, and
`make bench ARGS="--only ood"` is the same. The protocols and folds come from the config's `ood:` section;
`--protocols` / `--folds` pick a subset. The model is scored through the run's newest bundle when it has
one (int8, what is served), else through the PyTorch model directory.
"""

from __future__ import annotations

import re

from bench.inputs import BenchError, Inputs, served_bundle

TITLE = "Out-of-distribution quality: the model vs the TF-IDF baseline on traffic neither trained on"
NEEDS = ("model",)
OPTIONS = ("protocols", "folds", "bundle")
TOP_LEVEL = ("protocols",)  # ood.json: protocols[].name, protocols[].scopes[]... at the top of the file


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0, protocols: str = "",
            folds: str = "", bundle: str | None = None) -> dict:
    from training import ood

    # The --config's ood section and recipe (the folds train it); the run is scored on its own test split.
    cfg = inputs.cfg
    names = [p for p in (protocols or ",".join(ood.PROTOCOLS)).split(",") if p]
    if quick:
        cfg.ood.evasion_spam_rows, cfg.ood.evasion_ham_rows = 40, 80
        if not protocols:
            names = [p for p in names if p != "loco"]  # --quick trains nothing
    bundle_dir = served_bundle(bundle, inputs)
    try:
        result = ood.run(cfg, inputs.model_dir, bundle_dir, names, threads,
                         folds=[f for f in folds.split(",") if f])
    except ood.OodError as e:
        raise BenchError(str(e)) from None
    ood.log_to_mlflow(cfg, inputs.run_id, result)
    return result


def render(result: dict) -> str:
    from training import ood

    return ood.render(result)


def merge(previous: dict, record: dict) -> dict:
    """`make ood ARGS="--protocols X"` refreshes protocol X and keeps the other protocols of the previous
    ood.json when they were measured for the same model run (each protocol says when it was measured);
    `--folds F` likewise refreshes fold F of the leave-one-corpus-out protocol and keeps its other folds."""
    same = (previous.get("inputs") or {}).get("run_id") == (record.get("inputs") or {}).get("run_id")
    if not same or not record["inputs"].get("run_id"):
        return record
    before = {p["name"]: p for p in previous.get("protocols", [])}
    for i, p in enumerate(record["protocols"]):
        if p["name"] == "loco" and "loco" in before:
            merged = _merge_folds(before["loco"], p, previous.get("date"), record.get("date"))
            if len(merged.get("folds", [])) > len(p.get("folds", [])):  # folds kept: the command of them all
                record["command"] = re.sub(r" --folds \S+", "", record["command"])
            record["protocols"][i] = merged
    fresh = {p["name"] for p in record["protocols"]}
    kept = [p for p in previous.get("protocols", []) if p["name"] not in fresh]
    for p in kept:
        p.setdefault("measured", previous.get("date"))
    order = {name: i for i, name in enumerate(("unseen_ham", "eval_sets", "evasion", "loco"))}
    record["protocols"] = sorted(kept + record["protocols"], key=lambda p: order.get(p["name"], len(order)))
    if kept:  # measured in parts: the command that measures them all at once reproduces the file
        # a rerun of the folds alone scores no shipped model: the kept protocols' model and baseline stay named
        record["result"] = {**(previous.get("result") or {}), **(record.get("result") or {})}

        record["command"] = re.sub(r" --protocols \S+", "", record["command"])
        record["measured_in_parts"] = {p["name"]: p.get("measured") for p in record["protocols"]}
        record["measured_in_parts"].update({f"loco:{f['fold']}": f.get("measured") for p in record["protocols"]
                                            if p["name"] == "loco" for f in p.get("folds", [])})
    return record


def _merge_folds(old: dict, new: dict, old_date: str | None, new_date: str | None) -> dict:
    """The folds of `new` (a loco protocol) with those of `old` it did not train again, when both trained at
    the same budget (`fold_overrides`): each fold says when it was measured; a fold trained again takes its
    old place."""
    for f in new.get("folds", []):
        f.setdefault("measured", new.get("measured") or new_date)
    fresh = {f["fold"]: f for f in new.get("folds", [])}
    if (old.get("fold_overrides") != new.get("fold_overrides")
            or set(fresh) >= {f["fold"] for f in old.get("folds", [])}):
        return new
    trained = set(fresh)
    folds = [fresh.pop(f["fold"], None) or {**f, "measured": f.get("measured") or old.get("measured") or old_date}
             for f in old.get("folds", [])] + list(fresh.values())
    rank = {f["fold"]: i for i, f in enumerate(folds)}

    def fold_of(scope: dict) -> str:
        return scope["scope"].split(":", 1)[0]

    scopes = [s for s in old.get("scopes", []) if fold_of(s) not in trained] + new.get("scopes", [])
    scopes.sort(key=lambda s: rank.get(fold_of(s), len(rank)))  # stable: a fold's scopes keep their order
    return {**new, "folds": folds, "scopes": scopes}
