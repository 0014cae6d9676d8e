"""Which training rows a run reads: the per-source and overall caps (train.max_rows_per_source,
rows_per_source, max_train_rows), fresh rows per epoch, the unread ham the threshold rule adds to validation,
and leave-one-corpus-out exclusion. Seeded by strings, so every process and every later command (make
threshold, make export, the baseline) finds the same rows from the run's `rows_read` in spamlingo.json.
Needs no torch: the baseline and the benchmark read it too."""

from __future__ import annotations

import math

from training.config import Config, ConfigError
from training.trainer import steps_per_epoch


def _capped_indices(labels: list[int], n: int, seed: int, scope: str) -> list[int]:
    """Indices of at most `n` rows, label proportions kept (training.data.cap_rows), original order."""
    import random

    from training.data import cap_rows as cap_records

    records = [{"label": y, "i": i} for i, y in enumerate(labels)]
    # A string seed is hashed stably by `random`: the same rows in every process and every run.
    return [r["i"] for r in cap_records(records, n, random.Random(f"{seed}:{scope}"))]


def cap_training_rows(ds, max_rows_per_source: int, max_train_rows: int, seed: int,
                      rows_per_source: dict[str, int] | None = None):
    """Cap the training split per source, then overall, stratified by label and seeded. Validation and
    test are never capped here, so runs on one prepared dataset are scored on the same rows.
    `rows_per_source` gives some sources a cap of their own instead of `max_rows_per_source` (0 = every
    row of that source): short SMS cost a fraction of an e-mail's training time."""
    rows_per_source = rows_per_source or {}
    if max_rows_per_source < 0 or max_train_rows < 0 or any(v < 0 for v in rows_per_source.values()):
        raise ConfigError("train.max_rows_per_source, train.rows_per_source and train.max_train_rows must be "
                          ">= 0 (0 = no cap)")
    sources, labels = ds["source"], ds["label"]
    if max_rows_per_source or rows_per_source:
        keep: list[int] = []
        for src in sorted(set(sources)):
            rows = [i for i, s in enumerate(sources) if s == src]
            cap = rows_per_source.get(src, max_rows_per_source)
            picked = (_capped_indices([labels[i] for i in rows], cap, seed, f"train:{src}") if cap
                      else range(len(rows)))
            keep.extend(rows[j] for j in picked)
        ds = ds.select(sorted(keep))
    if max_train_rows:
        ds = ds.select(_capped_indices(ds["label"], max_train_rows, seed, "train"))
    return ds


def epoch_row_sets(ds, max_rows_per_source: int, seed: int, epochs: int,
                   rows_per_source: dict[str, int] | None = None) -> tuple[object, list[list[int]]]:
    """`train.fresh_rows_per_epoch`: a capped source gives each epoch rows the earlier epochs have not seen
    while it has any (then it starts over), stratified by label; epoch 0 takes exactly the rows
    `cap_training_rows` keeps. Returns the rows of every epoch together and, per epoch, their positions
    in it (the same count in every epoch). The same compute reads up to `epochs` times the distinct rows."""
    rows_per_source = rows_per_source or {}
    sources, labels = ds["source"], ds["label"]
    per_epoch: list[list[int]] = [[] for _ in range(max(1, epochs))]
    for src in sorted(set(sources)):
        rows = [i for i, s in enumerate(sources) if s == src]
        cap = rows_per_source.get(src, max_rows_per_source)
        if not cap or cap >= len(rows):
            for picked in per_epoch:
                picked.extend(rows)
            continue
        unseen = list(rows)
        for epoch, picked in enumerate(per_epoch):
            scope = f"train:{src}" if epoch == 0 else f"train:{src}:epoch{epoch}"
            if len(unseen) >= cap:
                take = [unseen[j] for j in _capped_indices([labels[i] for i in unseen], cap, seed, scope)]
            else:  # the source runs out: its last unseen rows, the rest drawn again from every row
                seen = sorted(set(rows) - set(unseen))
                take = unseen + [seen[j] for j in _capped_indices([labels[i] for i in seen], cap - len(unseen),
                                                                   seed, scope)]
            picked.extend(take)
            taken = set(take)
            unseen = [i for i in unseen if i not in taken] or list(rows)
    union = sorted(set(i for picked in per_epoch for i in picked))
    position = {i: k for k, i in enumerate(union)}
    return ds.select(union), [sorted(position[i] for i in picked) for picked in per_epoch]


