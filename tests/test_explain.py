"""Explanations (serving/explain.py): offsets through the normaliser, the row cap, exact effects, the API field
(in process and through a real server), the bench figure with --quick, and make eval's HTML error report."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving import explain as X
from serving.text import normalize, normalize_with_offsets

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------ offsets

# Pieces that each step of the normaliser changes, and plain text around them.
PIECES = ["a", "B", "z", "7", "0", " ", "  ", "\t", "\n", "\r\n", "\u3000", "\xa0", "Ａ", "ｚ", "０", "９", "！",
          "\u200b", "\u200d", "\ufeff", "\u00ad", "\x00", "\x07", "\x85", "\u202e", "\u2066", "\u0301", "\u0308",
          "\u0323", "\u1100", "\u1161", "\u11a8", "é", "ﬁ", "㍿", "①", "½", "а", "е", "о", "ο", "д", "Ж",
          "中", "奖", "恭喜", "あ", "ア", "ｶ", "ﾞ", "ﾟ", "한", "국", "😀", "👍", "🏽", "\u200d", "&", "amp;", "&amp;",
          "&lt;", "&#", "x41;", "&#65", "&#x1F600;", "&nbsp;", "&ampx", "&notit;", ";", "F R E E", "x", "-", ".",
          "http://a.example/?q=1&b=2", "Free", "prize", "会議", "クリック"]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 25))) for _ in range(n)]


def _corpus() -> list[str]:
    from conftest import FILLERS, TEMPLATES
    from test_server import TEXTS

    rows = [t.format(x=x) for lang in TEMPLATES for ts in TEMPLATES[lang].values() for t in ts for x in FILLERS[lang]]
    return rows + TEXTS


@pytest.mark.parametrize("mask_digits", [True, False])
def test_offset_variant_returns_exactly_the_normalisers_text(mask_digits):
    for text in _random_texts(4000) + _corpus():
        norm, spans = normalize_with_offsets(text, mask_digits)
        assert norm == normalize(text, mask_digits), repr(text)
        assert len(spans) == len(norm)
        for (a, b), (c, _d) in zip(spans, spans[1:]):
            assert 0 <= a < b <= len(text) and a <= c  # inside the text, in order
        if spans:
            assert 0 <= spans[-1][0] < spans[-1][1] <= len(text)


def _units(text: str) -> list[str]:
    return [text[a:b] for a, b in X.units(text)]


@pytest.mark.parametrize("text, want", [
    ("ＦＲＥＥ　ｍｏｎｅｙ！", ["ＦＲＥＥ", "ｍｏｎｅｙ！"]),  # NFKC full-width: the units are the full-width text
    ("f\u200bree mo\u200dney", ["f\u200bree", "mo\u200dney"]),  # zero-width inside a word stays inside its span
    ("\u200b  call \t\n\n  now  \u3000", ["call", "now"]),  # whitespace runs, leading and trailing
    ("恭喜您中奖了点击链接领取", ["恭喜", "您中", "奖了", "点击", "链接", "领取"]),  # CJK without spaces
    ("今すぐクリックして当選", ["今", "すぐ", "クリ", "ック", "して", "当選"]),  # script runs, then 2-character chunks
    ("【京东】双十一狂欢，回复TD退订", ["【京东】", "双十", "一狂欢，", "回复", "TD", "退订"]),  # punctuation joins
    ("😀 win 👍🏽 now😀", ["😀", "win", "👍🏽", "now😀"]),  # astral characters are one index each
    ("Tom &amp; Jerry &lt;3 &#x1F600;!", ["Tom", "&amp;", "Jerry", "&lt;3", "&#x1F600;!"]),  # HTML entities
    ("cafe\u0301 ｶﾞｲﾄﾞ 案内", ["cafe\u0301", "ｶﾞｲﾄﾞ", "案内"]),  # composed by NFKC: spans of all their sources
    ("F R E E money", ["F R E E", "money"]),  # spaced letters are one word
    ("Frее prizes", ["Frее", "prizes"]),  # Cyrillic look-alikes folded, offsets untouched
    ("㍿は", ["㍿", "は"]),  # one character NFKC expands into four: one unit
    ("", []), ("\u200b \t", []),
])
def test_units_map_back_to_the_text_as_sent(text, want):
    assert _units(text) == want
    for a, b in X.units(text):  # each unit's text normalises to a piece of the normalised text
        assert normalize(text[a:b], True) in normalize(text, True)


# ------------------------------------------------------------------------------------------ occlusion


class Recorder:
    """A known scorer (not bounded like a probability): 0.1 + 0.3 per "free" + 0.2 per "中奖" - 0.05 per
    "meeting"; it records every call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        p = [0.1 + 0.3 * t.lower().count("free") + 0.2 * t.count("中奖") - 0.05 * t.count("meeting") for t in texts]
        return np.asarray(p)


