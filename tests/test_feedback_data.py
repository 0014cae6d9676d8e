"""The feedback store as a training corpus (training/feedback_data.py): the poisoning guard, `make data` on a
real SQLite store with the real smoke config shrunk (splits, manifest, card, re-preparing on new reports),
and one-line errors."""

from __future__ import annotations

import pytest

from serving.feedback import FeedbackStore
from training.config import load_config
from training.feedback_data import guard

SMOKE = "configs/smoke.yaml"
SHRINK = [
    "data.corpora.uci_sms.cap=80", "data.corpora.zh_sms.cap=80", "data.corpora.spamassassin.cap=60",
    "data.corpora.enron.cap=60", "data.corpora.cjk_seed.cap=60", "data.corpora.licensed_ham.cap=40",
]
VOCAB = ("river market yellow window garden pencil silver orange mountain coffee winter ticket planet "
         "bridge candle forest guitar island jacket kettle ladder meadow needle pillow rocket saddle "
         "tomato violin wallet zipper anchor basket cactus dragon engine falcon glacier harbor").split()


def words(i: int, n: int = 5) -> str:
    """n words picked by i: reports that differ enough not to be near-duplicates of each other (a group of
    near-duplicates goes to one split), without digits (the normaliser masks them)."""
    import random

    return " ".join(random.Random(i).sample(VOCAB, n))


def _report(h: str, label: str, reporter: str, i: int) -> dict:
    return {"id": i, "text_hash": h, "label": label, "reporter": reporter}




def test_guard_holds_back_conflicts_and_caps_each_reporter():
    reports = [_report("a", "spam", "x", 1), _report("a", "ham", "y", 2),     # conflict: both held back
               _report("b", "spam", "x", 3), _report("b", "spam", "y", 4),    # same text twice: kept once
               *[_report(f"f{i}", "spam", "flood", 10 + i) for i in range(30)],
               *[_report(f"h{i}", "ham", "", 100 + i) for i in range(5)]]    # anonymous: one reporter
    kept, held, cap = guard(reports, max_share=0.2, min_rows=10)
    assert {r["id"] for r in held["conflicting_labels"]} == {1, 2}
    texts = 1 + 30 + 5  # b, the flood, the anonymous ham
    assert cap == max(10, int(0.2 * texts)) == 10
    assert [r["id"] for r in kept if r["reporter"] == "flood"] == list(range(10, 20))  # the oldest ten
    assert len(held["reporter_cap"]) == 20
    assert [r["id"] for r in kept if r["text_hash"] == "b"] == [3]
    assert sum(r["reporter"] == "" for r in kept) == 5
    # a larger share lets the flood in, up to the new cap
    kept, held, cap = guard(reports, max_share=0.5, min_rows=0)
    assert cap == 18 and sum(r["reporter"] == "flood" for r in kept) == 18


def _fill(store: FeedbackStore) -> None:
    for i in range(12):
        store.add(f"claim your reward now {words(i)}", "spam", reporter="alice")
        store.add(f"see you later {words(100 + i)}", "ham", reporter="bob")
    for i in range(40):
        store.add(f"newsletter {words(200 + i)}", "ham", reporter="mallory")
    store.add("is this spam or not", "spam", reporter="carol")
    store.add("is this spam or not", "ham", reporter="dave")


def test_make_data_reads_the_store_with_the_guard_and_writes_its_card(tmp_path, monkeypatch):
    from training.data import ensure_prepared, load_manifest, load_splits

    db = f"sqlite:///{tmp_path / 'fb.db'}"
    with FeedbackStore(db) as store:
        _fill(store)
    cfg = load_config(SMOKE, SHRINK + ["data.corpora.feedback.enabled=true", f"data.corpora.feedback.path={db}",
                                       f"data.output_dir={tmp_path / 'data'}"])
    out = ensure_prepared(cfg)
    m = load_manifest(cfg)
    info = m["corpora"]["feedback"]["feedback"]
    assert info["reports"] == 66 and info["reporters"] == 5
    unique = 12 + 12 + 40  # the disputed text is out before the cap is computed
    assert info["reporter_cap"] == 20 == max(20, int(0.2 * unique))
    assert info["held_back"] == {"conflicting_labels": 2, "reporter_cap": 20}
    assert m["drops_by_source"]["feedback"] == {"conflicting_labels": 2, "reporter_cap": 20}
    dd = load_splits(cfg)
    rows = [r for s in dd for r in dd[s] if r["source"] == "feedback"]
    assert len(rows) == 12 + 12 + 20
    assert not any("spam or not" in r["text"] for r in rows)
    test_ids = {r["id"] for r in dd["test"] if r["source"] == "feedback"}
    train_ids = {r["id"] for r in dd["train"] if r["source"] == "feedback"}
    assert test_ids and train_ids and not test_ids & train_ids
    card = (out / "feedback_card.md").read_text(encoding="utf-8")
    assert "reports read: 66 from 5 reporter(s)" in card and "| reporter_cap | 20 | en 20 |" in card
    # a new report changes the store's fingerprint: the next make data prepares again
    with FeedbackStore(db) as store:
        store.add("one more message from a friend", "ham", reporter="erin")
    ensure_prepared(cfg)
    assert load_manifest(cfg)["corpora"]["feedback"]["feedback"]["reports"] == 67


def test_a_missing_store_or_a_bad_guard_setting_is_one_line(tmp_path, capsys):
    from training.data import main

    base = ["--config", SMOKE, "data.corpora.feedback.enabled=true", f"data.output_dir={tmp_path / 'd'}"]
    with pytest.raises(SystemExit) as e:
        main(base + [f"data.corpora.feedback.path=sqlite:///{tmp_path / 'none.db'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "data.corpora.feedback" in err and "no feedback store" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(base + ["data.corpora.feedback.max_reporter_share=0"])
    assert "max_reporter_share must be in (0, 1]" in capsys.readouterr().err
