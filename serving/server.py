"""HTTP inference server for an exported bundle: `spamlingo-serve --bundle bundles/<name>`.

    POST /v1/classify  {"texts": [...]}  -> one result per text, in order
    GET  /healthz  (process alive)   GET /readyz  (bundle loaded and warm-up inference done)
    GET  /metrics  (Prometheus)      GET /docs, /openapi.json

Texts of concurrent requests are gathered into one ONNX Runtime call (dynamic batching: up to --max-batch
texts or --max-wait-ms after the oldest waiting text) that runs on a single worker thread, so the event loop
keeps accepting requests while the model works. The queue of waiting texts is bounded (--max-queue): when
it is full a request is answered 503 with Retry-After at once instead of growing memory, and a request
that is accepted always gets exactly its own results, in order.

Error responses are `{"error": {"kind": ..., "message": ...}}`:
    400 invalid_json, invalid_utf8, invalid_unicode   401 unauthorized
    413 body_too_large, too_many_texts, text_too_long (size limits: split the request or shorten the text)
    422 invalid_request (wrong shape or types), empty_texts
    503 overloaded (with Retry-After)   500 inference_error, internal
With --api-key, /v1/classify and /metrics need `Authorization: Bearer <key>` (the metrics reveal traffic
volumes; Prometheus sends the key with `authorization: {credentials: ...}`); /healthz, /readyz and the API
docs stay open.

This module, like all of serving/, imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import socket
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.text import LANGS

log = logging.getLogger("spamlingo.server")

API_VERSION = "1"
WARMUP_TEXTS = ["Free entry: text WIN to claim your prize", "恭喜您中奖了，请点击链接领取", "今すぐ登録してください",
                "무료 쿠폰을 받으세요", "see you at lunch?"]


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class ServerSettings:
    """Everything `spamlingo-serve` takes; each flag falls back to the env var SPAMLINGO_<FLAG>."""

    bundle: str = ""  # "" = the newest directory under bundles/
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 0  # ONNX Runtime intra-op threads (0 = ONNX Runtime's default)
    model: str = ""  # fp32 | int8 ("" = int8 when the bundle has a passed int8 model, else fp32)
    max_batch: int = 32  # texts per ONNX Runtime call
    max_wait_ms: float = 5.0  # how long the oldest waiting text may wait for a batch to fill
    max_texts: int = 64  # texts per request
    max_chars: int = 20_000  # characters per text
    too_long: str = "reject"  # reject (413) | truncate (cut at max_chars, result says truncated)
    max_queue: int = 1024  # texts waiting for the model; beyond it requests get 503
    max_body_bytes: int = 1 << 20
    api_key: str = ""
    log_level: str = "info"

    def check(self) -> None:
        """Raise ValueError naming the flag on an impossible value."""
        for name in ("max_batch", "max_texts", "max_chars", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"--threads must be 0 (ONNX Runtime's default) or more, got {self.threads}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.too_long not in ("reject", "truncate"):
            raise ValueError(f"--too-long must be 'reject' or 'truncate', got {self.too_long!r}")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError(f"--log-level must be critical|error|warning|info|debug|trace, got {self.log_level!r}")
        if self.model not in ("", "fp32", "int8"):
            raise ValueError(f"--model must be 'fp32' or 'int8', got {self.model!r}")


# ------------------------------------------------------------------------------------------ errors


class ApiError(Exception):
    """A request the server refuses: answered as {"error": {"kind", "message"}} with `status`."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def _error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------ OpenAPI models


class ErrorDetail(BaseModel):
    kind: str = Field(description="machine-readable error kind, e.g. invalid_json, text_too_long, overloaded")
    message: str = Field(description="what was wrong, naming the offending field or limit")


class ErrorResponse(BaseModel):
    error: ErrorDetail


_SCOPE_PATTERN = "^(global|lang:(" + "|".join(LANGS) + "))$"


