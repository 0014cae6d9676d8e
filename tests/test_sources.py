"""training/sources.py: the one reader of labelled CSV/TSV/JSONL files, on small files written into tmp_path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from training.config import CorpusConfig, DataConfig
from training.sources import DataError, DropLog, load_corpus, parse_label, read_labelled_file

def _write_csv(path: Path, header: list[str], rows: list[list], sep: str = ",") -> Path:
    import csv

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize(
    "value, expected",
    [("spam", 1), ("ham", 0), ("SPAM", 1), (" Ham ", 0), ("1", 1), ("0", 0), ("TRUE", 1), ("false", 0),
     ("1.0", 1), (1, 1), (0, 0), (True, 1), (False, 0), (1.0, 1),
     ("", None), ("maybe", None), ("2", None), (2, None), (None, None), ("spam!", None)],
)
def test_parse_label(value, expected):
    assert parse_label(value) == expected


# ------------------------------------------------------------------------------------------ reading files


def test_bad_rows_dropped_and_counted_per_reason(tmp_path):
    good = [[f"r{i}", "spam" if i % 3 == 0 else "ham", f"message number {i} hello"] for i in range(20)]
    path = _write_csv(tmp_path / "c.csv", ["id", "label", "text"], good)
    with open(path, "ab") as f:
        f.write(b"e1,spam,   \n")  # empty after normalisation
        f.write(b"e2,ham,\xe2\x80\x8b\n")  # only a zero-width space
        f.write(b"u1,maybe,some text\n")  # unknown label
        f.write(b"u2,,other text\n")  # empty label
        f.write(b"b1,ham,caf\xe9 latin-1 byte\n")  # not UTF-8
        f.write(b"m1,ham,too,many,fields\n")
        f.write(b"l1,spam," + b"a" * 200 + b"\n")  # over max_chars
    drops = DropLog()
    cc = CorpusConfig(path=str(path), id="id")
    rows = load_corpus("c", cc, DataConfig(max_chars=100), drops)
    assert len(rows) == 20
    assert dict(drops.counts["c"]) == {"empty_text": 2, "unknown_label": 2, "bad_encoding": 1,
                                       "malformed_row": 1, "too_long": 1}
    assert dict(drops.unknown_labels["c"]) == {"maybe": 1, "": 1}
    assert drops.examples["c"]["unknown_label"] == ["u1", "u2"]
    assert rows[0] == {"id": "c:r0", "text": "message number x hello", "label": 1, "source": "c",
                       "channel": "sms"}
    assert sum(r["label"] for r in rows) == 7


def test_subject_joined_and_row_ids_point_at_raw_lines(tmp_path):
    path = _write_csv(tmp_path / "mail.csv.gz", ["subject", "label", "text"],
                      [["Win big", "spam", "line one\nline two"], ["", "ham", "see you at 5"],
                       ["Only a subject", "spam", ""]])
    cc = CorpusConfig(path=str(path), subject="subject", channel="email")
    rows = load_corpus("mail", cc, DataConfig(mask_digits=False), DropLog())
    assert [r["text"] for r in rows] == ["Win big line one line two", "see you at 5", "Only a subject"]
    # no id column: file name + the line where the record starts (the first record spans lines 2-3)
    assert [r["id"] for r in rows] == ["mail:mail.csv.gz:2", "mail:mail.csv.gz:4", "mail:mail.csv.gz:5"]
    assert {r["channel"] for r in rows} == {"email"}


def test_headerless_tsv_with_quotes(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_text('ham\tHe said "hi" to me\nspam\t"FREE" entry now\nSPAM\tcall 0800\n', encoding="utf-8")
    cc = CorpusConfig(path=str(path), header=False, columns=["label", "text"], quoting="none")
    rows = load_corpus("sms", cc, DataConfig(), DropLog())
    assert [(r["text"], r["label"]) for r in rows] == [
        ('He said "hi" to me', 0), ('"FREE" entry now', 1), ("call xxxx", 1)]
    assert rows[2]["id"] == "sms:sms.tsv:3"


def test_jsonl_labels_and_malformed_lines(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [
        {"text": "a real message", "label": True},
        {"text": "another message", "label": 0},
        {"text": "spam message", "label": "Spam"},
        {"label": "ham"},  # no text key
    ])
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n[1, 2]\n\n")
    rows = read_labelled_file(path)
    assert [(r["text"], r["label"], r["source"], r["lang"]) for r in rows] == [
        ("a real message", 1, "x", "en"), ("another message", 0, "x", "en"), ("spam message", 1, "x", "en")]


def test_read_labelled_file_source_column_and_drop_summary(tmp_path, capsys):
    path = _write_csv(tmp_path / "eval.tsv", ["msg", "is_spam", "source"],
                      [["hello there", "false", "a"], ["win now", "TRUE", "b"], ["", "true", "a"],
                       ["ok", "1", ""]], sep="\t")
    rows = read_labelled_file(path, text="msg", label="is_spam")
    assert [(r["text"], r["label"], r["source"]) for r in rows] == [
        ("hello there", 0, "a"), ("win now", 1, "b"), ("ok", 1, "eval")]
    assert "dropped 1 rows (empty_text: 1)" in capsys.readouterr().err


def test_missing_column_error_names_file_and_column(tmp_path):
    path = _write_csv(tmp_path / "bad.csv", ["body", "label"], [["hi", "ham"]])
    with pytest.raises(DataError) as e:
        read_labelled_file(path)
    msg = str(e.value)
    assert "bad.csv" in msg and "'text'" in msg and "'body'" in msg
    cc = CorpusConfig(path=str(path), text="body", label="klass")
    with pytest.raises(DataError, match=r"bad\.csv.*'klass'.*data\.corpora\.bad\.label"):
        load_corpus("bad", cc, DataConfig(), DropLog())
    jl = _write_jsonl(tmp_path / "bad.jsonl", [{"body": "x", "label": "ham"}] * 3)
    with pytest.raises(DataError, match=r"bad\.jsonl.*'text'.*columns are: 'body', 'label'"):
        read_labelled_file(jl)


def test_mostly_unknown_labels_is_an_error_naming_the_values(tmp_path):
    # the wrong column picked as label: a file-level mistake, not a few bad rows
    path = _write_csv(tmp_path / "swap.csv", ["label", "text"],
                      [["Hello there", "ham"], ["Win cash", "spam"], ["See you", "ham"]])
    with pytest.raises(DataError) as e:
        read_labelled_file(path)
    msg = str(e.value)
    assert "swap.csv" in msg and "column 'label'" in msg and "'Hello there'" in msg and "3 of 3" in msg


def test_missing_file_and_glob_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_labelled_file(tmp_path / "nope.csv")
    cc = CorpusConfig(path=str(tmp_path / "nothing_*.csv"))
    with pytest.raises(DataError, match=r"data\.corpora\.z\.path: no file matches"):
        load_corpus("z", cc, DataConfig(), DropLog())
    odd = tmp_path / "x.parquet"
    odd.write_text("x")
    with pytest.raises(DataError, match="format"):
        read_labelled_file(odd)
    truncated = tmp_path / "t.csv.gz"
    truncated.write_bytes(gzip.compress(b"label,text\n" + b"ham,hello there\n" * 500)[:60])
    with pytest.raises(DataError, match=r"t\.csv\.gz: cannot read the file"):
        read_labelled_file(truncated)


def test_the_written_corpora_load_through_the_default_config_with_their_cards():
    """Every corpus the repository ships (data/raw/*) that configs/default.yaml names reads through its own
    entry with nothing dropped but what the entry filters, and has a data card that names its config key;
    the everyday Chinese ham (off by default) is 800 ham rows in both scripts."""
    from training.config import ROOT, load_config

    cfg = load_config("configs/default.yaml")
    cards = {p.read_text(encoding="utf-8") for p in (ROOT / "data_cards").glob("*.md")}
    written = [n for n, c in cfg.data.corpora.items() if c.format == "jsonl"]  # the shipped, written ones
    assert len(written) == 9, written
    for name in written:
        cc = cfg.data.corpora[name]
        drops = DropLog()
        rows = load_corpus(name, cc, cfg.data, drops)
        assert rows and all(r["source"] == name for r in rows), name
        assert any(f"`data.corpora.{name}`" in card for card in cards), f"no data card for {name}"
        assert (ROOT / cc.path).parent.joinpath("SOURCE.md").exists(), name
    everyday = load_corpus("everyday_zh", cfg.data.corpora["everyday_zh"], cfg.data, DropLog())
    assert len(everyday) == 800 and {r["label"] for r in everyday} == {0}
    raw = [json.loads(line) for line in (ROOT / "data/raw/everyday_zh/everyday_zh.jsonl").open(encoding="utf-8")]
    assert {r["script"] for r in raw} == {"simplified", "traditional"} and len({r["id"] for r in raw}) == 800
    assert not [r for r in raw if "http" in r["text"] or "www" in r["text"]]  # ham without a link, as its card says
    # as their cards say
    for name, rows, spam in (("zh_scam_seed", 518, 259), ("zh_ad_seed", 600, 360), ("zh_news_seed", 500, 0),
                             ("zh_mail_seed", 500, 200), ("ja_scam_seed", 520, 260)):
        got = load_corpus(name, cfg.data.corpora[name], cfg.data, DropLog())
        assert len(got) == rows and sum(r["label"] for r in got) == spam, name
        raw = [json.loads(line) for line in (ROOT / f"data/raw/{name}/{name}.jsonl").open(encoding="utf-8")]
        assert len({r["id"] for r in raw}) == rows, name
        if name.startswith("zh_"):  # the Chinese ones are written in both scripts
            assert {r["script"] for r in raw} == {"hans", "hant"}, name
        else:
            assert {r["lang"] for r in raw} == {"ja"}, name
