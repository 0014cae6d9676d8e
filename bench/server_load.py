"""Figure speed_server: the HTTP server (spamlingo-serve, a subprocess on 127.0.0.1) vs raw ONNX Runtime.

- Throughput at concurrency 32: one text per request, 32 requests in flight, so the server's micro-batcher
  gathers batches of up to 32; raw ONNX Runtime classifies the same texts in the same order in batches of
  32 through serving.inference.Classifier (tokenisation included on both sides), same variant, same threads.
- Latency p50/p99 at concurrency 1, 8 and 32: a bounded number of one-text requests each.
The load generator (asyncio + aiohttp) runs on the same machine and takes CPU from the server: the ratio is
what a single host would see, not the server's ceiling.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.inputs import BenchError, Inputs, load_split, rel, sample_rows
from bench.timing import percentiles
from serving.client import ClientError, wait_ready

TITLE = "HTTP server vs raw ONNX Runtime"
NEEDS = ("bundle", "data")
CONCURRENCY = (1, 8, 32)
BATCH = 32


def _settings(quick: bool) -> dict:
    if quick:
        return {"requests": {1: 12, 8: 24, 32: 64}, "warmup_requests": 8, "concurrency": [1, 8, 32]}
    return {"requests": {1: 200, 8: 400, 32: 960}, "warmup_requests": 64, "concurrency": list(CONCURRENCY)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """spamlingo-serve in a subprocess; waits for /readyz, stops it on exit."""

    def __init__(self, bundle: Path, threads: int, variant: str, max_batch: int = BATCH, timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "serving.server", "--bundle", str(bundle), "--host", "127.0.0.1",
                    "--port", str(self.port), "--threads", str(threads), "--model", variant,
                    "--max-batch", str(max_batch), "--max-texts", str(max_batch), "--log-level", "warning",
                    # A long test e-mail is cut as the encoder would cut it anyway, not refused (413).
                    "--too-long", "truncate"]
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"spamlingo-bench-server-{self.port}.log"

    def __enter__(self) -> "Server":
        self._log = open(self.log, "w+b")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.url, self.timeout, alive=lambda: self.proc.poll() is None)
        except ClientError as e:
            self._log.seek(0)
            tail = " | ".join(self._log.read().decode("utf-8", "replace").strip().splitlines()[-3:])
            self.__exit__(None, None, None)
            raise BenchError(f"spamlingo-serve: {e}: {tail}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.log.unlink(missing_ok=True)


async def _load(url: str, texts: list[str], concurrency: int, n: int) -> dict:
    """`n` one-text requests with `concurrency` in flight; latency of each and the wall time.

    The load generator shares the cores with the server, so it must be cheap: aiohttp costs a fraction of
    httpx's CPU per request (measured here: server/raw 0.83-0.88 with httpx, 0.95 with aiohttp)."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_i = 0

    async def worker(session):
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/classify", json={"texts": [texts[i % len(texts)]]}) as r:
                body = await r.json() if r.status == 200 else None
            dt = time.perf_counter() - t0
            if body is not None and len(body["results"]) == 1:
                latencies.append(dt)
            else:
                errors[str(r.status)] = errors.get(str(r.status), 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": n, "ok": len(latencies), "errors": errors, "wall_s": wall,
            "texts_per_s": len(latencies) / wall, **percentiles(latencies or [float("nan")])}


def _raw(clf, texts: list[str]) -> dict:
    t0 = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        clf.classify(texts[i:i + BATCH])
    wall = time.perf_counter() - t0
    return {"texts": len(texts), "wall_s": wall, "texts_per_s": len(texts) / wall}