class Result(BaseModel):
    label: Literal["spam", "ham"]
    spam_probability: float = Field(ge=0.0, le=1.0, description="softmax(logits)[1]")
    threshold: float = Field(description="the threshold that applied to this text (its language's own, or "
                                         "the global one): label is spam iff spam_probability >= threshold")
    threshold_scope: str = Field(pattern=_SCOPE_PATTERN, examples=["lang:ko", "global"],
                                 description='"lang:<tag>" when the text\'s language has a threshold of its '
                                             'own (chosen on that language\'s validation rows), else "global"')
    lang: Literal[LANGS] = Field(description="script-based tag of the normalised text")  # type: ignore[valid-type]
    truncated: bool = Field(description="the text was longer than the model reads (tokens or --max-chars)")


class ModelInfo(BaseModel):
    bundle: str = Field(description="bundle directory name")
    variant: Literal["fp32", "int8"]
    sha256: str = Field(description="first 16 hex digits of the served ONNX file's checksum")
    threshold: float = Field(description="the global threshold: for texts whose language has none of its own")
    threshold_by_lang: dict[Literal[LANGS], float] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="per-language thresholds, by language tag (scope lang:<tag>)")
    created_at: str | None = None
    mlflow_run_id: str | None = None


class ClassifyResponse(BaseModel):
    results: list[Result] = Field(description="one result per input text, in the same order")
    model: ModelInfo


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "starting"]
    model: ModelInfo | None = None