def test_effects_are_exactly_p_full_minus_p_occluded():
    text = "FREE prize at the meeting 恭喜中奖"
    rec = Recorder()
    att = X.attribute(text, rec)
    assert len(rec.calls) == 1 and rec.calls[0][0] == text  # one call: the full text and each variant
    assert [text[a:b] for a, b in att.spans] == ["FREE", "prize", "at", "the", "meeting", "恭喜", "中奖"]
    full = rec([text])[0]
    for (a, b), effect in zip(att.spans, att.effects):
        assert effect == full - rec([text[:a] + text[b:]])[0]
    assert att.p_spam == full == pytest.approx(0.55)
    out = X.explain(text, Recorder())["spans"]
    assert out == [{"start": 0, "end": 4, "text": "FREE", "effect": pytest.approx(0.3)},
                   {"start": 28, "end": 30, "text": "中奖", "effect": pytest.approx(0.2)},
                   {"start": 18, "end": 25, "text": "meeting", "effect": pytest.approx(-0.05)}]


def test_top_keeps_five_each_way_sorted_by_size():
    text = " ".join(["free" * k for k in range(1, 9)] + ["meeting"] * 7)
    spans = X.explain(text, Recorder(), top=5)["spans"]
    up = [s for s in spans if s["effect"] > 0]
    down = [s for s in spans if s["effect"] < 0]
    assert len(up) == 5 and len(down) == 5
    assert [s["text"] for s in up] == ["free" * k for k in (8, 7, 6, 5, 4)]
    assert [abs(s["effect"]) for s in spans] == sorted((abs(s["effect"]) for s in spans), reverse=True)


@pytest.mark.parametrize("words, max_rows, want_rows", [(100, 32, 33), (5, 32, 6), (40, 1, 2), (33, 32, 33)])
def test_the_row_cap_holds_and_merged_spans_cover_every_unit(words, max_rows, want_rows):
    text = " ".join(f"w{i}" for i in range(words))
    rec = Recorder()
    att = X.attribute(text, rec, max_rows=max_rows)
    assert [len(c) for c in rec.calls] == [want_rows]
    assert len(att.spans) == want_rows - 1
    assert all(a < b <= c for (a, b), (c, _) in zip(att.spans, att.spans[1:]))  # disjoint, in order
    for a, b in X.units(text):  # every unit lies inside one span
        assert any(s <= a and b <= e for s, e in att.spans)
    with pytest.raises(ValueError, match="max_rows"):
        X.attribute(text, rec, max_rows=0)


def test_a_text_without_units_costs_one_row():
    rec = Recorder()
    assert X.explain(" \u200b ", rec) == {"spans": [], "method": "occlusion"} and [len(c) for c in rec.calls] == [1]


# ------------------------------------------------------------------------------------------ the API


@pytest.fixture(scope="module")
def served(tiny_bundle):
    """The server's real start-up path (load_model): what it serves, and that classifier called directly."""
    from serving.server import load_model
    from serving.settings import ServerSettings

    classifier, info = load_model(ServerSettings(bundle=str(tiny_bundle), threads=1))
    return classifier, info


def _app(served, **settings):
    from serving.server import create_app
    from serving.settings import ServerSettings

    classifier, info = served
    return create_app(ServerSettings(**settings), classifier.classify, info)


def _post(app, *requests):
    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return [await c.post("/v1/classify", **kw) for kw in requests]

    return asyncio.run(go())


TEXTS = ["WIN a FREE iphone now! Click http://win.example.com to claim your prize",
         "恭喜您中奖了!点击链接领取手机大奖,限时优惠", "ＦＲＥＥ　ｆ\u200bree　ｍｏｎｅｙ &amp; prizes 😀",
         "明日の会議は何時に集合しますか?", "see you at lunch?"]