def log_to_run(inputs: Inputs, metrics: dict) -> str | None:
    """Put the serving latency beside the run's quality metrics (`make compare` shows serve/* columns).
    Returns the run id, or None when the bundle's run is not in this MLflow store."""
    run_id = inputs.run_id
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    from training import tracking

    try:
        with tracking.resume_run(run_id, inputs.cfg):
            mlflow.log_metrics(metrics)
    except MlflowException:
        return None
    return run_id


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0) -> dict:
    from serving.bundle import load_bundle
    from serving.inference import Classifier

    settings = _settings(quick) | {"threads": threads, "seed": seed, "batch": BATCH}
    bundle = load_bundle(inputs.bundle_dir)
    variant = "int8" if bundle.has("int8") and bundle.int8.get("status", "passed") == "passed" else "fp32"
    n_max = max(settings["requests"].values())
    texts = [r["text"] for r in sample_rows(load_split(inputs, "test"), n_max, seed)]
    n_tp = min(settings["requests"][32], len(texts))
    clf = Classifier(bundle, variant=variant, threads=threads, batch_size=BATCH)
    _raw(clf, texts[:BATCH])  # warm-up

    latency = {}
    with Server(inputs.bundle_dir, threads, variant) as server:
        asyncio.run(_load(server.url, texts, 8, settings["warmup_requests"]))
        raw_before = _raw(clf, texts[:n_tp])  # the server is idle meanwhile
        served = asyncio.run(_load(server.url, texts[:n_tp], 32, n_tp))
        raw_after = _raw(clf, texts[:n_tp])
        for c in settings["concurrency"]:
            # Concurrency 32 was just measured on the same texts: reuse it rather than load the machine twice.
            latency[str(c)] = served if c == 32 else asyncio.run(_load(server.url, texts, c, settings["requests"][c]))
        args = [rel(a) if a == str(inputs.bundle_dir) else a for a in server.cmd[3:]]
    raw_tps = (raw_before["texts_per_s"] + raw_after["texts_per_s"]) / 2
    serve_metrics = {"serve/p50_ms": latency["1"]["p50_ms"], "serve/p99_ms": latency["1"]["p99_ms"],
                     "serve/c32_texts_per_s": served["texts_per_s"]}
    logged = None if quick else log_to_run(inputs, serve_metrics)
    return {"settings": settings, "logged_to_run": logged, "variant": variant,
            "server_command": "spamlingo-serve " + " ".join(args),
            "throughput": {"texts": n_tp, "server_texts_per_s": served["texts_per_s"], "raw_texts_per_s": raw_tps,
                           "raw_runs": [raw_before, raw_after], "server_over_raw": served["texts_per_s"] / raw_tps,
                           "errors": served["errors"]},
            "latency": latency, "mean_chars": sum(map(len, texts)) / len(texts)}


def render(result: dict) -> str:
    s, tp = result["settings"], result["throughput"]
    lines = [f"Bundle variant {result['variant']}, {s['threads']} ONNX Runtime threads on both sides, batches of "
             f"{s['batch']}; one text per request, texts sampled from the test split (mean {result['mean_chars']:.0f} "
             f"characters, seed {s['seed']}). Server started as `{result['server_command']}`; the load generator "
             "(asyncio + aiohttp) shares the machine with it.", "",
             f"**Throughput at concurrency 32** ({tp['texts']} texts): server {tp['server_texts_per_s']:.1f} texts/s, "
             f"raw ONNX Runtime {tp['raw_texts_per_s']:.1f} texts/s → server/raw = "
             f"**{tp['server_over_raw']:.2f}**.", "",
             "| concurrency | requests | ok | p50 ms | p99 ms | mean ms | texts/s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c, r in result["latency"].items():
        lines.append(f"| {c} | {r['requests']} | {r['ok']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['mean_ms']:.1f} | {r['texts_per_s']:.1f} |")
    if result.get("logged_to_run"):
        lines += ["", f"Logged to MLflow run {result['logged_to_run']} as serve/p50_ms and serve/p99_ms "
                  "(concurrency 1) "
                  "and serve/c32_texts_per_s."]
    errs = {c: r["errors"] for c, r in result["latency"].items() if r["errors"]}
    if errs:
        lines += ["", f"Non-200 responses: {errs}"]
    return "\n".join(lines)