def _request_model(settings: ServerSettings) -> type[BaseModel]:
    # The schema states the live limits, so clients and schemathesis see what the server enforces.
    if settings.too_long == "reject":
        text_type: Any = Annotated[str, StringConstraints(max_length=settings.max_chars)]
    else:
        text_type = str
    example = {"texts": ["WINNER!! Claim your prize: reply YES", "恭喜您中奖了，请点击链接领取", "会議は3時からです"]}
    return create_model(
        "ClassifyRequest",
        __config__=ConfigDict(json_schema_extra={"examples": [example]}),
        texts=(list[text_type], Field(min_length=1, max_length=settings.max_texts,
                                      description="messages to classify (raw text; normalised by the server)")),
    )


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "invalid_json, invalid_utf8, invalid_unicode (an unpaired surrogate escape)",
            401: "unauthorized: missing or wrong `Authorization: Bearer <key>`",
            413: "body_too_large (--max-body-bytes), too_many_texts (--max-texts), text_too_long (--max-chars)",
            422: "invalid_request (wrong shape or types), empty_texts",
            500: "inference_error", 503: "overloaded: the queue is full; retry after Retry-After seconds"}
    out: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse, "description": text[c]} for c in codes}
    if 503 in out:
        out[503]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
    if 401 in out:
        out[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


# ------------------------------------------------------------------------------------------ metrics


class Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process, e.g. tests)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("spamlingo_http_requests", "HTTP requests by path and status code",
                                ["path", "status"], registry=r)
        self.latency = Histogram("spamlingo_http_request_duration_seconds", "HTTP request latency", ["path"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=r)
        self.batch_size = Histogram("spamlingo_batch_size", "texts per ONNX Runtime call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.inference = Histogram("spamlingo_inference_duration_seconds", "seconds per ONNX Runtime batch",
                                   buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=r)
        self.queue_depth = Gauge("spamlingo_queue_depth", "texts waiting for the model", registry=r)
        self.errors = Counter("spamlingo_errors", "refused or failed requests by error kind", ["kind"], registry=r)
        self.texts = Counter("spamlingo_texts", "texts classified by label", ["label"], registry=r)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP response by path and status and times it."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"  # bounded label cardinality
        status = {"code": 500}
        start = time.perf_counter()

        async def _send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.requests.labels(path, str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ batching


class Overloaded(Exception):
    pass


class _Pending:
    __slots__ = ("texts", "future", "results", "sent", "done", "arrival", "cancelled")

    def __init__(self, texts: Sequence[str], future: asyncio.Future, arrival: float):
        self.texts, self.future, self.arrival = texts, future, arrival
        self.results: list[Any] = [None] * len(texts)
        self.sent = 0  # texts handed to the model so far
        self.done = 0  # texts with results
        self.cancelled = False


class Batcher:
    """Gathers texts of concurrent requests into batches for one worker thread.

    `predict(texts) -> list[dict]` runs on that thread, at most `max_batch` texts at a time. A batch goes as
    soon as it is full or the oldest waiting text has waited `max_wait_s`. A request whose texts would push
    the number waiting above `max_queue` is refused (`Overloaded`) unless nothing is waiting (so a request
    larger than the queue is still served). A large request may be split over several batches; its results
    are reassembled in order. Texts of a request whose client went away are skipped.

    fp32 results do not depend on batching. With the int8 graph (ONNX Runtime dynamic quantisation scales
    activations per batch tensor) a text's probability moves slightly with its batch-mates: < 4e-4 measured
    on the tiny test model.
    """

    def __init__(self, predict: Callable[[list[str]], list[dict]], max_batch: int, max_wait_s: float,
                 max_queue: int, metrics: Metrics, warmup: Sequence[str] = WARMUP_TEXTS):
        self.predict, self.max_batch, self.max_wait_s, self.max_queue = predict, max_batch, max_wait_s, max_queue
        self.metrics, self.warmup_texts = metrics, list(warmup)
        self.ready = False
        self.queued = 0  # texts accepted but not yet handed to the model
        self._pending: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batch_seconds = 0.01  # running mean, for Retry-After

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamlingo-ort")
        self._task = asyncio.create_task(self._run(), name="spamlingo-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for req in self._pending:
            if not req.future.done():
                req.future.set_exception(ApiError(503, "shutting_down", "the server is shutting down",
                                                  {"Retry-After": "1"}))
        self._pending.clear()
        if self._executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def retry_after(self) -> int:
        batches = math.ceil((self.queued + 1) / self.max_batch)
        return max(1, math.ceil(batches * self._batch_seconds))

    async def submit(self, texts: Sequence[str]) -> list[dict]:
        n = len(texts)
        if self.queued and self.queued + n > self.max_queue:
            raise Overloaded()
        req = _Pending(texts, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending.append(req)
        self._set_queued(self.queued + n)
        self._wakeup.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            req.cancelled = True
            raise

    def _set_queued(self, n: int) -> None:
        self.queued = n
        self.metrics.queue_depth.set(n)

    def _take(self) -> list[tuple[_Pending, int, int]]:
        """Up to max_batch texts from the head of the queue, as (request, start, end) slices."""
        out, room = [], self.max_batch
        while self._pending and room:
            req = self._pending[0]
            if req.cancelled or req.future.done():
                self._pending.popleft()
                self._set_queued(self.queued - (len(req.texts) - req.sent))
                continue
            k = min(room, len(req.texts) - req.sent)
            out.append((req, req.sent, req.sent + k))
            req.sent += k
            room -= k
            self._set_queued(self.queued - k)
            if req.sent == len(req.texts):
                self._pending.popleft()
        return out

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.predict, self.warmup_texts)
            self.ready = True
            log.info("warm-up inference done; ready")
        except Exception:  # noqa: BLE001 - stays not ready (503 on /readyz); requests still get tried
            log.exception("warm-up inference failed")
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._pending[0].arrival + self.max_wait_s
            while self.queued < self.max_batch:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except TimeoutError:
                    break
            slices = self._take()
            if slices:
                await self._run_batch(loop, slices)

    async def _run_batch(self, loop, slices: list[tuple[_Pending, int, int]]) -> None:
        texts = [t for req, a, b in slices for t in req.texts[a:b]]
        start = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self.predict, texts)
            if len(out) != len(texts):
                raise RuntimeError(f"the model returned {len(out)} results for {len(texts)} texts")
        except Exception as e:  # noqa: BLE001 - the requests of this batch hear about it
            log.exception("inference failed on a batch of %d texts", len(texts))
            if len(slices) > 1:
                # One request's text must not fail the others it was batched with: retry them one by one.
                for piece in slices:
                    await self._run_batch(loop, [piece])
                return
            err = ApiError(500, "inference_error", f"inference failed: {type(e).__name__}: {e}")
            for req, _, _ in slices:
                if not req.future.done():
                    req.future.set_exception(err)
            return
        seconds = time.perf_counter() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self.metrics.batch_size.observe(len(texts))
        self.metrics.inference.observe(seconds)
        i = 0
        for req, a, b in slices:
            req.results[a:b] = out[i:i + b - a]
            i += b - a
            req.done += b - a
            if req.done == len(req.texts) and not req.future.done():
                req.future.set_result(req.results)


# ------------------------------------------------------------------------------------------ the app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (before reading it all). The
    refusal closes the connection, so the server stops receiving the rest instead of draining it."""
    close = {"Connection": "close"}
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, "body_too_large", f"request body is {int(declared)} bytes; the limit is {limit}",
                               close)
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes", close)
        chunks.append(chunk)
    return b"".join(chunks)


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def parse_texts(body: bytes, settings: ServerSettings) -> tuple[list[str], list[bool]]:
    """Validate a /v1/classify body; returns the texts (cut at max_chars in truncate mode) and which were cut."""
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        payload = json.loads(decoded)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"request body is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request", f'body must be an object {{"texts": [...]}}, got {_type_name(payload)}')
    if "texts" not in payload:
        raise ApiError(422, "invalid_request", 'body has no "texts" field')
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise ApiError(422, "invalid_request", f'"texts" must be an array of strings, got {_type_name(texts)}')
    if not texts:
        raise ApiError(422, "empty_texts", '"texts" is empty: send at least one text')
    if len(texts) > settings.max_texts:
        raise ApiError(413, "too_many_texts",
                       f'"texts" has {len(texts)} items; the limit is {settings.max_texts} per request')
    cut = [False] * len(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ApiError(422, "invalid_request", f"texts[{i}] must be a string, got {_type_name(t)}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            # JSON allows "\ud800"; an unpaired surrogate is not a character and the tokenizer cannot take it.
            raise ApiError(400, "invalid_unicode", f"texts[{i}] contains an unpaired surrogate escape") from None
        if len(t) > settings.max_chars:
            if settings.too_long == "reject":
                raise ApiError(413, "text_too_long",
                               f"texts[{i}] has {len(t)} characters; the limit is {settings.max_chars}")
            texts[i], cut[i] = t[: settings.max_chars], True
    return texts, cut


def create_app(settings: ServerSettings, predict: Callable[[list[str]], list[dict]], model_info: dict) -> FastAPI:
    """The ASGI app. `predict(texts) -> list[dict]` (e.g. `Classifier.classify`) runs on one worker thread."""
    metrics = Metrics()
    batcher = Batcher(predict, settings.max_batch, settings.max_wait_ms / 1000.0, settings.max_queue, metrics)
    info = ModelInfo(**model_info).model_dump()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="spamlingo",
        version=API_VERSION,
        summary="Multilingual (zh/ja/ko/en) spam classification",
        description=__doc__.split("\n\n", 1)[1].split("\n\nThis module")[0],
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics, app.state.batcher = settings, metrics, batcher

    # -------------------------------------------------------------------------- auth
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def require_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = creds.credentials if creds else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`",
                           {"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_key)] if settings.api_key else []
    auth_errors = (401,) if settings.api_key else ()

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
    request_model = _request_model(settings)

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=_errors(400, *auth_errors, 413, 422, 500, 503),
        dependencies=guarded,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ClassifyRequest"}}}}},
        summary="Classify texts as spam or ham",
        operation_id="classify",
    )
    async def classify(request: Request) -> Response:
        # The body is parsed here rather than by FastAPI so that size limits apply before reading it all and
        # every refusal has the {"error": {...}} shape.
        texts, cut = parse_texts(await _read_body(request, settings.max_body_bytes), settings)
        try:
            results = await batcher.submit(texts)
        except Overloaded:
            raise ApiError(503, "overloaded", f"the queue is full ({batcher.queued} texts waiting); retry later",
                           {"Retry-After": str(batcher.retry_after())}) from None
        out = []
        for r, was_cut in zip(results, cut):
            metrics.texts.labels(r["label"]).inc()
            out.append({"label": r["label"], "spam_probability": float(r["spam_probability"]),
                        "threshold": float(r["threshold"]), "threshold_scope": r.get("threshold_scope", "global"),
                        "lang": r["lang"], "truncated": bool(r["truncated"]) or was_cut})
        return JSONResponse({"results": out, "model": info})

    @app.get("/healthz", response_model=Health, summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, summary="Bundle loaded and warm-up inference done",
             responses={503: {"model": Readiness, "description": "still starting"}})
    async def readyz():
        if batcher.ready:
            return {"status": "ready", "model": info}
        return JSONResponse({"status": "starting", "model": None}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=guarded, response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}, **_errors(*auth_errors)})
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi():
        # ClassifyRequest is validated by parse_texts, not FastAPI, so add its schema to the components.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 description=app.description, routes=app.routes)
            comp = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {})["ClassifyRequest"] = comp
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    paths = {"/v1/classify", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}
    app.add_middleware(MetricsMiddleware, metrics=metrics, paths=paths)
    return app


# ------------------------------------------------------------------------------------------ start-up


class StartupError(Exception):
    """A problem that stops the server before it listens: printed as one line."""


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
    info = {"bundle": bundle.name, "variant": variant,
            "sha256": bundle.manifest["files"][model_file]["sha256"][:16], "threshold": float(bundle.threshold),
            "threshold_by_lang": dict(bundle.thresholds.get("by_lang") or {}),
            "created_at": bundle.created_at or None, "mlflow_run_id": bundle.source.get("mlflow_run_id")}
    return classifier, info


_FLAGS: dict[str, tuple[type, str, str]] = {
    "bundle": (str, "DIR", "bundle directory (default: the newest under bundles/)"),
    "host": (str, "HOST", "address to bind"),
    "port": (int, "N", "port to bind"),
    "threads": (int, "N", "ONNX Runtime intra-op threads (0 = its default: all cores)"),
    "model": (str, "fp32|int8", "graph to serve (default: int8 when the bundle has a passed int8 model)"),
    "max_batch": (int, "N", "texts per ONNX Runtime call"),
    "max_wait_ms": (float, "MS", "how long the oldest waiting text may wait for its batch to fill"),
    "max_texts": (int, "N", "texts per request (more: 413 too_many_texts)"),
    "max_chars": (int, "N", "characters per text"),
    "too_long": (str, "reject|truncate", "a text over --max-chars: 413 text_too_long, or cut and served"),
    "max_queue": (int, "N", "texts waiting for the model (beside the batch running); beyond: 503 + Retry-After"),
    "max_body_bytes": (int, "N", "request body limit (more: 413 body_too_large)"),
    "api_key": (str, "KEY", "require `Authorization: Bearer KEY` on /v1/classify and /metrics"),
    "log_level": (str, "LEVEL", "critical|error|warning|info|debug (debug adds the access log)|trace"),
}


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    """Flags, each falling back to SPAMLINGO_<NAME> and then to the ServerSettings default."""
    defaults = ServerSettings()
    p = argparse.ArgumentParser(prog="spamlingo-serve", description="Serve a spamlingo ONNX bundle over HTTP.")
    for name, (tp, metavar, help_) in _FLAGS.items():
        env = f"SPAMLINGO_{name.upper()}"
        default = getattr(defaults, name)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = tp(raw)
            except ValueError:
                raise StartupError(f"{env}={raw!r} is not a valid {tp.__name__}") from None
        shown = "***" if name == "api_key" and default else default
        p.add_argument(f"--{name.replace('_', '-')}", type=tp, default=default, metavar=metavar,
                       help=f"{help_} [env {env}; default {shown!r}]")
    settings = ServerSettings(**vars(p.parse_args(argv)))
    try:
        settings.check()
    except ValueError as e:
        raise StartupError(str(e)) from None
    return settings


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
    try:
        settings = parse_settings(argv)
        _check_port(settings.host, settings.port)
        classifier, info = load_model(settings)
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))  # uvicorn's look
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if settings.log_level == "trace" else settings.log_level.upper())
    app = create_app(settings, classifier.classify, info)
    shown = {k: ("***" if k == "api_key" and v else v) for k, v in asdict(settings).items()}
    print(f"spamlingo-serve: {info['bundle']} ({info['variant']}) on http://{settings.host}:{settings.port} "
          f"{json.dumps(shown)}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.log_level in ("debug", "trace"))


if __name__ == "__main__":
    main()
