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

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import explain as X
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
    read_timeout: float = 15.0  # seconds for a request's headers, and again for its body, to arrive
    api_key: str = ""
    feedback_key: str = ""  # opens POST /v1/feedback and nothing else
    admin_key: str = ""  # opens POST /admin/reload and nothing else ("" = reload over HTTP disabled)
    feedback_db: str = ""  # SQLAlchemy URL ("" = sqlite:///<repo>/feedback/feedback.db; "none" = no feedback)
    explain_max_texts: int = 16  # texts per request with "explain": true (more: 413 too_many_texts)
    explain_max_rows: int = X.MAX_ROWS  # extra model rows per explained text (more units: merged spans)
    log_level: str = "info"

    def check(self) -> None:
        """Raise ValueError naming the flag on an impossible value."""
        for name in ("max_batch", "max_texts", "max_chars", "max_queue", "max_body_bytes", "explain_max_texts",
                     "explain_max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.read_timeout > 0:
            raise ValueError(f"--read-timeout must be more than 0 seconds, got {self.read_timeout}")
        keys = [(n, getattr(self, n)) for n in ("api_key", "feedback_key", "admin_key") if getattr(self, n)]
        for i, (a, ka) in enumerate(keys):
            for b, kb in keys[i + 1:]:
                if ka == kb:  # one key would open what the other is meant to keep closed
                    raise ValueError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} must differ")
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


class Span(BaseModel):
    start: int = Field(ge=0, description="offset of the span in the text as sent (Python str index: Unicode "
                                         "code points, not UTF-16 units)")
    end: int = Field(ge=0, description="offset just past the span")
    text: str = Field(description="text[start:end] of the text as sent")
    effect: float = Field(ge=-1.0, le=1.0, description="> 0: the span raised the spam probability. decomposition: "
                                                       "p(spam) - sigmoid(logit - the span's tokens' share of it); "
                                                       "occlusion: p(spam | text) - p(spam | text without the span)")


class Explanation(BaseModel):
    spans: list[Span] = Field(description="up to 5 spans that raised and 5 that lowered p(spam) most, by |effect| "
                                          "descending (words / 2-character CJK chunks)")
    method: Literal["decomposition", "occlusion"] = Field(
        description="decomposition: the mean-pooled logit split over the tokens of the same pass (bundles with "
                    "token_scores); occlusion: each span removed in turn (at most --explain-max-rows per text)")


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
    explanation: Explanation | None = Field(default=None, description='only with "explain": true')


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


class FeedbackAck(BaseModel):
    id: int = Field(description="the report's id in the feedback store")
    duplicate: bool = Field(description="true when this report (same normalised text, label and reporter) was "
                                        "already stored: id is then the first report's id (status 200, not 201)")


class Disagreement(BaseModel):
    total: int
    reported_spam_model_ham: int = Field(description="label spam, probability below the threshold that applied")
    reported_ham_model_spam: int = Field(description="label ham, probability at or above the threshold")


class FeedbackStats(BaseModel):
    total: int
    by_label: dict[str, int]
    by_lang: dict[str, int]
    by_day: dict[str, int] = Field(description="reports per UTC day (YYYY-MM-DD)")
    by_bundle: dict[str, int] = Field(description="reports per served model (first 16 hex digits of its sha256)")
    reporters: int = Field(description="distinct reporters (reports without one count as one)")
    disagree: Disagreement = Field(description="reports whose label is not the model's verdict at report time")
    first: str | None = None
    last: str | None = None


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
        explain=(bool, Field(default=False, description="add each result's `explanation` (at most "
                                                        f"{settings.explain_max_texts} texts; more: 413)")),
    )


def _feedback_model(settings: ServerSettings) -> type[BaseModel]:
    from serving.feedback import MAX_REPORTER_CHARS

    text = Annotated[str, StringConstraints(min_length=1, max_length=settings.max_chars, pattern=r"\S")]
    example = {"text": "恭喜您中奖了，请点击链接领取", "label": "spam", "reporter": "user-42", "note": "phishing"}
    return create_model(
        "FeedbackRequest",
        __config__=ConfigDict(json_schema_extra={"examples": [example]}),
        text=(text, Field(description="the message as the user received it (at most --max-chars characters; "
                                      "not only whitespace)")),
        label=(Literal["spam", "ham"], Field(description="what the reporter says the message is")),
        reporter=(Annotated[str, StringConstraints(max_length=MAX_REPORTER_CHARS)] | None,
                  Field(default=None, description="who reports (one report per text, label and reporter)")),
        note=(Annotated[str, StringConstraints(max_length=settings.max_chars)] | None,
              Field(default=None, description="free text, stored with the report")),
    )