def rows_read(cfg: Config, train_split, world_size: int = 1) -> dict:
    """What decides which training rows a run reads (its caps and seed), kept in spamlingo.json as
    `rows_read`, so that `make threshold` and `make export` find the run's unread rows whatever config
    they are given."""
    t = cfg.train
    return {"max_rows_per_source": t.max_rows_per_source, "rows_per_source": dict(t.rows_per_source),
            "max_train_rows": t.max_train_rows, "seed": t.seed, "fresh_rows_per_epoch": t.fresh_rows_per_epoch,
            "epochs": planned_epochs(cfg, train_split, world_size) if t.fresh_rows_per_epoch else None}


def row_plan(read: dict, train_split):
    """(rows, epoch subsets) a run (its `rows_read`) reads: what `cap_training_rows` keeps and None, or with
    fresh_rows_per_epoch `epoch_row_sets`: every row its epochs read and each epoch's share."""
    if read["fresh_rows_per_epoch"]:
        return epoch_row_sets(train_split, read["max_rows_per_source"], read["seed"], read["epochs"],
                              read["rows_per_source"])
    return cap_training_rows(train_split, read["max_rows_per_source"], read["max_train_rows"], read["seed"],
                             read["rows_per_source"]), None


def rows_kept(read: dict, train_split):
    """The training rows a run (its `rows_read`) reads (`row_plan`'s rows)."""
    return row_plan(read, train_split)[0]


def unread_ham(read: dict, train_split):
    """The training split's ham rows that a run (its `rows_read`) did not read: the per-source caps leave most
    rows of the large sources out, ham the model never saw, which `eval.threshold_unread_ham` adds to
    validation to choose the threshold on."""
    ids = set(rows_kept(read, train_split)["id"])
    return train_split.select([i for i, (rid, y) in enumerate(zip(train_split["id"], train_split["label"]))
                               if y == 0 and rid not in ids])


def ham_pool(cfg: Config, train_split, val_sources, score, read: dict | None = None, show: bool = True):
    """A `training.metrics.HamPool` of `unread_ham` scored by `score(texts) -> p_spam`, or None when
    `eval.threshold_unread_ham` is off or training read every ham row. `read`: the model's `rows_read`
    (spamlingo.json); a model that records none was capped as `cfg` says, and the pool says so."""
    if not cfg.eval.threshold_unread_ham:
        return None
    from training.metrics import HamPool

    assumed = read is None
    read = read or rows_read(cfg, train_split)
    rows = unread_ham(read, train_split)
    if len(rows) == 0:
        if show:
            print("threshold: every training ham row was read (no caps): validation alone", flush=True)
        return None
    pool = HamPool(score(list(rows["text"])), list(rows["source"]), list(rows["lang"]), list(val_sources),
                   rows_read=read, origin=HamPool.origin
                   + (" (as the config caps them: the model records no rows_read)" if assumed else ""))
    if show:
        by = ", ".join(f"{s} {n}" for s, n in pool.describe()["by_source"].items())
        print(f"threshold: validation and {len(rows)} training ham rows the model did not read ({by}), "
              "weighted to validation's share of each source (eval.threshold_unread_ham)"
              + ("; the model records no rows_read, so the config's caps decide them" if assumed else ""),
              flush=True)
    return pool


def planned_epochs(cfg: Config, train_split, world_size: int) -> int:
    """How many epochs (whole or begun) the run will start: train.epochs, or what train.max_steps takes."""
    t = cfg.train
    if t.max_steps <= 0:
        return max(1, math.ceil(t.epochs))
    from collections import Counter

    counts = Counter(train_split["source"])
    rows = sum(min(n, t.rows_per_source.get(s, t.max_rows_per_source) or n) for s, n in counts.items())
    return max(1, math.ceil(t.max_steps / steps_per_epoch(rows, t.batch_size, t.grad_accum, world_size)))


def exclude_sources(splits, sources: list[str]):
    """The splits without `sources` in train and validation (a leave-one-corpus-out fold); test is kept
    whole, so the fold's held-out corpus can be scored from it and the other sources stay comparable."""
    if not sources:
        return splits
    known = set(splits["train"]["source"]) | set(splits["validation"]["source"])
    unknown = sorted(set(sources) - known)
    if unknown:
        raise ConfigError(f"train.exclude_sources: no source {', '.join(unknown)} in the prepared data "
                          f"(sources: {', '.join(sorted(known))})")
    drop = set(sources)
    out = dict(splits)
    for split in ("train", "validation"):
        out[split] = splits[split].filter(lambda s: s not in drop, input_columns="source")
    return out


def cap_eval_rows(ds, n: int, seed: int):
    """At most `n` validation rows (0 = all), stratified by label: what the per-epoch evaluation scores."""
    if n < 0:
        raise ConfigError("train.max_eval_rows must be >= 0 (0 = every validation row)")
    return ds.select(_capped_indices(ds["label"], n, seed, "validation")) if n else ds
