"""Dynamic batching: texts of concurrent requests gathered into ONNX Runtime calls on one worker thread, with a
bounded queue and hot swaps of the model between two batches (serving/server.py)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from serving.metrics import Metrics
from serving.schemas import ApiError

log = logging.getLogger("spamlingo.server")


WARMUP_TEXTS = ["Free entry: text WIN to claim your prize", "恭喜您中奖了，请点击链接领取", "今すぐ登録してください",
                "무료 쿠폰을 받으세요", "see you at lunch?"]


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
    the attention inputs per batch tensor, padding included) a text's probability moves with its batch-mates:
    mostly by < 1e-6, but by up to about 0.1 for a few texts, which can change a label near the threshold
    (`make bench`'s quality figure measures it: README "Serving").

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