def _errors(*codes: int, feedback: bool = False) -> dict[int | str, dict[str, Any]]:
    text = {400: "invalid_json, invalid_utf8, invalid_unicode (an unpaired surrogate escape)",
            401: "unauthorized: missing or wrong `Authorization: Bearer <key>`",
            408: "request_timeout: the body did not arrive within --read-timeout seconds",
            413: "body_too_large (--max-body-bytes), too_many_texts (--max-texts; --explain-max-texts with "
                 '"explain": true), text_too_long (--max-chars)',
            422: "invalid_request (wrong shape or types), empty_texts",
            500: "inference_error", 503: "overloaded: the queue is full; retry after Retry-After seconds"}
    if feedback:
        text |= {413: "body_too_large (--max-body-bytes), text_too_long (text or note over --max-chars, reporter "
                      "over 256 characters)",
                 422: "invalid_request (wrong shape, types or label), empty_text",
                 500: "inference_error, internal",
                 503: "overloaded (retry after Retry-After seconds), feedback_disabled (--feedback-db none), "
                      "store_unavailable (the database refused the write)"}
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
        self.reloads = Counter("spamlingo_reloads", "bundle reloads by result (success|failure) and trigger "
                               "(http|sighup)", ["result", "trigger"], registry=r)
        self.bundle = Gauge("spamlingo_bundle_info", "the served bundle: 1 for the current bundle, variant and "
                            "sha256 (first 16 hex digits of the served graph's)", ["bundle", "variant", "sha256"],
                            registry=r)
        self.feedback = Counter("spamlingo_feedback_reports", "feedback reports by label and result "
                                "(stored|duplicate)", ["label", "result"], registry=r)
        self.feedback_commit = Histogram("spamlingo_feedback_commit_reports", "feedback reports per commit",
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)

    def set_bundle(self, info: dict, previous: dict | None = None) -> None:
        if previous is not None:
            try:
                self.bundle.remove(previous["bundle"], previous["variant"], previous["sha256"])
            except KeyError:
                pass
        self.bundle.labels(info["bundle"], info["variant"], info["sha256"]).set(1)


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


@dataclass(frozen=True)
class ServedModel:
    """What the batcher runs: `predict(texts) -> list[dict]`, the ModelInfo that responses carry, and the
    full sha256 of the served graph (`info["sha256"]` is its first 16 hex digits)."""

    predict: Callable[[list[str]], list[dict]]
    info: dict
    sha256: str
    score: Callable[[list[str]], Any] | None = None  # p(spam) of texts in one call (serving/explain.py)
    # explain(texts, max_rows) -> [explanation] on the worker thread, and its method (serving/explain.py)
    explain: Callable[[Sequence[str], int], list[dict]] | None = None
    explain_method: str = "occlusion"


