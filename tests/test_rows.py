"""Which training rows a run reads (training/rows.py): per-source caps and fresh rows per epoch, on small
in-memory datasets; the unread ham and the folds' exclusion are exercised by test_train, test_export and
test_ood through real runs."""

from __future__ import annotations

import pytest

from training.config import ConfigError
from training.rows import cap_training_rows, epoch_row_sets
from training.trainer import EpochSubsetSampler


def test_cap_training_rows_per_source_and_overall_keeps_label_mix():
    from datasets import Dataset

    rows = [{"source": s, "label": int(i % 4 == 0), "text": f"{s}{i}"} for s in ("a", "b") for i in range(100)]
    ds = Dataset.from_list(rows)
    capped = cap_training_rows(ds, max_rows_per_source=40, max_train_rows=0, seed=1)
    assert [capped["source"].count(s) for s in ("a", "b")] == [40, 40]
    assert sum(capped["label"]) == 20  # 25% spam in each source, kept
    again = cap_training_rows(ds, 40, 0, seed=1)
    assert capped["text"] == again["text"]
    assert capped["text"] != cap_training_rows(ds, 40, 0, seed=2)["text"]
    both = cap_training_rows(ds, 40, 30, seed=1)
    assert len(both) == 30 and sum(both["label"]) in (7, 8) and set(both["text"]) <= set(capped["text"])
    assert len(cap_training_rows(ds, 0, 0, seed=1)) == 200
    with pytest.raises(ConfigError):
        cap_training_rows(ds, -1, 0, seed=1)
    # a source's own cap: "a" whole (0), "b" at 10; the other sources keep exactly the rows they had
    own = cap_training_rows(ds, 40, 0, seed=1, rows_per_source={"a": 0})
    assert [own["source"].count(s) for s in ("a", "b")] == [100, 40]
    assert [t for t in own["text"] if t.startswith("b")] == [t for t in capped["text"] if t.startswith("b")]
    own = cap_training_rows(ds, 0, 0, seed=1, rows_per_source={"b": 10, "absent": 5})
    assert [own["source"].count(s) for s in ("a", "b")] == [100, 10]
    with pytest.raises(ConfigError):
        cap_training_rows(ds, 40, 0, seed=1, rows_per_source={"a": -1})


def test_fresh_rows_per_epoch_reads_unseen_rows_first_with_the_first_epoch_as_capped():
    from datasets import Dataset

    rows = [{"source": s, "label": int(i % 4 == 0), "text": f"{s}{i}"} for s, n in (("a", 100), ("b", 30))
            for i in range(n)]
    ds = Dataset.from_list(rows)
    union, subsets = epoch_row_sets(ds, 40, seed=1, epochs=3)
    texts = union["text"]
    epochs = [[texts[i] for i in sub] for sub in subsets]
    assert len({len(e) for e in epochs}) == 1 and len(epochs[0]) == 40 + 30  # "b" (30 rows) is under the cap
    # the first epoch reads exactly the rows the plain cap keeps
    assert sorted(epochs[0]) == sorted(cap_training_rows(ds, 40, 0, seed=1)["text"])
    a = [{t for t in e if t.startswith("a")} for e in epochs]
    assert not a[0] & a[1] and len(a[0] | a[1]) == 80  # the second epoch: 40 rows the first did not read
    assert a[2] >= set(texts) - a[0] - a[1] - {t for t in texts if t.startswith("b")}  # the last 20 unseen, then
    assert len(a[2]) == 40 and all(sum(t in e for t in [f"b{i}" for i in range(30)]) == 30 for e in epochs)
    for e in a:  # each epoch keeps the label mix (every 4th row is spam)
        assert sum(int(t[1:]) % 4 == 0 for t in e) == 10
    assert epoch_row_sets(ds, 40, seed=1, epochs=3)[1] == subsets  # seeded
    assert len(union) == 130  # every "a" row read at least once, every "b" row

    sampler = EpochSubsetSampler(subsets, [len(t) for t in texts], batch_size=8, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == subsets[epoch] and len(sampler) == 70
