"""training/data.py and its mix card (training/mix_card.py) on small fixture corpora in tmp_path, plus the real
default config shrunk."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pytest

from serving.text import normalize
from training.config import Config, CorpusConfig, DataConfig, load_config
from test_sources import _write_csv, _write_jsonl
from training.data import (
    SPLITS,
    DataError,
    _split_hash,
    canonical,
    ensure_prepared,
    load_splits,
    main,
    near_duplicate_groups,
    prepare,
)

WORDS = ("free prize call now claim cash offer win mobile txt reply stop meeting lunch tomorrow report "
         "project thanks please review budget weekend dinner home later office schedule update invoice").split()


def _sentence(rng: random.Random, n: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + f" ref{rng.randrange(10**9)}"


def _data_cfg(tmp_path: Path, corpora: dict[str, CorpusConfig], **kw) -> Config:
    kw.setdefault("output_dir", str(tmp_path / "processed"))
    return Config(data=DataConfig(corpora=corpora, **kw))


def _all_rows(dd) -> list[tuple[str, dict]]:
    return [(s, r) for s in SPLITS for r in dd[s]]


# ------------------------------------------------------------------------------------------ duplicates


def test_canonical_form_matches_tokenised_copies():
    original = "Hi! Do you dream of working for yourself? Call 2:00 p.m. — NOW"
    tokenised = "hi ! do you dream of working for yourself ? call 2 : 00 p . m . - now"
    assert canonical(original, 2000) == canonical(tokenised, 2000) == "hidoyoudreamofworkingforyourselfcall200pmnow"
    assert canonical("限时优惠，点击 http://x.cn", 2000) == "限时优惠点击httpxcn"
    assert canonical("abcdef", 3) == "abc"


def test_near_duplicate_groups():
    rng = random.Random(0)
    base = [_sentence(rng, 40) for _ in range(6)]
    variant = base[0].replace(base[0].split()[10], "CHANGED", 1)
    tokenised = " , ".join(base[1].upper().split())
    texts = base + [variant, tokenised, "", "!!!"]
    g = near_duplicate_groups(texts, threshold=0.8, shingle=5, num_perm=64, max_chars=2000)
    assert g[6] == g[0] and g[7] == g[1]
    assert len({g[i] for i in range(6)}) == 6  # unrelated sentences stay apart
    assert g[8] != g[9] and g[8] not in g[:8]  # nothing to shingle: a group of its own
    assert g == near_duplicate_groups(texts, 0.8, 5, 64, 2000)  # deterministic


# ------------------------------------------------------------------------------------------ prepare


def _fixture_corpora(tmp_path: Path) -> dict[str, CorpusConfig]:
    """Two corpora with exact duplicates, near-duplicate families (also across corpora), a label conflict
    and Japanese/Korean rows."""
    rng = random.Random(7)
    sms = []
    for i in range(240):
        label = "spam" if i % 4 == 0 else "ham"
        sms.append([f"s{i}", label, _sentence(rng)])
    families = [_sentence(rng, 60) for _ in range(12)]
    for f, text in enumerate(families):  # 12 families of 5 near-duplicates each, spam
        words = text.split()
        for k in range(5):
            w = list(words)
            w[k * 3 + 1] = f"VAR{k}"
            sms.append([f"f{f}_{k}", "spam", " ".join(w)])
    sms.append(["d1", "ham", sms[1][2]])  # exact duplicate (same label)
    sms.append(["d2", "ham", sms[2][2].upper()])  # differs in case only: not exact, a near-duplicate
    sms.append(["c1", "spam", "the same text with both labels"])
    sms.append(["c2", "ham", "the  same text with both labels"])  # equal after normalisation
    _write_csv(tmp_path / "sms.csv", ["id", "label", "text"], sms)
    mail = []
    for i in range(120):
        label = "spam" if i % 2 else "ham"
        mail.append([f"m{i}", label, f"subject {i}", _sentence(rng, 60)])
    for f in range(4):  # tokenised lower-case copies of the sms spam families, as Enron has of SpamAssassin
        mail.append([f"copy{f}", "spam", "", " , ".join(families[f].lower().split())])
    _write_csv(tmp_path / "mail.csv.gz", ["id", "label", "subject", "text"], mail)
    cjk = [
        {"text": "【楽天】お客様のアカウントが一時停止されました。こちらから確認してください", "label": "spam"},
        {"text": "明日の会議は十時からです。よろしくお願いします", "label": "ham"},
        {"text": "今すぐ登録で1万円プレゼント！期間限定キャンペーン", "label": "spam"},
        {"text": "[광고] 대출 한도 조회 무료! 지금 바로 신청하세요", "label": "spam"},
        {"text": "오늘 저녁에 같이 밥 먹을래요?", "label": "ham"},
        {"text": "축하합니다 이벤트에 당첨되셨습니다 링크를 눌러 확인하세요", "label": "spam"},
    ]
    _write_jsonl(tmp_path / "cjk.jsonl", cjk)
    return {
        "sms": CorpusConfig(path=str(tmp_path / "sms.csv"), id="id"),
        "mail": CorpusConfig(path=str(tmp_path / "mail*.csv.gz"), id="id", subject="subject", channel="email"),
        "cjk": CorpusConfig(path=str(tmp_path / "cjk.jsonl"), channel="other"),
        "off": CorpusConfig(path=str(tmp_path / "missing_but_disabled.csv"), enabled=False),
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fixture")
    cfg = _data_cfg(tmp, _fixture_corpora(tmp), mix_card=str(tmp / "mix.md"))
    out = prepare(cfg)
    return cfg, out, load_splits(cfg), json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_prepare_writes_layout_and_consistent_manifest(prepared):
    cfg, out, dd, manifest = prepared
    assert (out / "dataset").is_dir() and (out / "config.yaml").exists()
    assert set(dd) == set(SPLITS)
    assert list(dd["train"].features) == ["id", "text", "label", "source", "channel", "lang", "group"]
    for s in SPLITS:
        info = manifest["splits"][s]
        assert info["rows"] == len(dd[s]) > 0
        assert info["sha256"] == _split_hash(list(dd[s]))  # the hash is of what was saved
        assert sum(n for src in info["counts"].values() for n in src.values()) == len(dd[s])
    assert set(manifest["corpora"]) == {"sms", "mail", "cjk", "off"}
    assert manifest["corpora"]["off"]["enabled"] is False
    assert {r["source"] for _, r in _all_rows(dd)} == {"sms", "mail", "cjk"}
    # one exact duplicate removed, both copies of the conflicting text dropped
    assert manifest["duplicates"]["exact"] == 1
    assert manifest["drops"] == {"label_conflict": 2}
    texts = [r["text"] for _, r in _all_rows(dd)]
    assert "the same text with both labels" not in texts
    assert len(texts) == len(set(texts))
    # every row leads back to its raw row
    ids = {r["id"] for _, r in _all_rows(dd)}
    assert {"sms:s0", "mail:m3", "cjk:cjk.jsonl:1", "sms:f0_0"} <= ids
    card = Path(cfg.data.mix_card).read_text(encoding="utf-8")
    for needle in ("## Rows per split, source, language and label", "p99", "label_conflict",
                   "No Japanese (ja) or Korean (ko) labelled spam corpus", "`off`", manifest["dataset_hash"]):
        assert needle in card


def test_no_text_and_no_group_in_two_splits(prepared):
    _, _, dd, manifest = prepared
    split_of_text, split_of_group = {}, defaultdict(set)
    for s, r in _all_rows(dd):
        assert split_of_text.setdefault(r["text"], s) == s
        split_of_group[r["group"]].add(s)
    assert all(len(v) == 1 for v in split_of_group.values())
    # the near-duplicate families were found: 12 families (+ 4 cross-corpus copies)
    rows = [r for _, r in _all_rows(dd)]
    fam = defaultdict(set)
    for r in rows:
        if r["id"].startswith("sms:f"):
            fam[r["id"].split("_")[0]].add(r["group"])
    assert len(fam) == 12 and all(len(g) == 1 for g in fam.values())
    copies = {r["group"] for r in rows if r["id"].startswith("mail:copy")}
    assert copies <= {next(iter(fam[f"sms:f{f}"])) for f in range(4)}
    assert manifest["duplicates"]["near_groups"] >= 12
    assert manifest["duplicates"]["near_cross_source_groups"] == 4


def test_splits_stratified_by_source_and_label(prepared):
    _, _, _, manifest = prepared
    counts = {s: manifest["splits"][s]["counts"] for s in SPLITS}
    for source in ("sms", "mail"):
        for label in ("ham", "spam"):
            n = {s: counts[s].get(source, {}).get(label, 0) for s in SPLITS}
            total = sum(n.values())
            assert n["validation"] >= 0.05 * total and n["test"] >= 0.1 * total, (source, label, n)


def test_japanese_and_korean_rows_pass_through(prepared):
    _, _, dd, _ = prepared
    cjk = {r["text"]: r for _, r in _all_rows(dd) if r["source"] == "cjk"}
    assert len(cjk) == 6
    assert cjk[normalize("今すぐ登録で1万円プレゼント！期間限定キャンペーン", True)]["lang"] == "ja"
    assert "今すぐ登録でx万円プレゼント!期間限定キャンペーン" in cjk  # normalised: digit masked, "！" folded
    assert sorted(r["lang"] for r in cjk.values()) == ["ja"] * 3 + ["ko"] * 3
    assert {r["channel"] for r in cjk.values()} == {"other"}


def test_same_seed_same_splits_other_seed_different(prepared, tmp_path):
    cfg, _, dd, manifest = prepared
    corpora = _fixture_corpora(tmp_path)  # the same rows, written again
    again = prepare(_data_cfg(tmp_path, corpora, output_dir=str(tmp_path / "again")))
    m2 = json.loads((again / "manifest.json").read_text(encoding="utf-8"))
    assert m2["dataset_hash"] == manifest["dataset_hash"]
    other = prepare(_data_cfg(tmp_path, corpora, output_dir=str(tmp_path / "other"), seed=99))
    m3 = json.loads((other / "manifest.json").read_text(encoding="utf-8"))
    assert m3["dataset_hash"] != manifest["dataset_hash"]
    from datasets import load_from_disk

    test_ids = set(dd["test"]["id"])
    other_ids = set(load_from_disk(str(other / "dataset"))["test"]["id"])
    assert test_ids != other_ids and len(test_ids & other_ids) < len(test_ids)


def test_cap_and_weight(tmp_path):
    rng = random.Random(3)
    rows = [[f"a{i}", "spam" if i < 100 else "ham", _sentence(rng)] for i in range(400)]
    _write_csv(tmp_path / "a.csv", ["id", "label", "text"], rows)
    rows = [[f"b{i}", "spam" if i % 2 else "ham", _sentence(rng)] for i in range(200)]
    _write_csv(tmp_path / "b.csv", ["id", "label", "text"], rows)

    def run(name, wa, wb, cap):
        corpora = {"a": CorpusConfig(path=str(tmp_path / "a.csv"), id="id", cap=cap, weight=wa),
                   "b": CorpusConfig(path=str(tmp_path / "b.csv"), id="id", weight=wb)}
        out = prepare(_data_cfg(tmp_path, corpora, output_dir=str(tmp_path / name)))
        return json.loads((out / "manifest.json").read_text(encoding="utf-8"))

    base = run("base", 1.0, 1.0, 200)
    a_total = {lab: sum(base["splits"][s]["counts"]["a"][lab] for s in SPLITS) for lab in ("ham", "spam")}
    assert a_total == {"ham": 150, "spam": 50}  # cap 200 of 400 keeps the 1:3 label ratio
    weighted = run("weighted", 2.0, 0.5, 200)
    for lab in ("ham", "spam"):
        assert weighted["splits"]["train"]["counts"]["a"][lab] == 2 * base["splits"]["train"]["counts"]["a"][lab]
        assert abs(weighted["splits"]["train"]["counts"]["b"][lab]
                   - base["splits"]["train"]["counts"]["b"][lab] / 2) <= 1
    for s in ("validation", "test"):  # evaluation splits are never re-weighted
        assert weighted["splits"][s]["counts"] == base["splits"][s]["counts"]
    assert weighted["unweighted_train"]["counts"] == base["splits"]["train"]["counts"]


def test_train_only_corpus_never_reaches_validation_or_test(tmp_path):
    rng = random.Random(4)
    a = [[f"a{i}", "spam" if i % 3 == 0 else "ham", _sentence(rng)] for i in range(300)]
    _write_csv(tmp_path / "a.csv", ["id", "label", "text"], a)
    seed = [[f"s{i}", "spam" if i % 2 else "ham", _sentence(rng)] for i in range(100)]
    seed += [[f"copy{i}", a[i][1], a[i][2] + " x"] for i in range(10)]  # near-duplicates of corpus a's rows
    _write_csv(tmp_path / "seed.csv", ["id", "label", "text"], seed)

    def run(name, train_only):
        corpora = {"a": CorpusConfig(path=str(tmp_path / "a.csv"), id="id"),
                   "seed": CorpusConfig(path=str(tmp_path / "seed.csv"), id="id", train_only=train_only)}
        cfg = _data_cfg(tmp_path, corpora, output_dir=str(tmp_path / name), mix_card=str(tmp_path / f"{name}.md"))
        out = prepare(cfg)
        from datasets import load_from_disk

        return load_from_disk(str(out / "dataset")), Path(cfg.data.mix_card).read_text(encoding="utf-8")

    mixed, _ = run("mixed", False)
    assert any(r["source"] == "seed" for s in ("validation", "test") for r in mixed[s])
    dd, card = run("train_only", True)
    assert all(r["source"] != "seed" for s in ("validation", "test") for r in dd[s])
    assert sum(r["source"] == "seed" for r in dd["train"]) == 110  # every row kept, none lost
    # the copies' near-duplicate partners in corpus a follow them into train: no group straddles splits
    copied = {normalize(a[i][2], True) for i in range(10)}
    assert {s for s in SPLITS for r in dd[s] if r["text"] in copied} == {"train"}
    assert sum(r["source"] == "a" for s in ("validation", "test") for r in dd[s]) >= 0.2 * 290
    assert "(train only)" in card


def test_langs_keeps_only_the_listed_languages_and_counts_the_rest(tmp_path):
    records = [{"id": f"r{i}", "label": "spam" if i % 2 else "ham", "text": t} for i, t in enumerate([
        "Your parcel is waiting, pay the fee at http://x.example", "Lunch tomorrow at noon?",
        "お荷物の配達に失敗しました。こちらから確認してください", "明日のランチ、楽しみにしています",
        "고객님의 택배가 반송되었습니다 확인하세요", "내일 점심 같이 먹어요",
        "恭喜您获得大奖，请点击链接领取", "明天一起吃午饭吧"] * 3)]
    for i, r in enumerate(records):  # three distinct copies of each (digits would be masked to one)
        r["text"] += " " + "xyz"[i // 8] * 3
    _write_jsonl(tmp_path / "m.jsonl", records)
    corpora = {"m": CorpusConfig(path=str(tmp_path / "m.jsonl"), id="id", langs=["ja", "ko", "zh"])}
    out = prepare(_data_cfg(tmp_path, corpora))
    from datasets import load_from_disk

    dd = load_from_disk(str(out / "dataset"))
    assert sorted({r["lang"] for _, r in _all_rows(dd)}) == ["ja", "ko", "zh"]
    assert sum(len(dd[s]) for s in SPLITS) == 18
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["drops_by_source"]["m"] == {"other_language": 6}
    # labels as well: the Japanese, Korean and Chinese rows of both labels, and the English ham, from one file
    corpora["m"].keep_labels = ["ham"]
    corpora["m2"] = CorpusConfig(path=str(tmp_path / "m.jsonl"), id="id", langs=["en"], keep_labels=["ham"])
    out = prepare(_data_cfg(tmp_path, {"cjk": corpora["m"], "en_ham": corpora["m2"]},
                            output_dir=str(tmp_path / "by_label")))
    rows = [r for _, r in _all_rows(load_from_disk(str(out / "dataset")))]
    assert {r["label"] for r in rows} == {0} and len(rows) == 12  # 9 ja/ko/zh ham + 3 en ham
    assert sorted({(r["source"], r["lang"]) for r in rows}) == [("cjk", "ja"), ("cjk", "ko"), ("cjk", "zh"),
                                                                 ("en_ham", "en")]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["drops_by_source"]["cjk"] == {"other_language": 6, "other_label": 9}
    assert manifest["drops_by_source"]["en_ham"] == {"other_language": 18, "other_label": 3}
    corpora["m"].keep_labels = ["junk"]
    with pytest.raises(DataError, match=r"data\.corpora\.m\.keep_labels: \['junk'\]"):
        prepare(_data_cfg(tmp_path, corpora, output_dir=str(tmp_path / "bad")))
    corpora["m"].keep_labels = []
    corpora["m"].langs = ["jp"]
    with pytest.raises(DataError, match=r"data\.corpora\.m\.langs: \['jp'\]"):
        prepare(_data_cfg(tmp_path, corpora, output_dir=str(tmp_path / "bad")))


def test_ensure_prepared_reuses_and_refreshes(tmp_path):
    corpora = _fixture_corpora(tmp_path)
    cfg = _data_cfg(tmp_path, corpora)
    out = ensure_prepared(cfg)
    manifest = out / "manifest.json"
    first = manifest.stat().st_mtime_ns
    assert ensure_prepared(cfg) == out and manifest.stat().st_mtime_ns == first  # up to date: untouched
    cfg.data.seed = 5
    ensure_prepared(cfg)
    m = json.loads(manifest.read_text(encoding="utf-8"))
    assert m["config"]["seed"] == 5 and manifest.stat().st_mtime_ns != first


def test_bad_config_values_are_data_errors(tmp_path):
    corpora = _fixture_corpora(tmp_path)
    with pytest.raises(DataError, match="validation_fraction"):
        prepare(_data_cfg(tmp_path, corpora, validation_fraction=0.6, test_fraction=0.5))
    with pytest.raises(DataError, match="must be > 0"):  # was an empty split that load_splits could not read
        prepare(_data_cfg(tmp_path, corpora, validation_fraction=0))
    corpora["sms"].weight = 0
    with pytest.raises(DataError, match=r"data\.corpora\.sms\.weight"):
        prepare(_data_cfg(tmp_path, corpora))
    with pytest.raises(DataError, match="no enabled corpus"):
        prepare(_data_cfg(tmp_path, {"x": CorpusConfig(path="x.csv", enabled=False)}))


def test_cli_user_mistake_is_one_line_and_nonzero(tmp_path, capsys):
    path = _write_csv(tmp_path / "c.csv", ["msg", "label"], [["hi", "ham"]])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  output_dir: {tmp_path / 'out'}\n  corpora:\n    c: {{path: {path}}}\n",
                   encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(cfg)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and "c.csv" in err and "'text'" in err
    with pytest.raises(SystemExit):
        main(["--config", str(cfg), "data.corpora.c.text=msg", "data.bogus=1"])
    assert "data.bogus" in capsys.readouterr().err


def test_real_default_config_shrunk(tmp_path, capsys):
    """The real corpora through the real default config, capped small, output in tmp_path."""
    caps = {"uci_sms": 150, "zh_sms": 150, "spamassassin": 120, "enron": 120, "cjk_seed": 200, "licensed_ham": 80,
            "notice_seed": 60, "zh_scam_seed": 40, "zh_ad_seed": 40, "zh_mail_seed": 40, "zh_news_seed": 40,
            "ja_scam_seed": 40}
    overrides = [f"data.corpora.{k}.cap={v}" for k, v in caps.items()]
    overrides += [f"data.output_dir={tmp_path / 'out'}", f"data.mix_card={tmp_path / 'mix.md'}"]
    main(["--config", "configs/default.yaml", *overrides])
    printed = capsys.readouterr().out
    assert "dataset_hash" in printed and "enron" in printed
    cfg = load_config("configs/default.yaml", overrides)
    dd = load_splits(cfg)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    rows = _all_rows(dd)
    by_source = defaultdict(int)
    for _, r in rows:
        by_source[r["source"]] += 1
    assert set(by_source) == set(caps)  # zh_fraud and everyday_zh are disabled in the default mix
    for k, cap in caps.items():
        assert by_source[k] == cap  # exact duplicates are removed before the cap; near-duplicates are kept
    groups = defaultdict(set)
    for s, r in rows:
        groups[r["group"]].add(s)
        assert r["id"].startswith(r["source"] + ":") and r["text"] == normalize(r["text"], True)
    assert all(len(v) == 1 for v in groups.values())
    langs = {r["lang"] for _, r in rows if r["source"] == "zh_sms"}
    assert "zh" in langs
    # notice_seed: its ja/ko/zh rows only (the English ones are counted as dropped), all in train
    assert {s for s, r in rows if r["source"] == "notice_seed"} == {"train"}
    assert {r["lang"] for _, r in rows if r["source"] == "notice_seed"} == {"ja", "ko", "zh"}
    assert manifest["drops_by_source"]["notice_seed"]["other_language"] > 700
    assert {r["channel"] for _, r in rows if r["source"] == "enron"} == {"email"}
    assert manifest["corpora"]["enron"]["rows_usable"] > 30_000  # everything was read, then capped
    assert manifest["duplicates"]["exact"] > 1000
    card = (tmp_path / "mix.md").read_text(encoding="utf-8")
    assert "Japanese and Korean rows by source: cjk_seed" in card and "No Japanese (ja) or Korean" not in card
    assert {"ja", "ko"} <= {r["lang"] for _, r in rows if r["source"] == "cjk_seed"}