class _Pending:
    __slots__ = ("texts", "future", "results", "sent", "done", "arrival", "cancelled", "model")

    def __init__(self, texts: Sequence[str], future: asyncio.Future, arrival: float):
        self.texts, self.future, self.arrival = texts, future, arrival
        self.results: list[Any] = [None] * len(texts)
        self.sent = 0  # texts handed to the model so far
        self.done = 0  # texts with results
        self.cancelled = False
        self.model: ServedModel | None = None  # the model its texts ran on (one model per request)


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

    `swap(model)` replaces the model between two batches (hot reload): a batch already running finishes on
    the old model, a request split over several batches finishes on the model it started on, and every
    text still queued runs on the new one. Each request learns which model served it (`submit` returns it).
    """

    def __init__(self, model: ServedModel, max_batch: int, max_wait_s: float, max_queue: int, metrics: Metrics,
                 warmup: Sequence[str] = WARMUP_TEXTS):
        self.model, self.max_batch, self.max_wait_s, self.max_queue = model, max_batch, max_wait_s, max_queue
        self.metrics, self.warmup_texts = metrics, list(warmup)
        self.ready = False
        self._staged: tuple[ServedModel, asyncio.Future] | None = None  # a swap waiting for a batch boundary
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
        if self._staged and not self._staged[1].done():
            self._staged[1].set_exception(ApiError(503, "shutting_down", "the server is shutting down"))
        if self._executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, fn: Callable, *args) -> Any:
        """fn(*args) on the model's worker thread, between two batches (explanations run there)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def retry_after(self) -> int:
        batches = math.ceil((self.queued + 1) / self.max_batch)
        return max(1, math.ceil(batches * self._batch_seconds))

    async def submit(self, texts: Sequence[str]) -> tuple[list[dict], ServedModel]:
        """(one result per text in order, the model that produced them)."""
        n = len(texts)
        if self.queued and self.queued + n > self.max_queue:
            raise Overloaded()
        req = _Pending(texts, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending.append(req)
        self._set_queued(self.queued + n)
        self._wakeup.set()
        try:
            return await req.future, req.model
        except asyncio.CancelledError:
            req.cancelled = True
            raise

    async def swap(self, model: ServedModel) -> ServedModel:
        """Serve `model` from the next batch boundary on; returns the model it replaced."""
        if self._staged is not None:
            raise RuntimeError("a swap is already waiting")  # the server serialises reloads
        fut = asyncio.get_running_loop().create_future()
        self._staged = (model, fut)
        self._wakeup.set()
        return await fut

    def _head_started(self) -> bool:
        """The request at the head of the queue has texts in a batch already (it was split)."""
        if not self._pending:
            return False
        head = self._pending[0]
        return head.sent > 0 and not (head.cancelled or head.future.done())

    def _apply_swap(self) -> None:
        model, fut = self._staged
        self._staged = None
        old, self.model = self.model, model
        if not fut.done():
            fut.set_result(old)

    def _set_queued(self, n: int) -> None:
        self.queued = n
        self.metrics.queue_depth.set(n)

    def _take(self, finish_only: bool = False) -> list[tuple[_Pending, int, int]]:
        """Up to max_batch texts from the head of the queue, as (request, start, end) slices. finish_only:
        only the rest of a request already started (a swap is waiting for it to finish)."""
        out, room = [], self.max_batch
        while self._pending and room:
            req = self._pending[0]
            if req.cancelled or req.future.done():
                self._pending.popleft()
                self._set_queued(self.queued - (len(req.texts) - req.sent))
                continue
            if finish_only and req.sent == 0:
                break
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
            await loop.run_in_executor(self._executor, self.model.predict, self.warmup_texts)
            self.ready = True
            log.info("warm-up inference done; ready")
        except Exception:  # noqa: BLE001 - stays not ready (503 on /readyz); requests still get tried
            log.exception("warm-up inference failed")
        while True:
            if self._staged is not None and not self._head_started():
                self._apply_swap()  # between batches: the previous one has finished on the old model
            if not self._pending:
                self._wakeup.clear()
                if self._staged is not None:
                    continue
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
            slices = self._take(finish_only=self._staged is not None)
            if slices:
                await self._run_batch(loop, slices, self.model)

    async def _run_batch(self, loop, slices: list[tuple[_Pending, int, int]], model: ServedModel) -> None:
        texts = [t for req, a, b in slices for t in req.texts[a:b]]
        start = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, model.predict, texts)
            if len(out) != len(texts):
                raise RuntimeError(f"the model returned {len(out)} results for {len(texts)} texts")
        except Exception as e:  # noqa: BLE001 - the requests of this batch hear about it
            log.exception("inference failed on a batch of %d texts", len(texts))
            if len(slices) > 1:
                # One request's text must not fail the others it was batched with: retry them one by one.
                for piece in slices:
                    await self._run_batch(loop, [piece], model)
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
            req.model = model
            i += b - a
            req.done += b - a
            if req.done == len(req.texts) and not req.future.done():
                req.future.set_result(req.results)


# ------------------------------------------------------------------------------------------ the app


