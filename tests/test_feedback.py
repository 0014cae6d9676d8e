"""The feedback loop's server half: serving/feedback.py's store on a real SQLite file, and POST /v1/feedback
through a real server process on 127.0.0.1 (duplicates, keys, stats, the model's probability at report
time, durability across SIGKILL). A PostgreSQL run when SPAMLINGO_TEST_POSTGRES_URL names a server.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect

from serving.bundle import load_bundle
from serving.feedback import COLUMNS, TABLE, FeedbackError, FeedbackStore, text_hash
from serving.inference import Classifier
from serving.text import language_tag, normalize
from test_server import KEY, start_server

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
FEEDBACK_KEY = "reporter-key"
ADMIN_KEY = "admin-key"


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _variant(bundle: Path) -> str:
    b = load_bundle(bundle)
    return "int8" if b.has("int8") and b.int8.get("status", "passed") == "passed" else "fp32"


# ------------------------------------------------------------------------------------------ the store


def test_store_duplicates_are_decided_by_normalised_text_label_and_reporter(tmp_path):
    store = FeedbackStore(_url(tmp_path / "f.db"))
    first = store.add("Your code is 123456, claim your prize", "spam", "alice", None, 0.2, "a" * 64, None, 0.5)
    assert first == (first[0], False)
    # other digits, full-width letters and a zero-width space: the same normalised text, the same report
    again = store.add("Your code is 987654, ｃｌａｉｍ your\u200b prize", "spam", "alice", "resent", 0.9, "b" * 64)
    assert again == (first[0], True)
    assert store.add("Your code is 123456, claim your prize", "spam", "bob")[1] is False  # another reporter
    assert store.add("Your code is 123456, claim your prize", "ham", "alice")[1] is False  # another label
    assert store.add("Your code is 123456, claim your prize", "spam")[1] is False  # no reporter: ''
    assert store.add("Your code is 123456, claim your prize", "spam", None)[1] is True  # None is '' too
    rows = store.rows()
    assert len(rows) == 4 and [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    r = rows[0]
    assert tuple(r) == COLUMNS
    assert r["text"] == "Your code is 123456, claim your prize"  # as received, not normalised
    assert r["text_hash"] == text_hash(r["text"]) == __import__("hashlib").sha256(
        normalize(r["text"], mask_digits=True).encode()).hexdigest()
    assert (r["label"], r["reporter"], r["note"], r["model_probability"], r["model_threshold"],
            r["bundle_sha256"], r["lang"]) == ("spam", "alice", "", 0.2, 0.5, "a" * 64, "en")
    assert r["created_at"].endswith("+00:00") and len(r["created_at"]) == 32  # UTC, microseconds
    assert rows[-1]["reporter"] == "" and rows[-1]["model_probability"] is None
    # since: an id cursor, or a UTC date / timestamp
    assert [x["id"] for x in store.rows(since=rows[1]["id"])] == [x["id"] for x in rows[2:]]
    assert store.rows(since=r["created_at"][:10]) == rows and store.rows(since="2999-01-01") == []
    with pytest.raises(ValueError, match="label"):
        store.add("x", "SPAM")
    store.close()


def test_store_schema_is_the_documented_contract(tmp_path):
    """One table with these columns and a UNIQUE (text_hash, label, reporter); WAL and synchronous=FULL."""
    path = tmp_path / "f.db"
    store = FeedbackStore(_url(path))
    store.add("会議は3時からです", "ham", "", "", 0.1, "c" * 64, None, 0.5)
    insp = inspect(store.engine)
    assert insp.get_table_names() == [TABLE]
    cols = {c["name"]: c for c in insp.get_columns(TABLE)}
    assert tuple(cols) == COLUMNS
    assert cols["id"]["primary_key"]
    uniques = [tuple(u["column_names"]) for u in insp.get_unique_constraints(TABLE)]
    assert ("text_hash", "label", "reporter") in uniques
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()
    # any reader sees the rows, with no spamlingo code: plain sqlite3
    with sqlite3.connect(path) as c:
        assert c.execute(f"SELECT label, lang FROM {TABLE}").fetchall() == [("ham", "ja")]
        with pytest.raises(sqlite3.IntegrityError):  # the database itself refuses a second copy
            c.execute(f"INSERT INTO {TABLE} (created_at, text, text_hash, label, reporter, note, bundle_sha256, lang) "
                      "SELECT created_at, text, text_hash, label, reporter, note, bundle_sha256, lang FROM "
                      f"{TABLE}")
        with pytest.raises(sqlite3.IntegrityError):  # and a label that is neither spam nor ham
            c.execute(f"INSERT INTO {TABLE} (created_at, text, text_hash, label, reporter, note, bundle_sha256, lang) "
                      "VALUES ('t', 'x', 'h', 'junk', '', '', '', 'en')")


def test_concurrent_writers_store_one_row_per_report(tmp_path):
    """16 threads, each with its own store (its own engine and connections, as separate processes or
    replicas would have), send the same 20 reports at once: one row each, and every writer got its id."""
    url = _url(tmp_path / "f.db")
    FeedbackStore(url).close()
    texts = [f"winner number {i}: claim now at http://x.example/{chr(97 + i)}" for i in range(20)]
    got: dict[int, list] = {}
    barrier = threading.Barrier(16)

    def writer(k: int):
        store = FeedbackStore(url)
        barrier.wait()
        got[k] = [store.add(t, "spam", "same-reporter") for t in (texts if k % 2 else texts[::-1])]
        store.close()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    store = FeedbackStore(url)
    rows = store.rows()
    assert len(rows) == 20
    ids = {r["text"]: r["id"] for r in rows}
    # every writer got each report's stored id; exactly one writer stored each (duplicate=False)
    for k, results in got.items():
        assert [rid for rid, _ in results] == [ids[t] for t in (texts if k % 2 else texts[::-1])]
    firsts = sum(1 for results in got.values() for _, dup in results if not dup)
    assert len(got) == 16 and firsts == 20
    store.close()


def test_stats_count_by_label_language_day_and_disagreement(tmp_path):
    store = FeedbackStore(_url(tmp_path / "f.db"))
    sha = "d" * 64
    store.add("恭喜您中奖了", "spam", "a", None, 0.9, sha, None, 0.5)  # agrees
    store.add("恭喜您中奖了!!", "spam", "b", None, 0.2, sha, None, 0.5)  # spam below threshold: disagrees
    store.add("see you at lunch", "ham", "a", None, 0.7, sha, None, 0.5)  # ham above: disagrees
    store.add("see you at dinner", "ham", "a", None, 0.5, sha, None, 0.5)  # ham at the threshold: disagrees
    store.add("무료 쿠폰", "spam", "a", None, 0.49, "e" * 64, None, 0.3)  # its own threshold: agrees
    store.add("no score", "ham", "a")  # no probability: not counted either way
    s = store.stats()
    assert s["total"] == 6 and s["reporters"] == 2
    assert s["by_label"] == {"spam": 3, "ham": 3}
    assert s["by_lang"] == {"en": 3, "ko": 1, "zh": 2}
    assert list(s["by_day"].values()) == [6] and len(next(iter(s["by_day"]))) == 10
    assert s["by_bundle"] == {"": 1, "d" * 16: 4, "e" * 16: 1}
    assert s["disagree"] == {"total": 3, "reported_spam_model_ham": 1, "reported_ham_model_spam": 2}
    assert s["first"] <= s["last"]
    store.close()


def test_stats_command_prints_tables_and_json(tmp_path):
    url = _url(tmp_path / "f.db")
    store = FeedbackStore(url)
    store.add("free money", "spam", "a", None, 0.1, "f" * 64, None, 0.5)
    store.add("今すぐクリック", "spam", "a", None, 0.9, "f" * 64, None, 0.5)
    store.close()
    p = subprocess.run([PY, "-m", "serving.feedback", "stats", "--db", url], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "2 reports from 1 reporter(s)" in p.stdout
    assert "missed spam" in p.stdout and "language" in p.stdout and "ja " in p.stdout
    p = subprocess.run([PY, "-m", "serving.feedback", "stats", "--json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "SPAMLINGO_FEEDBACK_DB": url})
    assert json.loads(p.stdout)["disagree"]["reported_spam_model_ham"] == 1
    p = subprocess.run([PY, "-m", "serving.feedback", "rows", "--db", url, "--since", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert [json.loads(x)["text"] for x in p.stdout.splitlines()] == ["今すぐクリック"]
    # a store that is not there: one line, and nothing created
    missing = tmp_path / "nope" / "f.db"
    p = subprocess.run([PY, "-m", "serving.feedback", "stats", "--db", _url(missing)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: no feedback store at") and "Traceback" not in p.stderr
    assert not missing.parent.exists()
    with pytest.raises(FeedbackError, match="not a database URL"):
        FeedbackStore("not a url at all")


def test_make_feedback_is_documented():
    make = (ROOT / "Makefile").read_text()
    assert "\nfeedback: $(STAMP) ## " in make and "serving.feedback stats" in make


# ------------------------------------------------------------------------------------------ PostgreSQL

PG_URL = os.environ.get("SPAMLINGO_TEST_POSTGRES_URL", "")


def _postgres_store() -> FeedbackStore:
    if not PG_URL:
        pytest.skip("no PostgreSQL server: set SPAMLINGO_TEST_POSTGRES_URL=postgresql+psycopg://user:pw@host/db "
                    "(a throwaway database: the test writes to its feedback_reports table) to run it")
    try:
        return FeedbackStore(PG_URL)
    except FeedbackError as e:
        pytest.skip(f"SPAMLINGO_TEST_POSTGRES_URL is set but unusable: {e}")


def test_postgresql_store_duplicates_concurrency_and_stats():
    store = _postgres_store()
    reporter = f"test-{uuid.uuid4().hex}"  # this run's rows only; deleted at the end
    try:
        a = store.add("Free entry 2 win a prize", "spam", reporter, None, 0.2, "a" * 64, None, 0.5)
        assert store.add("Free entry 9 win a prize", "spam", reporter)[0] == a[0]
        results: list = []

        def writer():
            s = FeedbackStore(PG_URL)
            results.append(s.add("race me", "ham", reporter, None, 0.9, "a" * 64, None, 0.5))
            s.close()

        threads = [threading.Thread(target=writer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len({r[0] for r in results}) == 1 and sum(not dup for _, dup in results) == 1
        mine = [r for r in store.rows() if r["reporter"] == reporter]
        assert len(mine) == 2 and tuple(mine[0]) == COLUMNS
        assert store.stats()["disagree"]["total"] >= 2
    finally:
        from sqlalchemy import delete

        from serving.feedback import reports

        with store.engine.begin() as conn:
            conn.execute(delete(reports).where(reports.c.reporter == reporter))
        store.close()


# ------------------------------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def fb_server(tiny_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("fb")
    s = start_server(tiny_bundle, d, "--api-key", KEY, "--feedback-key", FEEDBACK_KEY, "--admin-key", ADMIN_KEY,
                     "--max-chars", "2000", "--max-body-bytes", "65536")
    s.db = d / "feedback.db"
    yield s
    s.stop()


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _post(server, body, key=FEEDBACK_KEY, **kw):
    kw.setdefault("timeout", 30)
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + "/v1/feedback", content=body, headers=_auth(key), **kw)
    return httpx.post(server.url + "/v1/feedback", json=body, headers=_auth(key), **kw)


def test_report_is_201_then_200_duplicate_and_reporters_are_distinct(fb_server):
    body = {"text": "WINNER!! You have won a 1000 prize, call 0900 now", "label": "spam", "reporter": "alice"}
    r = _post(fb_server, body)
    assert r.status_code == 201, r.text
    first = r.json()
    assert set(first) == {"id", "duplicate"} and first["duplicate"] is False and isinstance(first["id"], int)
    # the same report again (other digits: the same normalised text) is answered 200 with the first id
    r = _post(fb_server, {**body, "text": "WINNER!! You have won a 5000 prize, call 0911 now", "note": "again"})
    assert r.status_code == 200 and r.json() == {"id": first["id"], "duplicate": True}
    r = _post(fb_server, {**body, "reporter": "bob"})
    assert r.status_code == 201 and r.json()["id"] != first["id"]
    r = _post(fb_server, {"text": body["text"], "label": "spam"})  # no reporter: another report
    assert r.status_code == 201
    r = _post(fb_server, {"text": body["text"], "label": "spam", "reporter": None})  # null is no reporter
    assert r.status_code == 200
    store = FeedbackStore(_url(fb_server.db), create=False)
    mine = [x for x in store.rows() if x["text"] == body["text"]]
    store.close()
    assert sorted(x["reporter"] for x in mine) == ["", "alice", "bob"]
    assert all(x["note"] == "" for x in mine)  # the duplicate's note did not overwrite anything


def test_concurrent_identical_reports_are_one_row(fb_server):
    body = {"text": f"race {uuid.uuid4().hex[:8]} free gift card", "label": "spam", "reporter": "racer"}

    async def go():
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*[c.post(fb_server.url + "/v1/feedback", json=body,
                                                 headers=_auth(FEEDBACK_KEY)) for _ in range(24)])

    responses = asyncio.run(go())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 23 + [201], codes
    assert len({r.json()["id"] for r in responses}) == 1
    store = FeedbackStore(_url(fb_server.db), create=False)
    assert sum(1 for x in store.rows() if x["text"] == body["text"]) == 1
    store.close()


def test_feedback_key_opens_only_the_feedback_endpoint(fb_server):
    url = fb_server.url
    body = {"text": "key check: cheap pills", "label": "spam"}
    assert _post(fb_server, body).status_code == 201  # the feedback key
    assert _post(fb_server, {**body, "reporter": "api"}, key=KEY).status_code == 201  # the API key opens it too
    r = httpx.post(url + "/v1/feedback", json=body)
    assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
    assert _post(fb_server, body, key="wrong").status_code == 401
    assert _post(fb_server, body, key=ADMIN_KEY).status_code == 401
    with_fb = _auth(FEEDBACK_KEY)
    r = httpx.post(url + "/v1/classify", json={"texts": ["hi"]}, headers=with_fb)
    assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
    assert httpx.get(url + "/v1/feedback/stats", headers=with_fb).status_code == 401
    assert httpx.get(url + "/metrics", headers=with_fb).status_code == 401
    assert httpx.post(url + "/admin/reload", headers=with_fb).status_code == 401
    assert httpx.post(url + "/v1/classify", json={"texts": ["hi"]}, headers=_auth(KEY)).status_code == 200
    assert httpx.get(url + "/v1/feedback/stats", headers=_auth(KEY)).status_code == 200


BAD_FEEDBACK = [
    # (name, body, status, kind)
    ("not_json", b"{nope", 400, "invalid_json"),
    ("huge_integer", b'{"text": "a", "label": "spam", "x": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("invalid_utf8", b'{"text": "caf\xe9", "label": "spam"}', 400, "invalid_utf8"),
    ("lone_surrogate", b'{"text": "\\udc00 free", "label": "spam"}', 400, "invalid_unicode"),
    ("surrogate_in_note", b'{"text": "ok", "label": "spam", "note": "\\ud800"}', 400, "invalid_unicode"),
    ("array", b'[{"text": "a", "label": "spam"}]', 422, "invalid_request"),
    ("no_text", b'{"label": "spam"}', 422, "invalid_request"),
    ("no_label", b'{"text": "free money"}', 422, "invalid_request"),
    ("wrong_label", b'{"text": "free money", "label": "junk"}', 422, "invalid_request"),
    ("label_case", b'{"text": "free money", "label": "SPAM"}', 422, "invalid_request"),
    ("label_not_string", b'{"text": "free money", "label": 1}', 422, "invalid_request"),
    ("text_not_string", b'{"text": ["free"], "label": "spam"}', 422, "invalid_request"),
    ("null_text", b'{"text": null, "label": "spam"}', 422, "invalid_request"),
    ("reporter_not_string", b'{"text": "a", "label": "spam", "reporter": 7}', 422, "invalid_request"),
    ("note_not_string", b'{"text": "a", "label": "spam", "note": {}}', 422, "invalid_request"),
    ("empty_text", b'{"text": "", "label": "spam"}', 422, "empty_text"),
    ("blank_text", b'{"text": " \\t\\n ", "label": "ham"}', 422, "empty_text"),
    ("text_too_long", json.dumps({"text": "y" * 2001, "label": "spam"}).encode(), 413, "text_too_long"),
    ("reporter_too_long", json.dumps({"text": "a", "label": "spam", "reporter": "r" * 257}).encode(), 413,
     "text_too_long"),
    ("note_too_long", json.dumps({"text": "a", "label": "spam", "note": "n" * 2001}).encode(), 413, "text_too_long"),
    ("body_too_large", json.dumps({"text": "z" * 70_000, "label": "spam"}).encode(), 413, "body_too_large"),
]


@pytest.mark.parametrize("name,body,status,kind", BAD_FEEDBACK, ids=[b[0] for b in BAD_FEEDBACK])
def test_bad_reports_are_a_clear_4xx_and_store_nothing(fb_server, name, body, status, kind):
    before = httpx.get(fb_server.url + "/v1/feedback/stats", headers=_auth(KEY)).json()["total"]
    r = httpx.post(fb_server.url + "/v1/feedback", content=body,
                   headers={**_auth(FEEDBACK_KEY), "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["kind"] == kind and err["message"]
    assert httpx.get(fb_server.url + "/v1/feedback/stats", headers=_auth(KEY)).json()["total"] == before


def test_stored_probability_is_the_served_models_at_report_time(fb_server, tiny_bundle):
    """Each row carries the probability and threshold the served model gives the text, the graph's full
    sha256 and the language tag: for a text classified just before (its score reused) and for one never
    seen (scored for the report)."""
    bundle = load_bundle(tiny_bundle)
    variant = _variant(tiny_bundle)
    clf = Classifier(bundle, variant=variant, threads=1)
    texts = ["恭喜您中奖了！请点击链接领取大奖 iPhone fresh", "Are we still meeting for lunch tomorrow at noon? ok"]
    classified = httpx.post(fb_server.url + "/v1/classify", json={"texts": [texts[0]]}, headers=_auth(KEY),
                            timeout=30).json()["results"][0]
    ids = [_post(fb_server, {"text": t, "label": "ham", "reporter": "prob"}).json()["id"] for t in texts]
    store = FeedbackStore(_url(fb_server.db), create=False)
    rows = {r["id"]: r for r in store.rows()}
    store.close()
    want = clf.classify(texts)
    sha = bundle.manifest["files"][bundle.models[variant]]["sha256"]
    tol = 2e-3 if variant == "int8" else 1e-6
    assert rows[ids[0]]["model_probability"] == classified["spam_probability"]  # the score it was answered
    for rid, w, t in zip(ids, want, texts):
        row = rows[rid]
        assert row["model_probability"] == pytest.approx(w["spam_probability"], abs=tol)
        assert row["model_threshold"] == w["threshold"]
        assert row["bundle_sha256"] == sha and len(sha) == 64
        assert row["lang"] == w["lang"] == language_tag(normalize(t, mask_digits=True))


def test_stats_endpoint_counts_and_disagreement(tiny_bundle, tmp_path):
    """A server of its own (a fresh store): the stats endpoint and `python -m serving.feedback stats` count
    the reports by label, language and day and say which disagree with the model's verdict."""
    s = start_server(tiny_bundle, tmp_path)
    try:
        clf = Classifier(load_bundle(tiny_bundle), variant=_variant(tiny_bundle), threads=1)
        texts = ["WIN a FREE iphone now! Click http://win.example.com to claim your prize",
                 "恭喜您中奖了!点击链接领取手机大奖,限时优惠", "明天公司的会议改到下午三点,请准时参加",
                 "Can you pick up some bread on your way home?"]
        verdicts = [r["label"] for r in clf.classify(texts)]
        labels = ["spam", "ham", "spam", "ham"]  # some agree with the model, some do not
        for t, label in zip(texts, labels):
            assert httpx.post(s.url + "/v1/feedback", json={"text": t, "label": label}).status_code == 201
        stats = httpx.get(s.url + "/v1/feedback/stats").json()
        assert stats["total"] == 4 and stats["by_label"] == {"spam": 2, "ham": 2}
        assert stats["by_lang"] == {"en": 2, "zh": 2} and sum(stats["by_day"].values()) == 4
        disagree = [(label, v) for label, v in zip(labels, verdicts) if label != v]
        assert stats["disagree"]["total"] == len(disagree)
        assert stats["disagree"]["reported_spam_model_ham"] == sum(1 for label, _ in disagree if label == "spam")
        assert stats["disagree"]["reported_ham_model_spam"] == sum(1 for label, _ in disagree if label == "ham")
        m = httpx.get(s.url + "/metrics").text
        assert 'spamlingo_feedback_reports_total{label="spam",result="stored"} 2.0' in m
        p = subprocess.run([PY, "-m", "serving.feedback", "stats", "--db", _url(tmp_path / "feedback.db"), "--json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert json.loads(p.stdout) == stats  # the same numbers, read while the server runs
    finally:
        s.stop()


def test_acknowledged_reports_survive_sigkill(tiny_bundle, tmp_path):
    """Reports at concurrency 16; the server is killed with SIGKILL mid-stream. Restarted on the same
    database, every report that was answered 2xx is there (same id, text and label), and resending one is
    a duplicate with its first id."""
    s = start_server(tiny_bundle, tmp_path)
    bodies = [{"text": f"durable report {chr(97 + i % 26)}{chr(97 + i // 26)} claim prize", "label": "spam",
               "reporter": "kill"} for i in range(400)]
    acked: dict[int, int] = {}

    async def go():
        it = iter(range(len(bodies)))
        async with httpx.AsyncClient(base_url=s.url, timeout=10, limits=httpx.Limits(max_connections=16)) as c:
            async def worker():
                for i in it:
                    try:
                        r = await c.post("/v1/feedback", json=bodies[i])
                    except httpx.TransportError:
                        continue
                    if r.status_code in (200, 201):
                        acked[i] = r.json()["id"]
                        if len(acked) == 100:
                            s.proc.kill()  # SIGKILL: no shutdown, no flushing

            await asyncio.gather(*[worker() for _ in range(16)])

    try:
        asyncio.run(go())
        s.proc.wait(timeout=20)
        assert s.proc.returncode == -9
    finally:
        s.stop()
    assert 100 <= len(acked) < len(bodies)
    again = start_server(tiny_bundle, tmp_path)  # the same log dir: the same feedback.db
    try:
        store = FeedbackStore(_url(tmp_path / "feedback.db"), create=False)
        rows = {r["id"]: r for r in store.rows()}
        store.close()
        for i, rid in acked.items():
            assert rid in rows, f"acknowledged report {rid} lost"
            assert (rows[rid]["text"], rows[rid]["label"]) == (bodies[i]["text"], bodies[i]["label"])
        i = next(iter(acked))
        r = httpx.post(again.url + "/v1/feedback", json=bodies[i], timeout=30)
        assert r.status_code == 200 and r.json() == {"id": acked[i], "duplicate": True}
    finally:
        again.stop()


def test_feedback_db_none_disables_the_endpoints(tiny_bundle, tmp_path):
    s = start_server(tiny_bundle, tmp_path, "--feedback-db", "none")
    try:
        r = httpx.post(s.url + "/v1/feedback", json={"text": "a", "label": "spam"})
        assert r.status_code == 503 and r.json()["error"]["kind"] == "feedback_disabled"
        assert httpx.get(s.url + "/v1/feedback/stats").status_code == 503
        assert httpx.post(s.url + "/v1/classify", json={"texts": ["a"]}).status_code == 200
    finally:
        s.stop()
    assert not (tmp_path / "feedback.db").exists()


def test_unusable_feedback_db_stops_startup_with_one_line(tiny_bundle, tmp_path):
    from test_server import _start_fails

    (tmp_path / "file").write_text("x")
    line = _start_fails("--bundle", str(tiny_bundle), "--feedback-db", f"sqlite:///{tmp_path / 'file' / 'f.db'}")
    assert line.startswith("error: --feedback-db: cannot create")
    line = _start_fails("--bundle", str(tiny_bundle), "--feedback-db", "nosuchdialect://u:secretpw@h/db")
    assert "--feedback-db" in line and "secretpw" not in line
    assert "must differ" in _start_fails("--bundle", str(tiny_bundle), "--api-key", "k", "--feedback-key", "k")
