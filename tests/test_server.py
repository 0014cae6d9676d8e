"""The inference server as a real process on 127.0.0.1 serving the tiny bundle, spoken to over real HTTP.

Results are checked against a direct Classifier call on the same texts; every kind of bad input, auth,
overload (503 + Retry-After), metrics, readiness, a bounded load test and schemathesis against the
server's own /openapi.json; start-up failures exit non-zero with one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.bundle import load_bundle
from serving.client import ClientError, wait_ready
from serving.inference import Classifier
from serving.server import create_app
from serving.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KEY = "s3cret-key"

TEXTS = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121",
    "恭喜您中奖了！请点击链接领取大奖 iPhone",
    "今すぐクリックして無料ポイントをゲット",
    "무료 쿠폰을 받으세요 지금 바로",
    "see you at lunch?",
    "ＦＲＥＥ　ｆ\u200bree　ｍｏｎｅｙ &amp; prizes",  # full-width, zero-width, HTML entity: normalised first
    "Meeting moved to 3pm 会議室B",
    "",
    "   \t  ",
    "long " * 400,  # longer than the model reads: truncated
]


# ------------------------------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(bundle: Path, log_dir: Path, *flags: str, env: dict | None = None, timeout: float = 90) -> Server:
    """`python -m serving.server` on a free port; returns once /readyz says 200. Its feedback store is a
    SQLite file in `log_dir` unless the flags name one."""
    port = _free_port()
    log = log_dir / f"server-{port}.log"
    if "--feedback-db" not in flags:
        flags = (*flags, "--feedback-db", f"sqlite:///{log_dir / 'feedback.db'}")
    cmd = [PY, "-m", "serving.server", "--bundle", str(bundle), "--port", str(port), "--threads", "1",
           "--log-level", "warning", *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(server.url, timeout, alive=lambda: proc.poll() is None)
    except ClientError as e:
        server.stop()
        raise AssertionError(f"{e} (exit code {proc.returncode}):\n{log.read_text()}") from None
    return server


# How far a served probability may be from a direct call on the same text in a different batch. fp32 does
# not depend on batch-mates or padding. int8 (ONNX Runtime dynamic quantisation) scales activations per
# batch tensor, so a text's probability moves slightly with what it is batched with (measured: < 4e-4).
TOL = {"fp32": 1e-6, "int8": 2e-3}


def _same(got: dict, want: dict, tol: float = 1e-6) -> None:
    """A served result equals the direct one (the probability to `tol`; the label unless that close to the
    threshold)."""
    assert got["spam_probability"] == pytest.approx(want["spam_probability"], abs=tol)
    if abs(want["spam_probability"] - want["threshold"]) > tol:
        assert got["label"] == want["label"]
    assert (got["threshold"], got["threshold_scope"], got["lang"], got["truncated"]) == (
        want["threshold"], want["threshold_scope"], want["lang"], want["truncated"])


def _scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _variant(bundle: Path) -> str:
    b = load_bundle(bundle)
    return "int8" if b.has("int8") and b.int8.get("status", "passed") == "passed" else "fp32"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def classifier(tiny_bundle):
    """What the default server serves (int8 when the bundle has it), called directly."""
    return Classifier(load_bundle(tiny_bundle), variant=_variant(tiny_bundle), threads=1)


@pytest.fixture(scope="module")
def tol(tiny_bundle):
    return TOL[_variant(tiny_bundle)]


@pytest.fixture(scope="module")
def fp32_classifier(tiny_bundle):
    return Classifier(load_bundle(tiny_bundle), variant="fp32", threads=1)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    s = start_server(tiny_bundle, tmp_path_factory.mktemp("srv"), "--max-body-bytes", "65536", "--max-chars", "5000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def auth_server(tiny_bundle, tmp_path_factory):
    # The key comes from the environment (SPAMLINGO_API_KEY), the other limits from flags.
    s = start_server(tiny_bundle, tmp_path_factory.mktemp("auth"), "--too-long", "truncate", "--max-chars", "40",
                     "--max-texts", "4", env={"SPAMLINGO_API_KEY": KEY})
    yield s
    s.stop()


# ------------------------------------------------------------------------------------------ results


def test_results_equal_direct_classifier(server, classifier, tiny_bundle):
    """One request of fewer than --max-batch texts is one model call on exactly these texts: the same
    numbers as the direct call, int8 included."""
    r = httpx.post(server.url + "/v1/classify", json={"texts": TEXTS}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    want = classifier.classify(TEXTS)
    assert len(body["results"]) == len(TEXTS)
    for got, w in zip(body["results"], want):
        _same(got, w)
    assert body["results"][-1]["truncated"] is True
    assert [x["lang"] for x in body["results"][:5]] == ["en", "zh", "ja", "ko", "en"]
    m = body["model"]
    manifest = json.loads((tiny_bundle / "bundle.json").read_text())
    assert m["bundle"] == tiny_bundle.name and m["variant"] == _variant(tiny_bundle)
    assert m["threshold"] == manifest["threshold"]
    assert m["threshold_by_lang"] == manifest["thresholds"]["by_lang"] == {}  # the fixture has one threshold
    assert {x["threshold_scope"] for x in body["results"]} == {"global"}
    assert manifest["files"][manifest["models"][m["variant"]]]["sha256"].startswith(m["sha256"])


def test_concurrent_requests_get_their_own_results_in_order(server, classifier, tol):
    """Requests of different sizes arrive together, are batched together (and split: 40 texts > max-batch
    32), and each gets exactly its own results back in its own order."""
    rng = random.Random(0)
    pool = [f"{rng.choice(TEXTS[:7])} #{i}" for i in range(60)]
    want = dict(zip(pool, classifier.classify(pool)))
    requests = [rng.sample(pool, rng.choice([1, 2, 5, 40])) for _ in range(24)]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/classify", json={"texts": t}) for t in requests])

    for texts, r in zip(requests, asyncio.run(go())):
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == len(texts)
        for t, got in zip(texts, results):
            _same(got, want[t], tol)


# ------------------------------------------------------------------------------------------ bad input

BAD = [
    # (name, body bytes, status, error kind)
    ("not_json", b"this is not json", 400, "invalid_json"),
    ("empty_body", b"", 400, "invalid_json"),
    ("invalid_utf8", b'{"texts": ["caf\xe9 \xff"]}', 400, "invalid_utf8"),
    ("lone_surrogate", b'{"texts": ["\\ud800 free"]}', 400, "invalid_unicode"),
    ("array_body", b'["free money"]', 422, "invalid_request"),
    ("no_texts_field", b'{"text": "free money"}', 422, "invalid_request"),
    ("texts_not_list", b'{"texts": "free money"}', 422, "invalid_request"),
    ("text_not_string", b'{"texts": ["ok", 42]}', 422, "invalid_request"),
    ("null_text", b'{"texts": [null]}', 422, "invalid_request"),
    ("empty_list", b'{"texts": []}', 422, "empty_texts"),
    ("too_many_texts", json.dumps({"texts": ["x"] * 65}).encode(), 413, "too_many_texts"),
    ("text_too_long", json.dumps({"texts": ["ok", "y" * 5001]}).encode(), 413, "text_too_long"),
    ("body_too_large", json.dumps({"texts": ["z" * 70_000]}).encode(), 413, "body_too_large"),
    # Python's int-string limit raises ValueError inside the JSON parser (it was a 500)
    ("huge_integer", b'{"texts": ["a"], "x": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("huge_integer_in_texts", b'{"texts": [' + b"1" * 4301 + b"]}", 400, "invalid_json"),
    ("deep_nesting", b'{"texts": ["a"], "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400, "invalid_json"),
    ("utf8_bom", b'\xef\xbb\xbf{"texts": ["a"]}', 400, "invalid_json"),
    ("utf16", '{"texts": ["a"]}'.encode("utf-16"), 400, "invalid_utf8"),
]


@pytest.mark.parametrize("name,body,status,kind", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(server, name, body, status, kind):
    r = httpx.post(server.url + "/v1/classify", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["kind"] == kind and err["message"]
    if name in ("text_not_string", "null_text"):
        assert "texts[" in err["message"]  # names the offending item
    ok = httpx.post(server.url + "/v1/classify", json={"texts": ["still there?"]}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1


def test_oversized_chunked_body_is_refused_without_reading_it_all(server):
    """No Content-Length (chunked upload): the limit is enforced while streaming; the client is told 413
    long before it would have sent its 10 MB."""
    sent = []

    def chunks():
        for _ in range(160):
            sent.append(1)
            yield b"a" * 65536

    try:
        r = httpx.post(server.url + "/v1/classify", content=chunks(), timeout=30)
        assert r.status_code == 413 and r.json()["error"]["kind"] == "body_too_large"
    except httpx.TransportError:
        pass  # the server may close the connection after answering; either way it did not read it all
    assert len(sent) < 160
    assert httpx.post(server.url + "/v1/classify", json={"texts": ["hi"]}, timeout=30).status_code == 200


def test_unknown_path_and_method_use_the_error_shape(server):
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"
    r = httpx.get(server.url + "/v1/classify")
    assert r.status_code == 405 and r.json()["error"]["kind"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


# ------------------------------------------------------------------------------------------ auth, truncation


def test_api_key_required_except_on_health(auth_server):
    url = auth_server.url
    body = {"texts": ["free money"]}
    r = httpx.post(url + "/v1/classify", json=body)
    assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url + "/v1/classify", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url + "/v1/classify", json=body, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    r = httpx.post(url + "/v1/classify", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and len(r.json()["results"]) == 1
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/readyz").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(url + "/openapi.json").json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_truncate_mode_cuts_long_texts_and_says_so(auth_server, classifier, tol):
    texts = ["short one", "a spam message that goes on and on well beyond forty characters"]
    r = httpx.post(auth_server.url + "/v1/classify", json={"texts": texts}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    want = classifier.classify([texts[0], texts[1][:40]])
    _same(got[0], want[0], tol)
    assert got[1]["truncated"] is True
    assert got[1]["spam_probability"] == pytest.approx(want[1]["spam_probability"], abs=tol)
    # --max-texts 4 applies here
    r = httpx.post(auth_server.url + "/v1/classify", json={"texts": ["x"] * 5},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["kind"] == "too_many_texts"


# ------------------------------------------------------------------------------------------ health, metrics


def test_healthz_and_readyz(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["model"]["variant"] in ("fp32", "int8")


def test_readyz_is_503_until_the_warm_up_inference_is_done(tiny_bundle):
    """In process (the warm-up of a real server is too quick to catch): the model call is held back by an
    event, so the app is up but not ready; a request sent meanwhile waits and is answered afterwards."""
    clf = Classifier(load_bundle(tiny_bundle), variant="fp32", threads=1)
    gate = threading.Event()

    def predict(texts):
        gate.wait(30)
        return clf.classify(texts)

    app = create_app(ServerSettings(), predict, {"bundle": tiny_bundle.name, "variant": "fp32", "sha256": "0" * 16,
                                                 "threshold": clf.threshold})

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                assert (await c.get("/healthz")).status_code == 200
                r = await c.get("/readyz")
                assert r.status_code == 503 and r.json()["status"] == "starting"
                pending = asyncio.create_task(c.post("/v1/classify", json={"texts": ["free money"]}))
                await asyncio.sleep(0.2)
                assert not pending.done()
                gate.set()
                r = await pending
                assert r.status_code == 200 and len(r.json()["results"]) == 1
                for _ in range(100):
                    if (await c.get("/readyz")).status_code == 200:
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError("never became ready")

    asyncio.run(go())


def test_a_bundle_from_another_normaliser_version_is_served_with_a_warning(tiny_bundle, tmp_path, caplog):
    from serving.server import load_model
    from serving.text import NORMALIZER_VERSION

    with caplog.at_level(logging.WARNING, logger="spamlingo.server"):
        load_model(ServerSettings(bundle=str(tiny_bundle), model="fp32", threads=1))
    assert not caplog.records  # the fixture records this code's version
    d = Path(shutil.copytree(tiny_bundle, tmp_path / "older"))
    manifest = json.loads((d / "bundle.json").read_text(encoding="utf-8"))
    manifest["text"]["normalizer_version"] = NORMALIZER_VERSION - 1
    (d / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="spamlingo.server"):
        _clf, info = load_model(ServerSettings(bundle=str(d), model="fp32", threads=1))
    assert info["bundle"] == "older"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert f"version {NORMALIZER_VERSION - 1}" in caplog.text and "retrain" in caplog.text


def test_per_language_thresholds_label_the_same_probability_differently(tiny_bundle, tmp_path):
    """A bundle whose policy has ko and zh thresholds of their own: in process, with the real start-up path
    (serving.server.load_model) and the classifier's probabilities pinned to 0.5 for every text, ko text is
    spam (its threshold 0.3), zh text ham (0.8) and en/ja text follows the global threshold; each result
    says which threshold applied, and the response's model object lists the per-language ones."""
    import numpy as np

    from serving.server import load_model

    d = Path(shutil.copytree(tiny_bundle, tmp_path / "by_lang"))
    manifest = json.loads((d / "bundle.json").read_text(encoding="utf-8"))
    manifest["threshold"] = 0.45
    manifest["thresholds"] = {**manifest["thresholds"], "default": 0.45, "by_lang": {"ko": 0.3, "zh": 0.8}}
    (d / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")  # not among its own checksums
    settings = ServerSettings(bundle=str(d), model="fp32", threads=1)
    clf, info = load_model(settings)
    assert info["threshold"] == 0.45 and info["threshold_by_lang"] == {"ko": 0.3, "zh": 0.8}
    clf.probabilities = lambda items: np.full(len(items), 0.5)
    app = create_app(settings, clf.classify, info)
    texts = ["무료 쿠폰을 받으세요 지금 바로", "恭喜您中奖了！请点击链接领取大奖", "see you at lunch?", "今すぐクリック"]

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.post("/v1/classify", json={"texts": texts})

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    body = r.json()
    got = [(x["lang"], x["spam_probability"], x["label"], x["threshold"], x["threshold_scope"]) for x in body["results"]]
    assert got == [("ko", 0.5, "spam", 0.3, "lang:ko"), ("zh", 0.5, "ham", 0.8, "lang:zh"),
                   ("en", 0.5, "spam", 0.45, "global"), ("ja", 0.5, "spam", 0.45, "global")]
    assert body["model"]["threshold"] == 0.45 and body["model"]["threshold_by_lang"] == {"ko": 0.3, "zh": 0.8}
    schema = app.openapi()["components"]["schemas"]
    assert "threshold_scope" in schema["Result"]["required"] and "threshold_by_lang" in schema["ModelInfo"]["properties"]


def test_each_graph_is_served_at_its_own_thresholds(tiny_bundle, tmp_path):
    """bundle.json's thresholds_by_model (the export's choice on the int8 graph's validation scores) applies
    when the int8 graph is served, the bundle's own policy when fp32 is; a malformed entry stops start-up."""
    import numpy as np

    from serving.server import load_model
    from serving.settings import StartupError

    d = Path(shutil.copytree(tiny_bundle, tmp_path / "own"))
    manifest = json.loads((d / "bundle.json").read_text(encoding="utf-8"))
    manifest["thresholds_by_model"] = {"int8": {**manifest["thresholds"], "default": 0.6}}
    (d / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    texts = ["see you at lunch?", "周末一起去北京吃饭吧"]
    for variant, want in (("int8", 0.6), ("fp32", manifest["threshold"])):
        settings = ServerSettings(bundle=str(d), model=variant, threads=1)
        clf, info = load_model(settings)
        assert info["threshold"] == want and clf.threshold == want
        clf.probabilities = lambda items: np.full(len(items), 0.55)
        app = create_app(settings, clf.classify, info)

        async def go():
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                    return await c.post("/v1/classify", json={"texts": texts})

        body = asyncio.run(go()).json()
        assert body["model"]["threshold"] == want
        assert [(r["threshold"], r["label"]) for r in body["results"]] == [(want, "spam" if 0.55 >= want else "ham")] * 2
    manifest["thresholds_by_model"] = {"int4": {"default": 0.5}}
    (d / "bundle.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(StartupError, match="thresholds_by_model"):
        load_model(ServerSettings(bundle=str(d), model="int8", threads=1))


def test_a_failing_text_fails_only_its_own_request(tiny_bundle):
    """In process, with the real classifier behind a predict that fails on one marked text: the batch it
    shares with other requests is retried request by request, so only its own request gets the 500."""
    clf = Classifier(load_bundle(tiny_bundle), variant="fp32", threads=1)

    def predict(texts):
        if "POISON" in texts:
            raise ValueError("cannot encode this text")
        return clf.classify(texts)

    app = create_app(ServerSettings(max_wait_ms=100), predict,
                     {"bundle": tiny_bundle.name, "variant": "fp32", "sha256": "0" * 16, "threshold": clf.threshold})
    bodies = [["hello", "free money"], ["POISON"], ["see you soon"], ["a", "b", "c"]]

    async def go():
        async with app.router.lifespan_context(app):
            while not app.state.batcher.ready:
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await asyncio.gather(*[c.post("/v1/classify", json={"texts": b}) for b in bodies])

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200, 500, 200, 200]
    assert responses[1].json()["error"]["kind"] == "inference_error"
    for body, r in zip(bodies, responses):
        if r.status_code == 200:
            for got, want in zip(r.json()["results"], clf.classify(body)):
                _same(got, want)


def test_graceful_shutdown_answers_every_accepted_request(tiny_bundle, tmp_path):
    """SIGTERM while accepted requests wait for their batch: all are answered before the process ends."""
    s = start_server(tiny_bundle, tmp_path, "--max-wait-ms", "3000")

    async def go():
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            tasks = [asyncio.create_task(c.post("/v1/classify", json={"texts": [f"text {i}"]})) for i in range(10)]
            for _ in range(100):  # until all ten are in the queue
                await asyncio.sleep(0.02)
                if _scrape(s.url).get(("spamlingo_queue_depth", ())) == 10:
                    break
            else:
                raise AssertionError("the requests never queued up")
            s.proc.terminate()
            return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        responses = asyncio.run(go())
        assert [getattr(r, "status_code", repr(r)) for r in responses] == [200] * 10
        assert all(len(r.json()["results"]) == 1 for r in responses)
        s.proc.wait(timeout=20)
    finally:
        s.stop()


def test_metrics_counters_move(server):
    before = _scrape(server.url)
    assert httpx.post(server.url + "/v1/classify", json={"texts": ["a", "b", "c"]}).status_code == 200
    assert httpx.post(server.url + "/v1/classify", content=b"{oops").status_code == 400
    after = _scrape(server.url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("spamlingo_http_requests_total", path="/v1/classify", status="200") == 1
    assert delta("spamlingo_http_requests_total", path="/v1/classify", status="400") == 1
    assert delta("spamlingo_errors_total", kind="invalid_json") == 1
    assert delta("spamlingo_http_request_duration_seconds_count", path="/v1/classify") == 2
    assert delta("spamlingo_batch_size_count") >= 1 and delta("spamlingo_batch_size_sum") == 3
    assert delta("spamlingo_texts_total", label="spam") + delta("spamlingo_texts_total", label="ham") == 3
    assert ("spamlingo_queue_depth", ()) in after


# ------------------------------------------------------------------------------------------ overload, load


def test_overload_answers_503_with_retry_after_and_drops_nothing_accepted(tiny_bundle, tmp_path,
                                                                           fp32_classifier):
    """A one-text queue whose batches wait 200 ms: a burst of 40 requests overflows it. (This server runs
    the fp32 graph: its results do not depend on batching, so they must match exactly.)"""
    s = start_server(tiny_bundle, tmp_path, "--max-queue", "1", "--max-wait-ms", "200", "--model", "fp32")
    try:
        texts = [f"{TEXTS[i % 7]} {i}" for i in range(40)]
        want = fp32_classifier.classify(texts)

        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=60,
                                         limits=httpx.Limits(max_connections=40)) as c:
                return await asyncio.gather(*[c.post("/v1/classify", json={"texts": [t]}) for t in texts])

        responses = asyncio.run(go())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
        for r, w in zip(responses, want):
            if r.status_code == 200:
                (got,) = r.json()["results"]
                _same(got, w)
            else:
                assert r.json()["error"]["kind"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        m = _scrape(s.url)
        assert m[("spamlingo_errors_total", (("kind", "overloaded"),))] == codes.count(503)
        assert m[("spamlingo_http_requests_total", (("path", "/v1/classify"), ("status", "503")))] == codes.count(503)
        # after the burst it serves again
        assert httpx.post(s.url + "/v1/classify", json={"texts": ["calm"]}, timeout=30).status_code == 200
    finally:
        s.stop()


def test_load_2000_requests_at_concurrency_32(server, classifier, tol):
    rng = random.Random(1)
    pool = [f"{t} {i}" for i, t in enumerate(TEXTS[:7] * 6)]
    want = dict(zip(pool, classifier.classify(pool)))
    n, concurrency = 2000, 32
    bodies = [rng.sample(pool, rng.randint(1, 3)) for _ in range(n)]
    responses: list = [None] * n

    async def go():
        it = iter(range(n))
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=concurrency)) as c:
            async def worker():
                for i in it:
                    try:
                        responses[i] = await c.post("/v1/classify", json={"texts": bodies[i]})
                    except httpx.TransportError as e:
                        responses[i] = e

            await asyncio.gather(*[worker() for _ in range(concurrency)])

    before = _scrape(server.url)
    start = time.perf_counter()
    asyncio.run(go())
    seconds = time.perf_counter() - start
    after = _scrape(server.url)
    codes = [getattr(r, "status_code", type(r).__name__) for r in responses]
    assert codes.count(200) == n, {c: codes.count(c) for c in set(codes)}
    for texts, r in zip(bodies, responses):
        results = r.json()["results"]
        assert len(results) == len(texts)
        for t, got in zip(texts, results):
            _same(got, want[t], tol)
    batches = after[("spamlingo_batch_size_count", ())] - before[("spamlingo_batch_size_count", ())]
    texts = after[("spamlingo_batch_size_sum", ())] - before[("spamlingo_batch_size_sum", ())]
    assert texts == sum(map(len, bodies))
    assert batches < n  # requests were gathered into shared batches
    print(f"\nload: {n} requests ({int(texts)} texts) at concurrency {concurrency} in {seconds:.1f}s = "
          f"{n / seconds:.0f} req/s; {int(batches)} model calls, {texts / batches:.1f} texts per call")


# ------------------------------------------------------------------------------------------ schemathesis


@pytest.mark.parametrize("which", ["server", "auth_server"])
def test_schemathesis_finds_no_server_errors_or_schema_violations(which, request, tmp_path):
    """Every check, against the live server's own /openapi.json. 413 is how this API refuses an over-size
    request (documented per operation), so it counts as a rejection of invalid data; and the body limit is
    not expressible in JSON Schema, so a schema-valid body over --max-body-bytes may be refused with it."""
    (tmp_path / "schemathesis.toml").write_text(
        "[checks.negative_data_rejection]\n"
        "expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]\n"
        "[checks.positive_data_acceptance]\n"
        'expected-statuses = ["2xx", 413]\n'
    )
    server = request.getfixturevalue(which)
    st = Path(PY).with_name("st")
    cmd = [str(st), "run", server.url + "/openapi.json", "--checks", "all", "--max-examples", "60", "--seed", "1",
           "--workers", "1", "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
           "--max-failures", "5", "--no-color"]
    if which == "auth_server":  # with the key; the ignored_auth check also tries without it and expects 401
        cmd += ["--header", f"Authorization: Bearer {KEY}"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]


# ------------------------------------------------------------------------------------------ start-up, client


def _start_fails(*args: str, env: dict | None = None) -> str:
    p = subprocess.run([PY, "-m", "serving.server", "--port", str(_free_port()), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_startup_fails_with_one_line_on_missing_or_tampered_bundle(tiny_bundle, tmp_path):
    assert "not found" in _start_fails("--bundle", str(tmp_path / "nope"))
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, bad)
    with open(bad / "tokenizer.json", "r+b") as f:
        f.seek(100)
        c = f.read(1)
        f.seek(100)
        f.write(b"X" if c != b"X" else b"Y")
    assert "checksum mismatch for tokenizer.json" in _start_fails("--bundle", str(bad))
    missing = tmp_path / "missing"
    shutil.copytree(tiny_bundle, missing)
    (missing / "model.onnx").unlink()
    assert "model.onnx is missing" in _start_fails("--bundle", str(missing))
    assert "--max-batch" in _start_fails("--bundle", str(tiny_bundle), "--max-batch", "0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert f"cannot listen on 127.0.0.1:{port}" in _start_fails("--bundle", str(tiny_bundle), "--port", port)
    assert "SPAMLINGO_PORT" in _start_fails("--bundle", str(tiny_bundle), env={"SPAMLINGO_PORT": "eighty"})
    if not load_bundle(tiny_bundle).has("int8"):
        assert "int8" in _start_fails("--bundle", str(tiny_bundle), "--model", "int8")


def _predict_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "serving.client", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_client_prints_one_line_per_input_line(server, classifier, tol):
    lines = ["Free entry to win a prize now", "恭喜您中奖了", "", "see you at lunch?"]
    p = _predict_cli("--url", server.url, "--batch-size", "3", stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    want = classifier.classify(lines)
    assert len(out) == len(lines)
    for row, w in zip(out, want):
        label, prob, lang, scope = row.split("\t")
        assert label == w["label"] and lang == w["lang"] and scope == w["threshold_scope"]
        assert float(prob) == pytest.approx(w["spam_probability"], abs=5e-5 + tol)
    p = _predict_cli("--url", server.url, "--json", "--text", "今すぐクリック", "--text", "hello")
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["今すぐクリック", "hello"] and rows[0]["lang"] == "ja"


def test_client_says_clearly_when_the_server_is_unreachable_or_refuses(auth_server):
    p = _predict_cli("--url", f"http://127.0.0.1:{_free_port()}", "--text", "hi")
    assert p.returncode == 2 and "cannot reach the spamlingo server" in p.stderr and "Traceback" not in p.stderr
    p = _predict_cli("--url", auth_server.url, "--text", "hi")
    assert p.returncode == 2 and "401" in p.stderr and "unauthorized" in p.stderr
    p = _predict_cli("--url", auth_server.url, "--text", "hi", "--api-key", KEY)
    assert p.returncode == 0 and p.stdout.count("\t") == 3


# ------------------------------------------------------------------------------------------ hostile bytes

ADMIN = "admin-s3cret"


@pytest.fixture(scope="module")
def raw_server(tiny_bundle, tmp_path_factory):
    """A server for raw-socket abuse: a short --read-timeout (slowloris), a body limit that lets 50,000-deep
    nesting through to the JSON parser, and the admin endpoint on."""
    s = start_server(tiny_bundle, tmp_path_factory.mktemp("raw"), "--read-timeout", "2", "--max-body-bytes",
                     "262144", "--admin-key", ADMIN)
    yield s
    s.stop()


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _request(path: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(body) if length is None else length}", "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _raw(server: Server, data: bytes, timeout: float = 10) -> tuple[int, bytes, float]:
    """Send bytes on a fresh socket, read until the server closes it: (status, body, seconds)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed before taking it all (413 on the declared length)
        buf = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    seconds = time.perf_counter() - t0
    assert buf.startswith(b"HTTP/1.1 "), buf[:200]
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, seconds


HOSTILE = [
    # (name, path, body or raw request, status, error kind)
    ("huge_integer", "/v1/classify", b'{"texts": ["a"], "x": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("huge_integer_feedback", "/v1/feedback", b'{"text": "a", "label": "spam", "n": ' + b"9" * 5000 + b"}", 400,
     "invalid_json"),
    ("huge_integer_reload", "/admin/reload", b'{"bundle": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("invalid_utf8", "/v1/classify", b'{"texts": ["\xc3\x28 \xff\xfe"]}', 400, "invalid_utf8"),
    ("lone_surrogate", "/v1/classify", b'{"texts": ["ok", "\\udfff"]}', 400, "invalid_unicode"),
    ("deep_nesting_50000", "/v1/classify", b'{"texts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400,
     "invalid_json"),
    ("deep_nesting_feedback", "/v1/feedback", b"[" * 50_000 + b"]" * 50_000, 400, "invalid_json"),
    ("utf8_bom", "/v1/classify", b'\xef\xbb\xbf{"texts": ["a"]}', 400, "invalid_json"),
    ("utf16", "/v1/classify", '{"texts": ["a"]}'.encode("utf-16"), 400, "invalid_utf8"),
    # UTF-16LE without a BOM: ASCII text becomes valid UTF-8 with NUL bytes between, which is not JSON
    ("utf16le_feedback", "/v1/feedback", '{"text": "a", "label": "spam"}'.encode("utf-16-le"), 400, "invalid_json"),
    ("wrong_types", "/v1/classify", b'{"texts": {"a": 1}}', 422, "invalid_request"),
    ("wrong_types_feedback", "/v1/feedback", b'{"text": 1, "label": true}', 422, "invalid_request"),
    ("wrong_types_reload", "/admin/reload", b'{"bundle": ["x"]}', 422, "invalid_request"),
    ("oversize_declared", "/v1/classify", _request("/v1/classify", b'{"texts": ["' + b"a" * 1000,
                                                   length=10_000_000), 413, "body_too_large"),
    ("oversize_sent", "/v1/feedback", b'{"text": "' + b"a" * 300_000 + b'", "label": "spam"}', 413, "body_too_large"),
    ("bad_content_length", "/v1/classify", _request("/v1/classify", b"{}", length=None).replace(
        b"Content-Length: 2", b"Content-Length: 2x"), 400, None),
    ("not_http", "/", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 hello\r\n\r\n", 400, None),
    # slowloris: a request line and half the headers, then nothing; a declared body that never comes
    ("slowloris_headers", "/v1/classify", b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty", 408,
     "request_timeout"),
    ("slowloris_body", "/v1/classify", _request("/v1/classify", b'{"texts": ["a', length=500), 408,
     "request_timeout"),
]


def test_raw_socket_hostile_requests_get_a_4xx_and_the_server_keeps_serving(raw_server):
    """Bytes on a socket, no HTTP client: each is answered 4xx (ours in the error shape, uvicorn's own 400
    for what is not HTTP), slow requests within the --read-timeout bound, and afterwards /healthz and a
    normal classify still answer."""
    auth = f"Authorization: Bearer {ADMIN}"
    for name, path, body, status, kind in HOSTILE:
        data = body if body.startswith((b"POST ", b"\x16")) else _request(path, body, auth)
        got, payload, seconds = _raw(raw_server, data)
        assert got == status, (name, got, payload[:300])
        if kind is not None:
            assert json.loads(payload)["error"]["kind"] == kind, (name, payload[:300])
        if name.startswith("slowloris"):
            assert 1.5 < seconds < 6, (name, seconds)  # --read-timeout 2
        else:
            assert seconds < 5, (name, seconds)
        assert httpx.get(raw_server.url + "/healthz", timeout=10).status_code == 200, name
    r = httpx.post(raw_server.url + "/v1/classify", json={"texts": ["still serving?", "恭喜您中奖了"]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    m = _scrape(raw_server.url)
    assert m[("spamlingo_errors_total", (("kind", "request_timeout"),))] == 2
    assert m.get(("spamlingo_errors_total", (("kind", "internal"),)), 0) == 0


def test_idle_connection_is_closed_after_the_read_timeout(raw_server):
    """A connection that sends nothing at all is not kept open forever either (408, then closed)."""
    status, payload, seconds = _raw(raw_server, b"")
    assert status == 408 and 1.5 < seconds < 6


# ------------------------------------------------------------------------------------------ hot reload


@pytest.fixture(scope="module")
def twin(tiny_bundle, tmp_path_factory):
    """A second bundle: the tiny one with a doc string in its graphs (another sha256, the same predictions)
    and its threshold moved (0.5 -> 0.55), re-checksummed."""
    from bench.feedback import twin_bundle

    d = twin_bundle(tiny_bundle, tmp_path_factory.mktemp("twin") / "tiny-twin")
    load_bundle(d)  # verifies
    return d


def _served_sha(bundle: Path) -> str:
    b = load_bundle(bundle)
    return b.manifest["files"][b.models[_variant(bundle)]]["sha256"][:16]


def test_hot_reload_under_load_fails_no_request(tiny_bundle, twin, tmp_path, classifier, tol):
    """Classify requests 8 at a time (at least 300) while the bundle is swapped back and forth: POST
    /admin/reload to the twin, SIGHUP back to the directory the server started with. Every request is
    answered 200; each response's `model` names the bundle whose threshold its results used, so no
    response mixes models; both sha256 are seen; the swaps are counted in /metrics."""
    s = start_server(tiny_bundle, tmp_path, "--admin-key", ADMIN)
    a, b = _served_sha(tiny_bundle), _served_sha(twin)
    thresholds = {a: load_bundle(tiny_bundle).threshold, b: load_bundle(twin).threshold}
    assert a != b and thresholds[a] != thresholds[b]
    want = dict(zip(TEXTS[:7], classifier.classify(TEXTS[:7])))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    responses: list = []
    swaps: list = []

    async def go():
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=s.url, timeout=60, limits=httpx.Limits(max_connections=12)) as c:
            async def worker(k: int):
                i = 0
                while (len(responses) < 300 or not done.is_set()) and len(responses) < 5000:
                    texts = [TEXTS[(k + i) % 7], TEXTS[(k + i + 3) % 7]]
                    i += 1
                    try:
                        r = await c.post("/v1/classify", json={"texts": texts})
                    except httpx.TransportError as e:
                        r = e
                    responses.append((texts, r))

            async def swapper():
                for _ in range(2):
                    r = await c.post("/admin/reload", json={"bundle": str(twin)}, headers=admin)
                    swaps.append(("http", r.status_code, r.json()))
                    s.proc.send_signal(signal.SIGHUP)  # back to the bundle it was started with
                    for _ in range(500):
                        await asyncio.sleep(0.02)
                        if (await c.get("/readyz")).json()["model"]["sha256"] == a:
                            break
                    swaps.append(("sighup", 200, None))
                    await asyncio.sleep(0.05)
                done.set()

            await asyncio.gather(swapper(), *[worker(k) for k in range(8)])

    try:
        asyncio.run(go())
        m = _scrape(s.url)
    finally:
        s.stop()
    codes = [getattr(r, "status_code", type(r).__name__) for _, r in responses]
    assert codes.count(200) == len(responses) >= 300, {c: codes.count(c) for c in set(codes)}
    seen = {}
    for texts, r in responses:
        body = r.json()
        sha = body["model"]["sha256"]
        seen[sha] = seen.get(sha, 0) + 1
        assert body["model"]["threshold"] == thresholds[sha]
        assert len(body["results"]) == 2
        for t, got in zip(texts, body["results"]):
            assert got["threshold"] == thresholds[sha]  # the results came from the model the response names
            assert got["spam_probability"] == pytest.approx(want[t]["spam_probability"], abs=tol)
            assert got["label"] == ("spam" if got["spam_probability"] >= thresholds[sha] else "ham")
    assert set(seen) == {a, b}, seen
    assert [x[:2] for x in swaps] == [("http", 200), ("sighup", 200)] * 2
    assert all(x[2]["changed"] and x[2]["model"]["sha256"] == b and x[2]["previous"]["sha256"] == a
               for x in swaps if x[0] == "http")
    assert m[("spamlingo_reloads_total", (("result", "success"), ("trigger", "http")))] == 2
    assert m[("spamlingo_reloads_total", (("result", "success"), ("trigger", "sighup")))] == 2
    info = {k: v for k, v in m.items() if k[0] == "spamlingo_bundle_info"}
    assert list(info.values()) == [1.0] and dict(next(iter(info))[1])["sha256"] == a


def _flip_byte(path: Path, offset: int = 200) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        c = f.read(1)
        f.seek(offset)
        f.write(bytes([c[0] ^ 0xFF]))


def test_a_bad_bundle_is_refused_and_the_old_one_keeps_serving(tiny_bundle, tmp_path):
    served = Path(shutil.copytree(tiny_bundle, tmp_path / "served"))
    corrupt = Path(shutil.copytree(tiny_bundle, tmp_path / "corrupt"))
    model_file = load_bundle(tiny_bundle).models[_variant(tiny_bundle)]
    _flip_byte(corrupt / model_file)
    s = start_server(served, tmp_path, "--admin-key", ADMIN)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        sha = httpx.get(s.url + "/readyz").json()["model"]["sha256"]

        def still_serving():
            r = httpx.post(s.url + "/v1/classify", json={"texts": ["free money"]}, timeout=30)
            assert r.status_code == 200 and r.json()["model"]["sha256"] == sha

        r = httpx.post(s.url + "/admin/reload", json={"bundle": str(corrupt)}, headers=admin, timeout=60)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["kind"] == "invalid_bundle" and f"checksum mismatch for {model_file}" in err["message"]
        assert sha in err["message"]  # says what still serves
        still_serving()
        r = httpx.post(s.url + "/admin/reload", json={"bundle": str(tmp_path / "nope")}, headers=admin, timeout=60)
        assert r.status_code == 422 and "not found" in r.json()["error"]["message"]
        # keys: none, wrong, the API key's place; bodies: unknown fields
        assert httpx.post(s.url + "/admin/reload").status_code == 401
        assert httpx.post(s.url + "/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = httpx.post(s.url + "/admin/reload", json={"bundel": "x"}, headers=admin)
        assert r.status_code == 422 and "bundel" in r.json()["error"]["message"]
        # SIGHUP re-reads the directory the server started with: corrupted in place, it is refused too
        _flip_byte(served / model_file)
        s.proc.send_signal(signal.SIGHUP)
        for _ in range(300):
            m = _scrape(s.url)
            if m.get(("spamlingo_reloads_total", (("result", "failure"), ("trigger", "sighup")))):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the SIGHUP reload never finished")
        still_serving()
        log = s.log.read_text()
        assert "SIGHUP reload: bundle refused" in log and f"checksum mismatch for {model_file}" in log
        assert m[("spamlingo_reloads_total", (("result", "failure"), ("trigger", "http")))] == 2
        info = [dict(k[1]) for k, v in m.items() if k[0] == "spamlingo_bundle_info" and v == 1]
        assert [i["sha256"] for i in info] == [sha]
        # repaired: the next SIGHUP takes it
        _flip_byte(served / model_file)
        r = httpx.post(s.url + "/admin/reload", headers=admin, timeout=60)  # no body: the started directory
        assert r.status_code == 200 and r.json()["model"]["sha256"] == sha and r.json()["changed"] is False
        assert s.proc.poll() is None
    finally:
        s.stop()


def test_reload_endpoint_is_403_without_an_admin_key(server):
    r = httpx.post(server.url + "/admin/reload", json={"bundle": "x"})
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["kind"] == "admin_disabled" and "--admin-key" in err["message"]
    assert "/admin/reload" not in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_a_swap_never_splits_a_request_between_two_models(tiny_bundle):
    """In process, with stand-in models whose batches take 20 ms: requests of 10 texts go in batches of 4
    (each spans three batches) while a reload swaps A for B. Every response is wholly A's or wholly B's,
    named so in its `model`, both occur, and nothing fails."""
    def model(p: float, delay: float = 0.02):
        def predict(texts):
            time.sleep(delay)
            return [{"label": "spam" if p >= 0.5 else "ham", "spam_probability": p, "threshold": 0.5,
                     "threshold_scope": "global", "lang": "en", "truncated": False} for _ in texts]
        return predict

    info = {"bundle": "a", "variant": "fp32", "sha256": "a" * 16, "threshold": 0.5}
    info_b = {**info, "bundle": "b", "sha256": "b" * 16}
    loads = []

    def loader(bundle):
        loads.append(bundle)
        return model(0.9), info_b

    app = create_app(ServerSettings(max_batch=4, max_wait_ms=0), model(0.1), info, loader=loader)

    async def go():
        async with app.router.lifespan_context(app):
            while not app.state.batcher.ready:
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                async def one(i):
                    await asyncio.sleep(0.01 * i)
                    return await c.post("/v1/classify", json={"texts": [f"t{i}-{k}" for k in range(10)]})

                tasks = [asyncio.create_task(one(i)) for i in range(12)]
                await asyncio.sleep(0.05)
                swapped = await app.state.reload("b-dir", "http")
                return swapped, await asyncio.gather(*tasks)

    swapped, responses = asyncio.run(go())
    assert loads == ["b-dir"] and swapped["model"]["bundle"] == "b"
    kinds = []
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        probs = {x["spam_probability"] for x in body["results"]}
        assert len(body["results"]) == 10 and len(probs) == 1
        assert (probs.pop(), body["model"]["bundle"]) in {(0.1, "a"), (0.9, "b")}
        kinds.append(body["model"]["bundle"])
    assert "a" in kinds and "b" in kinds
    assert kinds == sorted(kinds)  # requests queued after the swap never go back to the old model