async def _read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (before reading it all), and with
    408 when it has not all arrived within `timeout` seconds (a client that sends its body slowly or never:
    slowloris). Both refusals close the connection, so the server stops receiving the rest."""
    if timeout is None:
        return await _read_body_unbounded(request, limit)
    try:
        async with asyncio.timeout(timeout):
            return await _read_body_unbounded(request, limit)
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"the request body did not arrive within {timeout:g} s",
                       {"Connection": "close"}) from None


async def _read_body_unbounded(request: Request, limit: int) -> bytes:
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


def parse_json(body: bytes) -> Any:
    """A request body as JSON, or the 400 that says why not (every endpoint that takes JSON uses this)."""
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(decoded)
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"request body is not JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from None
    except ValueError:  # Python's int-string limit: an integer literal of thousands of digits
        raise ApiError(400, "invalid_json", "request body has an integer with more than "
                       f"{sys.get_int_max_str_digits()} digits") from None


def _check_unicode(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows "\ud800"; an unpaired surrogate is not a character and the tokenizer cannot take it.
        raise ApiError(400, "invalid_unicode", f"{where} contains an unpaired surrogate escape") from None


def parse_texts(body: bytes, settings: ServerSettings) -> tuple[list[str], list[bool], bool]:
    """Validate a /v1/classify body; returns the texts (cut at max_chars in truncate mode), which were cut,
    and whether explanations were asked for."""
    payload = parse_json(body)
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
    explain = payload.get("explain", False)
    if not isinstance(explain, bool):
        raise ApiError(422, "invalid_request", f'"explain" must be true or false, got {_type_name(explain)}')
    if explain and len(texts) > settings.explain_max_texts:
        raise ApiError(413, "too_many_texts", f'"texts" has {len(texts)} items; the limit with "explain": true '
                       f'is {settings.explain_max_texts} per request')
    cut = [False] * len(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ApiError(422, "invalid_request", f"texts[{i}] must be a string, got {_type_name(t)}")
        _check_unicode(t, f"texts[{i}]")
        if len(t) > settings.max_chars:
            if settings.too_long == "reject":
                raise ApiError(413, "text_too_long",
                               f"texts[{i}] has {len(t)} characters; the limit is {settings.max_chars}")
            texts[i], cut[i] = t[: settings.max_chars], True
    return texts, cut, explain


def parse_feedback(body: bytes, settings: ServerSettings) -> dict:
    """Validate a /v1/feedback body: {"text", "label", "reporter"?, "note"?} -> those four ('' for absent).
    The text is never cut (--too-long truncate or not): the store keeps what the user received."""
    from serving.feedback import LABELS, MAX_REPORTER_CHARS

    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request",
                       f'body must be an object {{"text": ..., "label": "spam"|"ham"}}, got {_type_name(payload)}')
    out = {}
    for name, required, limit in (("text", True, settings.max_chars), ("label", True, None),
                                  ("reporter", False, MAX_REPORTER_CHARS), ("note", False, settings.max_chars)):
        value = payload.get(name)
        if value is None:
            if required:
                raise ApiError(422, "invalid_request", f'body has no "{name}" field' if name not in payload
                               else f'"{name}" must be a string, got null')
            value = ""
        if not isinstance(value, str):
            raise ApiError(422, "invalid_request", f'"{name}" must be a string, got {_type_name(value)}')
        _check_unicode(value, f'"{name}"')
        if limit is not None and len(value) > limit:
            raise ApiError(413, "text_too_long", f'"{name}" has {len(value)} characters; the limit is {limit}')
        out[name] = value
    if out["label"] not in LABELS:
        raise ApiError(422, "invalid_request", f'"label" must be "spam" or "ham", got {out["label"][:40]!r}')
    if not out["text"] or out["text"].isspace():
        raise ApiError(422, "empty_text", '"text" is empty: send the message being reported')
    return out


def parse_reload(body: bytes) -> str | None:
    """Validate a /admin/reload body: empty, or {"bundle": "<dir>"}. Returns the directory or None."""
    if not body.strip():
        return None
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request", f'body must be an object {{"bundle": "<dir>"}}, got {_type_name(payload)}')
    unknown = sorted(set(payload) - {"bundle"})
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field(s) {', '.join(map(repr, unknown))} (expected 'bundle')")
    bundle = payload.get("bundle")
    if bundle is None:
        return None
    if not isinstance(bundle, str) or not bundle.strip():
        raise ApiError(422, "invalid_request", f'"bundle" must be a directory path, got {_type_name(bundle)}')
    _check_unicode(bundle, '"bundle"')
    return bundle


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
    request_model = _request_model(settings)

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=_errors(400, *auth_errors, 408, 413, 422, 500, 503),
        dependencies=guarded,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ClassifyRequest"}}}}},
        summary="Classify texts as spam or ham",
        operation_id="classify",
    )
    async def classify(request: Request) -> Response:
        # The body is parsed here rather than by FastAPI so that size limits apply before reading it all and
        # every refusal has the {"error": {...}} shape.
        texts, cut, explain = parse_texts(await _read_body(request, settings.max_body_bytes, settings.read_timeout),
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

    feedback_model = _feedback_model(settings)

    @app.post(
        "/v1/feedback",
        status_code=201,
        response_model=FeedbackAck,
        responses={200: {"model": FeedbackAck, "description": "a duplicate: this report was stored before (its id)"},
                   **_errors(400, *feedback_auth_errors, 408, 413, 422, 500, 503, feedback=True)},
        dependencies=feedback_guard,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/FeedbackRequest"}}}}},
        summary="Report a message as spam or ham (stored for retraining)",
        operation_id="feedback",
    )
    async def feedback(request: Request) -> Response:
        report = parse_feedback(await _read_body(request, settings.max_body_bytes, settings.read_timeout), settings)
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
             responses=_errors(*auth_errors, 503, feedback=True), operation_id="feedback_stats",
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
        bundle = parse_reload(await _read_body(request, settings.max_body_bytes, settings.read_timeout))
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
                              "description": "Prometheus text format"}, **_errors(*auth_errors)})
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
    mismatch = bundle.text.normalizer_mismatch()
    if mismatch:
        log.warning("bundle %s: %s", bundle.name, mismatch)
    sha256 = bundle.manifest["files"][model_file]["sha256"]
    info = {"bundle": bundle.name, "variant": variant, "sha256": sha256[:16], "bundle_sha256": sha256,
            "threshold": float(bundle.threshold),
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
    "read_timeout": (float, "S", "seconds for a request's headers, and then its body, to arrive (more: 408)"),
    "api_key": (str, "KEY", "require `Authorization: Bearer KEY` on /v1/classify, /v1/feedback, "
                            "/v1/feedback/stats and /metrics"),
    "feedback_key": (str, "KEY", "a second key that opens POST /v1/feedback and nothing else (for reporters)"),
    "admin_key": (str, "KEY", "enable POST /admin/reload behind `Authorization: Bearer KEY` (SIGHUP reloads "
                              "either way)"),
    "feedback_db": (str, "URL", "SQLAlchemy URL of the feedback store ('' = sqlite:///<repo>/feedback/feedback.db, "
                                "WAL; 'none' = no feedback endpoints)"),
    "explain_max_texts": (int, "N", 'texts per request with "explain": true (more: 413 too_many_texts)'),
    "explain_max_rows": (int, "N", "extra model rows per explained text: one per removed span (more words: "
                                   "adjacent ones merged)"),
    "log_level": (str, "LEVEL", "critical|error|warning|info|debug (debug adds the access log)|trace"),
}


SECRETS = ("api_key", "feedback_key", "admin_key")


def _shown(name: str, value: Any) -> Any:
    """A setting as logs and --help show it: keys hidden, a database URL without its password."""
    if name in SECRETS and value:
        return "***"
    if name == "feedback_db" and value and value != "none":
        from serving.feedback import redact

        return redact(value)
    return value


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
        shown = _shown(name, default)
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
    shown = {k: _shown(k, v) for k, v in asdict(settings).items()}
    print(f"spamlingo-serve: {info['bundle']} ({info['variant']}) on http://{settings.host}:{settings.port} "
          f"{json.dumps(shown)}", file=sys.stderr, flush=True)
    protocol = _protocol_with_header_timeout(settings.read_timeout,
                                             lambda: app.state.metrics.errors.labels("request_timeout").inc())
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.log_level in ("debug", "trace"), http=protocol or "auto")


if __name__ == "__main__":
    main()
