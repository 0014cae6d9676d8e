"""Training-split augmentation: copies of some training rows rewritten by one of the evasion perturbations
(training/evasion.py), added beside the originals with the same label.

`train.augment: {zh_traditional: 0.3}` copies 30% of the training rows that the perturbation changes (per
label, seeded), ham and spam alike, so that the rewriting itself teaches nothing about the label: the model
learns to read Traditional characters as it reads Simplified ones. Only the training split is augmented;
validation (the threshold) and test stay as the corpora wrote them. The TF-IDF baseline reads the same
augmented rows (training/baseline.py), so that the two are compared on the same data.

A perturbation the shared normaliser undoes (full-width forms, zero-width characters...) changes nothing
after normalisation and is refused: its copies would only repeat rows.
"""

from __future__ import annotations

import random

from training.config import ConfigError


def check(shares: dict[str, float]) -> None:
    from training.evasion import PERTURBATIONS, UNDONE_BY_NORMALISER

    for name, share in shares.items():
        if name not in PERTURBATIONS:
            raise ConfigError(f"train.augment: no perturbation {name!r} (one of {', '.join(sorted(PERTURBATIONS))})")
        if name in UNDONE_BY_NORMALISER:
            raise ConfigError(f"train.augment.{name}: the shared normaliser undoes it, so its copies would repeat rows")
        if not 0 < share <= 1:
            raise ConfigError(f"train.augment.{name} must be in (0, 1] (the share of the rows it changes), got {share}")


def augment_rows(ds, shares: dict[str, float], seed: int):
    """`ds` (a datasets.Dataset of training rows) with the copies appended; the copies' ids end in
    `+<perturbation>`. Deterministic for a seed: the same rows and the same rewriting in every run."""
    if not shares:
        return ds
    check(shares)
    from datasets import concatenate_datasets

    from training.evasion import PERTURBATIONS

    texts, labels = ds["text"], ds["label"]
    added = []
    for name, share in sorted(shares.items()):
        perturb = PERTURBATIONS[name]
        rewritten = {}
        for i, text in enumerate(texts):
            new = perturb(text, random.Random(f"{seed}:augment:{name}:{i}"))
            if new != text:
                rewritten[i] = new
        rng = random.Random(f"{seed}:augment:{name}")
        for label in sorted(set(labels)):
            eligible = [i for i in sorted(rewritten) if labels[i] == label]
            picked = sorted(rng.sample(eligible, round(share * len(eligible))))
            if not picked:
                continue
            added.append(_rewritten(ds, picked, rewritten, "+" + name))
    return concatenate_datasets([ds, *added]) if added else ds


def _rewritten(ds, picked: list[int], rewritten: dict[int, str], suffix: str):
    from datasets import Dataset

    sub = ds.select(picked).to_dict()
    sub["text"] = [rewritten[i] for i in picked]
    if "id" in sub:
        sub["id"] = [f"{i}{suffix}" for i in sub["id"]]
    return Dataset.from_dict(sub, features=ds.features)
