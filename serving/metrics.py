"""The server's Prometheus metrics (GET /metrics) and the ASGI middleware that counts and times each response."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