def test_explain_true_adds_the_spans_the_explainer_computes(served):
    classifier, _ = served
    plain, explained = _post(_app(served), {"json": {"texts": TEXTS}}, {"json": {"texts": TEXTS, "explain": True}})
    assert plain.status_code == explained.status_code == 200
    assert all("explanation" not in r for r in plain.json()["results"])
    score = X.onnx_scorer(classifier)
    # The tiny int8 model saturates: removing one word of its surest spam may change nothing (no spans).
    assert sum(bool(r["explanation"]["spans"]) for r in explained.json()["results"]) >= 3
    for text, p, r in zip(TEXTS, plain.json()["results"], explained.json()["results"]):
        assert {k: v for k, v in r.items() if k != "explanation"} == p  # the rest of the result is unchanged
        spans = r["explanation"]["spans"]
        for s in spans:
            assert s["text"] == text[s["start"]:s["end"]] and s["start"] < s["end"]
        assert [abs(s["effect"]) for s in spans] == sorted((abs(s["effect"]) for s in spans), reverse=True)
        want = X.explain(text, score)["spans"]  # the same rows in one call: the same numbers
        assert [(s["start"], s["end"]) for s in spans] == [(s["start"], s["end"]) for s in want]
        np.testing.assert_allclose([s["effect"] for s in spans], [s["effect"] for s in want], atol=1e-6)


def test_explained_requests_are_limited_and_validated(served):
    app = _app(served, explain_max_texts=2, explain_max_rows=4, max_texts=8)
    long_text = " ".join(["free prize click now"] * 10)
    over, bad, ok, plain_many = _post(app, {"json": {"texts": ["a", "b", "c"], "explain": True}},
                                      {"json": {"texts": ["a"], "explain": "yes"}},
                                      {"json": {"texts": [long_text, "hi"], "explain": True}},
                                      {"json": {"texts": ["a", "b", "c"], "explain": False}})
    assert over.status_code == 413 and over.json()["error"]["kind"] == "too_many_texts"
    assert '"explain": true is 2 per request' in over.json()["error"]["message"]
    assert bad.status_code == 422 and bad.json()["error"]["kind"] == "invalid_request"
    assert ok.status_code == 200 and plain_many.status_code == 200
    spans = ok.json()["results"][0]["explanation"]["spans"]
    assert 1 <= len(spans) <= 4 and all(len(s["text"]) > len("click") for s in spans)  # 40 words in 4 spans


def test_the_schema_documents_the_field(served):
    app = _app(served)
    schema = app.openapi()["components"]["schemas"]
    assert schema["ClassifyRequest"]["properties"]["explain"]["type"] == "boolean"
    assert "explanation" in schema["Result"]["properties"]
    assert set(schema["Span"]["properties"]) == {"start", "end", "text", "effect"}
    assert schema["Explanation"]["properties"]["spans"]["items"] == {"$ref": "#/components/schemas/Span"}


def test_explain_through_a_real_server_with_its_key_and_limit(tiny_bundle, tmp_path):
    from test_server import KEY, start_server

    from serving.bundle import load_bundle
    from serving.inference import Classifier

    # the tiny model saturates on some texts (no span moves its score): send two that it does explain
    score = X.onnx_scorer(Classifier(load_bundle(tiny_bundle), variant="auto"))
    texts = [t for t in TEXTS if X.explain(t, score)["spans"]][:2]
    assert len(texts) == 2
    server = start_server(tiny_bundle, tmp_path, "--explain-max-texts", "2", env={"SPAMLINGO_API_KEY": KEY})
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"texts": texts, "explain": True}
        r = httpx.post(server.url + "/v1/classify", json=body, headers=auth, timeout=30)
        assert r.status_code == 200
        for text, res in zip(texts, r.json()["results"]):
            spans = res["explanation"]["spans"]
            assert spans and all(s["text"] == text[s["start"]:s["end"]] for s in spans)
            assert [(s["start"], s["end"]) for s in spans] == [(s["start"], s["end"])
                                                              for s in X.explain(text, score)["spans"]]
        no_key = httpx.post(server.url + "/v1/classify", json=body, timeout=30)
        assert no_key.status_code == 401 and no_key.json()["error"]["kind"] == "unauthorized"
        over = httpx.post(server.url + "/v1/classify", json={"texts": TEXTS[:3], "explain": True}, headers=auth,
                          timeout=30)
        assert over.status_code == 413 and over.json()["error"]["kind"] == "too_many_texts"
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ bench figure


def run_explain_bench(tmp_path: Path, model_dir: Path, bundle: Path) -> dict:
    """`python -m bench.run --quick --only explain` on a tiny run and bundle; the figure's JSON record."""
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--run", str(model_dir), "--bundle",
                           str(bundle), "--quick", "--only", "explain", "--threads", "1",
                           "--results", str(tmp_path / "results"), "--markdown", str(tmp_path / "BENCH.md")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((tmp_path / "results" / "explain.json").read_text(encoding="utf-8"))


