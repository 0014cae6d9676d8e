"""HTTP inference server for an exported bundle: `spamlingo-serve --bundle bundles/<name>`.

    POST /v1/classify  {"texts": [...], "explain"?: true}  -> one result per text, in order (with "explain":
                       the spans that raised and lowered its spam probability most; serving/explain.py)
    POST /v1/feedback  {"text", "label": "spam"|"ham", "reporter"?, "note"?}  -> 201 {"id", "duplicate": false};
                       the same report (normalised text, label, reporter) again -> 200 {first id, "duplicate": true}
    GET  /v1/feedback/stats  (reports by label, language, day; disagreements with the model's verdict)
    GET  /healthz  (process alive)   GET /readyz  (bundle loaded and warm-up inference done)
    GET  /metrics  (Prometheus)      GET /docs, /openapi.json
    POST /admin/reload  {"bundle": "<dir>"}?  (hot reload; also on SIGHUP; not in the API docs)

Texts of concurrent requests are gathered into one ONNX Runtime call (dynamic batching: up to --max-batch
texts or --max-wait-ms after the oldest waiting text) that runs on a single worker thread, so the event loop
keeps accepting requests while the model works. The queue of waiting texts is bounded (--max-queue): when
it is full a request is answered 503 with Retry-After at once instead of growing memory, and a request
that is accepted always gets exactly its own results, in order.

Feedback reports are stored (serving/feedback.py, docs/DESIGN.md §7) with the served model's probability
and threshold for the text at report time, committed before the answer; duplicates are decided by the
database. A reload (SIGHUP, or POST /admin/reload) verifies and warms up the new bundle on a thread of its own
while the old one serves, then swaps between two batches: no request fails, each response's `model` names
the model that produced it, and a bundle that fails verification is refused while the old one keeps serving.

Error responses are `{"error": {"kind": ..., "message": ...}}`:
    400 invalid_json, invalid_utf8, invalid_unicode   401 unauthorized   403 admin_disabled
    408 request_timeout (headers or body slower than --read-timeout)
    413 body_too_large, too_many_texts, text_too_long (size limits: split the request or shorten the text)
    422 invalid_request (wrong shape or types), empty_texts, empty_text, invalid_bundle (reload refused)
    503 overloaded (with Retry-After), feedback_disabled, store_unavailable   500 inference_error, internal
With --api-key, /v1/classify, /v1/feedback, /v1/feedback/stats and /metrics need `Authorization: Bearer <key>`
(the metrics reveal traffic volumes; Prometheus sends the key with `authorization: {credentials: ...}`);
--feedback-key is a second key that opens POST /v1/feedback only; /admin/reload needs --admin-key (403 when
the server has none). /healthz, /readyz and the API docs stay open.

This module, like all of serving/, imports neither torch nor transformers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import signal
import socket
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import explain as X
from serving.batching import WARMUP_TEXTS, Batcher, Overloaded, ServedModel
from serving.metrics import Metrics, MetricsMiddleware
from serving.parsing import parse_feedback, parse_reload, parse_texts, read_body
from serving.schemas import (
    ApiError,
    ClassifyResponse,
    FeedbackAck,
    FeedbackStats,
    Health,
    ModelInfo,
    Readiness,
    classify_request,
    error_responses,
    feedback_request,
)
from serving.settings import ServerSettings, StartupError, parse_settings, shown

log = logging.getLogger("spamlingo.server")

API_VERSION = "1"


# ------------------------------------------------------------------------------------------ errors


def _error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------ the app


class _ScoreCache:
    """The latest classifications, by sha256 of the text as classified, with the model that scored them: a
    report of a message the client has just classified (the usual flow) reuses that score instead of
    running the model again. Bounded (least recently used out); a swap of the model makes old entries
    misses (their sha256 no longer matches)."""

    def __init__(self, size: int = 8192):
        self.size = size
        self._items: OrderedDict[bytes, tuple[str, float, float, str]] = OrderedDict()

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()

    def put(self, text: str, model_sha: str, result: dict) -> None:
        key = self._key(text)
        self._items[key] = (model_sha, float(result["spam_probability"]), float(result["threshold"]), result["lang"])
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, text: str, model_sha: str) -> tuple[float, float, str] | None:
        hit = self._items.get(self._key(text))
        if hit is None or hit[0] != model_sha:
            return None
        return hit[1:]


def _served(predict: Callable[[list[str]], list[dict]], model_info: dict) -> ServedModel:
    method, explain = X.explainer_for(predict)
    return ServedModel(predict, ModelInfo(**model_info).model_dump(),
                       str(model_info.get("bundle_sha256") or model_info["sha256"]), X.scorer_for(predict),
                       explain, method)


def create_app(settings: ServerSettings, predict: Callable[[list[str]], list[dict]], model_info: dict, *,
               store=None, loader: Callable[[str | None], tuple[Callable, dict]] | None = None,
               handle_sighup: bool = False) -> FastAPI:
    """The ASGI app. `predict(texts) -> list[dict]` (e.g. `Classifier.classify`) runs on one worker thread.

    store: a serving.feedback.FeedbackStore for /v1/feedback (None: those endpoints answer 503
    feedback_disabled); the app closes it on shutdown. loader(bundle_dir | None) -> (predict, model_info):
    what a reload loads (default: `load_model` with these settings, None meaning the directory the server
    was started with, or the newest bundle). handle_sighup: SIGHUP reloads (the real server; not in tests
    that build several apps in one process)."""
    from serving.feedback import AsyncWriter

    metrics = Metrics()
    batcher = Batcher(_served(predict, model_info), settings.max_batch, settings.max_wait_ms / 1000.0,
                      settings.max_queue, metrics)
    metrics.set_bundle(batcher.model.info)
    writer = AsyncWriter(store, on_commit=metrics.feedback_commit.observe) if store is not None else None
    scores = _ScoreCache()
    background: set[asyncio.Task] = set()
    reload_lock = asyncio.Lock()
    reload_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamlingo-reload")

    def default_loader(bundle: str | None) -> tuple[Callable, dict]:
        classifier, info = load_model(replace(settings, bundle=bundle or settings.bundle))
        return classifier.classify, info

    load = loader or default_loader

    def load_and_warm(bundle: str | None) -> ServedModel:
        # On the reload thread: verify + open the new bundle and run the warm-up texts through it, while
        # the old model keeps serving on the batcher's thread.
        new_predict, new_info = load(bundle)
        out = new_predict(list(WARMUP_TEXTS))
        if len(out) != len(WARMUP_TEXTS):
            raise RuntimeError(f"warm-up returned {len(out)} results for {len(WARMUP_TEXTS)} texts")
        return _served(new_predict, new_info)

    async def reload(bundle: str | None, trigger: str) -> dict:
        """Load, verify and warm up a bundle, then swap it in; the old one serves until then, and on any
        failure. Reloads run one at a time."""
        async with reload_lock:
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                new = await loop.run_in_executor(reload_pool, load_and_warm, bundle)
            except Exception as e:  # noqa: BLE001 - refused: the old model keeps serving
                metrics.reloads.labels("failure", trigger).inc()
                from serving.bundle import BundleError

                if isinstance(e, (StartupError, BundleError)):
                    raise ApiError(422, "invalid_bundle", f"bundle refused, still serving "
                                   f"{batcher.model.info['bundle']} ({batcher.model.info['sha256']}): {e}") from None
                log.exception("reload failed")
                raise ApiError(500, "reload_failed", f"reload failed, still serving {batcher.model.info['bundle']} "
                               f"({batcher.model.info['sha256']}): {type(e).__name__}: {e}") from None
            old = await batcher.swap(new)
            metrics.set_bundle(new.info, previous=old.info)
            metrics.reloads.labels("success", trigger).inc()
            seconds = time.perf_counter() - t0
            log.info("reloaded (%s): now serving %s %s (%s), was %s (%s); %.2f s", trigger, new.info["bundle"],
                     new.info["variant"], new.info["sha256"], old.info["bundle"], old.info["sha256"], seconds)
            return {"status": "reloaded", "changed": new.sha256 != old.sha256, "model": new.info,
                    "previous": old.info, "seconds": round(seconds, 3)}

    async def reload_on_sighup() -> None:
        try:
            await reload(None, "sighup")
        except ApiError as e:
            log.error("SIGHUP reload: %s", e.message)

    def on_sighup() -> None:
        task = asyncio.get_running_loop().create_task(reload_on_sighup())
        background.add(task)
        task.add_done_callback(background.discard)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        if writer is not None:
            await writer.start()
        sighup = handle_sighup and hasattr(signal, "SIGHUP")
        if sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            yield
        finally:
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # one arriving while we shut down does nothing
            for task in list(background):
                try:
                    await task
                except Exception:  # noqa: BLE001 - logged by the task itself
                    pass
            await batcher.stop()
            if writer is not None:
                await writer.stop()
            reload_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="spamlingo",
        version=API_VERSION,
        summary="Multilingual (zh/ja/ko/en) spam classification",
        description=__doc__.split("\n\n", 1)[1].split("\n\nThis module")[0],
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics, app.state.batcher = settings, metrics, batcher
    app.state.writer, app.state.reload = writer, reload

    # -------------------------------------------------------------------------- auth
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key (or, for POST /v1/feedback "
                                                      "only, its --feedback-key)")

    def key_check(*keys: str, what: str = "API key") -> Callable:
        wanted = [k.encode() for k in keys if k]

        async def require_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
            given = (creds.credentials if creds else "").encode()
            ok = False
            for k in wanted:  # every key compared, in constant time
                ok |= hmac.compare_digest(given, k)
            if not ok:
                raise ApiError(401, "unauthorized", f"missing or wrong {what}: send `Authorization: Bearer <key>`",
                               {"WWW-Authenticate": "Bearer"})

        return require_key

    guarded = [Depends(key_check(settings.api_key))] if settings.api_key else []
    auth_errors = (401,) if settings.api_key else ()
    feedback_keys = [k for k in (settings.api_key, settings.feedback_key) if k]
    feedback_guard = [Depends(key_check(*feedback_keys, what="API or feedback key"))] if feedback_keys else []
    feedback_auth_errors = (401,) if feedback_keys else ()

    admin_check = key_check(settings.admin_key, what="admin key")

    async def require_admin(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not settings.admin_key:
            raise ApiError(403, "admin_disabled", "reloading over HTTP is disabled: start the server with "
                           "--admin-key (or SPAMLINGO_ADMIN_KEY), or send it SIGHUP")
        await admin_check(creds)

    # -------------------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.errors.labels(exc.kind).inc()
        return _error_response(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(kind).inc()
        return _error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        metrics.errors.labels("invalid_request").inc()
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        metrics.errors.labels("internal").inc()
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(500, "internal", "internal server error")

    # -------------------------------------------------------------------------- routes
    request_model = classify_request(settings)

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=error_responses(400, *auth_errors, 408, 413, 422, 500, 503),
        dependencies=guarded,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ClassifyRequest"}}}}},
        summary="Classify texts as spam or ham",
        operation_id="classify",
    )
    async def classify(request: Request) -> Response:
        # The body is parsed here rather than by FastAPI so that size limits apply before reading it all and
        # every refusal has the {"error": {...}} shape.
        texts, cut, explain = parse_texts(await read_body(request, settings.max_body_bytes, settings.read_timeout),
                                          settings)
        with explain_budget(len(texts) if explain else 0):
            results, model = await submit(texts)
            why = await explain_texts(texts, model) if explain else None
        out = []
        for i, (t, r, was_cut) in enumerate(zip(texts, results, cut)):
            metrics.texts.labels(r["label"]).inc()
            if writer is not None:
                scores.put(t, model.sha256, r)
            out.append({"label": r["label"], "spam_probability": float(r["spam_probability"]),
                        "threshold": float(r["threshold"]), "threshold_scope": r.get("threshold_scope", "global"),
                        "lang": r["lang"], "truncated": bool(r["truncated"]) or was_cut})
            if why is not None:
                out[-1]["explanation"] = why[i]
        # the model that produced these results: during a reload, the old one or the new one, never a mix
        return JSONResponse({"results": out, "model": model.info})

    explaining = [0]  # model rows of the explanations accepted and not finished

    @contextmanager
    def explain_budget(n_texts: int):
        # Bounded like the batcher's queue: refused at once while other explanations hold max_queue rows
        # (a decomposition is one row per text, an occlusion up to max_rows + 1).
        per_text = 1 if batcher.model.explain_method == "decomposition" else settings.explain_max_rows + 1
        rows = n_texts * per_text
        if rows and explaining[0] and explaining[0] + rows > settings.max_queue:
            raise ApiError(503, "overloaded", f"explanations of {explaining[0]} model rows are waiting; retry later",
                           {"Retry-After": str(batcher.retry_after())})
        explaining[0] += rows
        try:
            yield
        finally:
            explaining[0] -= rows

    async def explain_texts(texts: list[str], model: ServedModel) -> list[dict]:
        # By the model that classified them, on its worker thread between batches (never the event loop).
        try:
            return await batcher.call(model.explain, texts, settings.explain_max_rows)
        except Exception as e:  # noqa: BLE001 - as a failed batch is answered
            log.exception("explanation failed for %d texts", len(texts))
            raise ApiError(500, "inference_error", f"explanation failed: {type(e).__name__}: {e}") from None

    async def submit(texts: list[str]) -> tuple[list[dict], ServedModel]:
        try:
            return await batcher.submit(texts)
        except Overloaded:
            raise ApiError(503, "overloaded", f"the queue is full ({batcher.queued} texts waiting); retry later",
                           {"Retry-After": str(batcher.retry_after())}) from None

    feedback_model = feedback_request(settings)

    @app.post(
        "/v1/feedback",
        status_code=201,
        response_model=FeedbackAck,
        responses={200: {"model": FeedbackAck, "description": "a duplicate: this report was stored before (its id)"},
                   **error_responses(400, *feedback_auth_errors, 408, 413, 422, 500, 503, feedback=True)},
        dependencies=feedback_guard,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/FeedbackRequest"}}}}},
        summary="Report a message as spam or ham (stored for retraining)",
        operation_id="feedback",
    )
    async def feedback(request: Request) -> Response:
        report = parse_feedback(await read_body(request, settings.max_body_bytes, settings.read_timeout), settings)
        if writer is None:
            raise ApiError(503, "feedback_disabled", "this server stores no feedback (started with --feedback-db none)")
        text = report["text"]
        model = batcher.model
        hit = scores.get(text, model.sha256)
        if hit is None:  # not classified here lately (by this model): score it now
            (r,), model = await submit([text])
            hit = (float(r["spam_probability"]), float(r["threshold"]), r["lang"])
        probability, threshold, lang = hit
        try:
            report_id, duplicate = await writer.add({**report, "probability": probability, "threshold": threshold,
                                                     "lang": lang, "bundle_sha256": model.sha256})
        except Exception as e:  # noqa: BLE001 - the database refused or is unreachable (logged by the writer)
            raise ApiError(503, "store_unavailable", f"the feedback store could not take the report "
                           f"({type(e).__name__}); retry later", {"Retry-After": "1"}) from None
        metrics.feedback.labels(report["label"], "duplicate" if duplicate else "stored").inc()
        return JSONResponse({"id": report_id, "duplicate": duplicate}, status_code=200 if duplicate else 201)

    @app.get("/v1/feedback/stats", response_model=FeedbackStats, dependencies=guarded,
             responses=error_responses(*auth_errors, 503, feedback=True), operation_id="feedback_stats",
             summary="Feedback reports: counts by label, language and day; disagreements with the model")
    async def feedback_stats():
        if writer is None:
            raise ApiError(503, "feedback_disabled", "this server stores no feedback (started with --feedback-db none)")
        try:
            return await writer.stats()
        except Exception as e:  # noqa: BLE001
            log.exception("feedback stats failed")
            raise ApiError(503, "store_unavailable", f"the feedback store could not be read ({type(e).__name__})",
                           {"Retry-After": "1"}) from None

    # Not in the public API schema: an operator's endpoint behind a key of its own.
    @app.post("/admin/reload", dependencies=[Depends(require_admin)], include_in_schema=False)
    async def admin_reload(request: Request) -> Response:
        bundle = parse_reload(await read_body(request, settings.max_body_bytes, settings.read_timeout))
        return JSONResponse(await reload(bundle, "http"))

    @app.get("/healthz", response_model=Health, summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, summary="Bundle loaded and warm-up inference done",
             responses={503: {"model": Readiness, "description": "still starting"}})
    async def readyz():
        if batcher.ready:
            return {"status": "ready", "model": batcher.model.info}
        return JSONResponse({"status": "starting", "model": None}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=guarded, response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}, **error_responses(*auth_errors)})
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from serving import review  # GET /: the review page, and its /static/ assets (not in the API schema)

    app.include_router(review.router)

    def openapi():
        # ClassifyRequest and FeedbackRequest are validated by parse_texts / parse_feedback, not FastAPI, so
        # add their schemas to the components.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 description=app.description, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in (("ClassifyRequest", request_model), ("FeedbackRequest", feedback_model)):
                schemas[name] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    paths = {"/v1/classify", "/v1/feedback", "/v1/feedback/stats", "/admin/reload", "/healthz", "/readyz",
             "/metrics", "/docs", "/openapi.json"}
    app.add_middleware(MetricsMiddleware, metrics=metrics, paths=paths)
    return app


# ------------------------------------------------------------------------------------------ start-up


def load_model(settings: ServerSettings):
    """Load and verify the bundle, open the ONNX Runtime session. Returns (classifier, model_info)."""
    from serving.bundle import BundleError, load_bundle, newest_bundle
    from serving.inference import Classifier

    try:
        bundle = load_bundle(Path(settings.bundle) if settings.bundle else newest_bundle())
        int8_ok = bundle.has("int8") and bundle.int8.get("status", "passed") == "passed"
        variant = settings.model or ("int8" if int8_ok else "fp32")
        if variant == "int8" and not int8_ok:
            why = bundle.int8.get("reason") or "not exported"
            raise StartupError(f"bundle {bundle.path} has no usable int8 model ({why}); use --model fp32")
        model_file = bundle.model_path(variant).name
        # One graph call per gathered batch: the classifier's sub-batch size is the server's batch size.
        classifier = Classifier(bundle, variant=variant, threads=settings.threads, batch_size=settings.max_batch,
                                spin=False)
    except BundleError as e:
        raise StartupError(str(e)) from None
    mismatch = bundle.text.normalizer_mismatch()
    if mismatch:
        log.warning("bundle %s: %s", bundle.name, mismatch)
    sha256 = bundle.manifest["files"][model_file]["sha256"]
    info = {"bundle": bundle.name, "variant": variant, "sha256": sha256[:16], "bundle_sha256": sha256,
            "threshold": classifier.threshold,  # the served graph's (bundle.policy_for)
            "threshold_by_lang": dict(classifier.policy.get("by_lang") or {}),
            "created_at": bundle.created_at or None, "mlflow_run_id": bundle.source.get("mlflow_run_id")}
    return classifier, info


def open_store(settings: ServerSettings):
    """The feedback store the settings name (None for --feedback-db none); StartupError when it cannot open."""
    if settings.feedback_db.strip().lower() == "none":
        return None
    from serving.feedback import DEFAULT_URL, FeedbackError, FeedbackStore

    try:
        return FeedbackStore(settings.feedback_db or DEFAULT_URL)
    except FeedbackError as e:
        raise StartupError(f"--feedback-db: {e}") from None


def _protocol_with_header_timeout(seconds: float, on_timeout: Callable[[], Any]):
    """uvicorn's httptools protocol, plus a deadline for request headers: a connection whose request line and
    headers have not all arrived `seconds` after it opened (or after the request's first byte) is answered
    408 and closed (slowloris). uvicorn itself waits for them forever. None without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is in the serve extra
        return None
    body = json.dumps({"error": {"kind": "request_timeout",
                                 "message": f"the request headers did not arrive within {seconds:g} s"}}).encode()
    response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport is None or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self._arm()  # a pipelined request waits behind a response being written: not its fault
                return
            on_timeout()
            self.transport.write(response)
            self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address is taken (uvicorn would say so only after)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise StartupError(f"cannot resolve --host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(addr)
        except OSError as e:
            raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> None:
    if hasattr(signal, "SIGHUP"):  # until the app handles it (a reload), a SIGHUP must not end the process
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    store = None
    try:
        settings = parse_settings(argv)
        _check_port(settings.host, settings.port)
        classifier, info = load_model(settings)
        store = open_store(settings)  # after the bundle: a server that cannot start creates no database
    except StartupError as e:
        if store is not None:
            store.close()
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))  # uvicorn's look
    for logger in (log, logging.getLogger("spamlingo.feedback")):
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if settings.log_level == "trace" else settings.log_level.upper())
    app = create_app(settings, classifier.classify, info, store=store, handle_sighup=True)
    shown_settings = {k: shown(k, v) for k, v in asdict(settings).items()}
    print(f"spamlingo-serve: {info['bundle']} ({info['variant']}) on http://{settings.host}:{settings.port} "
          f"{json.dumps(shown_settings)}", file=sys.stderr, flush=True)
    protocol = _protocol_with_header_timeout(settings.read_timeout,
                                             lambda: app.state.metrics.errors.labels("request_timeout").inc())
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.log_level in ("debug", "trace"), http=protocol or "auto")


if __name__ == "__main__":
    main()