def test_bench_figure_quick(tmp_path, tiny_model_dir, tiny_bundle):
    from bench import run as bench_run

    rec = run_explain_bench(tmp_path, tiny_model_dir, tiny_bundle)
    assert rec["figure"] == "explain" and rec["command"].startswith("python -m bench.run --only explain ")
    res = rec["result"]
    assert set(res["deletion"]) == {"en", "zh", "ja", "ko"}
    for lang, d in res["deletion"].items():
        assert 1 <= d["texts"] <= res["settings"]["texts_per_lang"], lang
        assert d["mean_spans"] > 3
        if d["ratio"] is not None:
            assert d["ratio"] == pytest.approx(d["drop_top3"] / d["drop_random3"])
    assert res["deletion"]["ja"]["source"] == "data/ood/cjk_scam_eval.jsonl"
    cost = res["cost"]
    assert set(cost["explain"]) == {"32", "8", "4"} and cost["classify"]["p50_ms"] > 0
    for cap, e in cost["explain"].items():
        assert e["ratio_p50"] == pytest.approx(e["p50_ms"] / cost["classify"]["p50_ms"])
        assert 1 < e["mean_rows"] <= int(cap) + 1
    assert cost["ratio_p50"] == cost["explain"][str(X.MAX_ROWS)]["ratio_p50"]
    md = (tmp_path / "BENCH.md").read_text(encoding="utf-8")
    assert f"## {bench_run.module('explain').TITLE}" in md and "| ko | data/ood/cjk_scam_eval.jsonl |" in md


def test_random_spans_have_the_sizes_and_do_not_overlap():
    from bench.explain import random_spans

    rng = random.Random(0)
    for _ in range(200):
        spans = random_spans(30, [5, 3, 7], rng)
        assert [b - a for a, b in spans] == [5, 3, 7] and all(0 <= a and b <= 30 for a, b in spans)
        assert all(b1 <= a2 or b2 <= a1 for i, (a1, b1) in enumerate(spans) for a2, b2 in spans[i + 1:])
    assert random_spans(4, [5], rng) is None


# ------------------------------------------------------------------------------------------ error report


def test_make_eval_writes_an_escaped_error_report_and_logs_it(store, tiny_model_dir, tmp_path, capsys):
    from mlflow import MlflowClient

    from training import evaluate as E
    from training import tracking as T
    from training.config import load_config

    model_dir = tmp_path / "run" / "model"  # a copy: the report goes beside the model directory
    shutil.copytree(tiny_model_dir, model_dir)
    # two false positives carrying markup (no digits: they are masked), a false negative, a true negative
    rows = [("WIN a FREE iphone now! Click http://win.example.com to claim <script>alert('pwned')</script>", "ham"),
            ("恭喜您中奖了!点击链接领取手机大奖,限时优惠 <img src=x onerror=alert('pwned')>", "ham"),
            ("明日の会議は何時に集合しますか?", "spam"), ("see you at lunch?", "ham")]
    data = tmp_path / "mine.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    experiment = "explain-error-report"
    assert E.main(["--config", "configs/smoke.yaml", "--run", str(model_dir), "--data", str(data),
                   f"tracking.experiment={experiment}"]) == 0
    report = E.report_path(model_dir, "data-mine")
    assert report == tmp_path / "run" / "eval" / "data-mine" / "error_report.html" and report.is_file()
    page = report.read_text(encoding="utf-8")
    assert "<script" not in page and "<img" not in page  # the messages are shown as text
    shown = re.sub(r"<mark [^>]*>|</mark>", "", page)  # the message text around the highlights
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in shown
    assert "&lt;img src=x onerror=alert(&#x27;pwned&#x27;)&gt;" in shown
    assert "False positives" in page and "False negatives" in page
    assert '<mark style="background: rgba(220,40,40,' in page  # the false positive's raising spans, in red
    out = capsys.readouterr().out
    assert f"wrote {report} (" in out
    cfg = load_config("configs/smoke.yaml", [f"tracking.experiment={experiment}"])
    run = T.newest_run(cfg, "eval")
    assert "error_report.html" in [a.path for a in MlflowClient().list_artifacts(run.info.run_id)]


def test_highlight_escapes_and_marks_each_span():
    from training.error_report import highlight

    text = "a <b>free</b> & win"
    spans = [{"start": 2, "end": 13, "effect": 0.5}, {"start": 16, "end": 19, "effect": -0.1}]
    out = highlight(text, spans)
    assert out.startswith("a <mark style=\"background: rgba(220,40,40,0.85)\" title=\"effect +0.5\">"
                          "&lt;b&gt;free&lt;/b&gt;</mark> &amp; <mark style=\"background: rgba(40,170,70,0.29)\"")
    assert out.endswith(">win</mark>")
    assert highlight("x" * 10, [], limit=4) == "xxxx<span class=\"meta\"> … (6 more characters)</span>"
