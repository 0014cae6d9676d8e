"""The feedback store: users' spam/ham reports, for retraining (docs/DESIGN.md §7).

    store = FeedbackStore()                      # sqlite:///<repo>/feedback/feedback.db (WAL, synchronous=FULL)
    store = FeedbackStore("postgresql+psycopg://user:pw@db/spamlingo")   # several replicas, one database
    report_id, duplicate = store.add(text, "spam", reporter="alice", note="", probability=0.31,
                                     bundle_sha256="ab12…", lang="zh", threshold=0.5)
    store.rows(since=None)   # every report, oldest first, as dicts (the retraining side reads this)
    store.stats()            # counts by label, language and day, and disagreements with the model

    python -m serving.feedback stats [--db URL] [--json]     # make feedback
    python -m serving.feedback rows [--db URL] [--since ID|ISO-DATE]   # JSON lines

One table, `feedback_reports` (the schema below is a contract: `rows()` returns exactly its columns). A
report is identified by (sha256 of the normalised text, label, reporter): the UNIQUE constraint on those
decides duplicates inside the database, so concurrent writers (threads, processes, replicas) never store
one report twice. SQLAlchemy Core only (`sqlalchemy>=2`, in the `serve` extra); no torch or transformers.

`AsyncWriter` is what the server uses: reports that arrive while a transaction is being committed are
written together in the next one (group commit: one fsync for many reports), on a thread of its own so the
event loop never waits for the disk.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from sqlalchemy import (CheckConstraint, Column, Float, Integer, MetaData, String, Table, Text, UniqueConstraint,
                        and_, bindparam, create_engine, event, func, inspect, or_, select)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError

from serving.text import language_tag, normalize

log = logging.getLogger("spamlingo.feedback")

_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = _ROOT / "feedback" / "feedback.db"
DEFAULT_URL = f"sqlite:///{DEFAULT_PATH}"
ENV_URL = "SPAMLINGO_FEEDBACK_DB"
TABLE = "feedback_reports"
LABELS = ("spam", "ham")
MAX_REPORTER_CHARS = 256
KEY = ("text_hash", "label", "reporter")  # what makes two reports the same report
COLUMNS = ("id", "created_at", "text", "text_hash", "label", "reporter", "note", "model_probability",
           "model_threshold", "bundle_sha256", "lang")

metadata = MetaData()
reports = Table(
    TABLE, metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # UTC, ISO 8601 with microseconds and "+00:00": fixed width, so text order is time order
    Column("created_at", String(32), nullable=False, index=True),
    Column("text", Text, nullable=False),  # as received
    Column("text_hash", String(64), nullable=False),  # sha256 hex of normalize(text, mask_digits=True)
    Column("label", String(4), nullable=False),  # what the reporter says it is: 'spam' | 'ham'
    Column("reporter", String(MAX_REPORTER_CHARS), nullable=False, default=""),  # '' when absent
    Column("note", Text, nullable=False, default=""),  # '' when absent
    Column("model_probability", Float, nullable=True),  # the served model's spam probability at report time
    Column("model_threshold", Float, nullable=True),  # the threshold that applied to the text then
    Column("bundle_sha256", String(64), nullable=False, default=""),  # sha256 of the served ONNX graph
    Column("lang", String(8), nullable=False),  # serving.text.language_tag of the normalised text
    UniqueConstraint(*KEY, name="uq_feedback_reports_report"),
    CheckConstraint("label IN ('spam', 'ham')", name="ck_feedback_reports_label"),
    sqlite_autoincrement=True,  # ids are never reused, even after rows are deleted
)


class FeedbackError(RuntimeError):
    """A store that cannot be opened or read (bad URL, missing driver, no such file): one line."""


def text_hash(text: str) -> str:
    """The report identity's text part: sha256 hex of the normalised text (digits masked), so a resent
    message with other amounts, codes or invisible characters is the same report."""
    return hashlib.sha256(normalize(text, mask_digits=True).encode("utf-8")).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _as_timestamp(since: str | datetime) -> str:
    if isinstance(since, datetime):
        if since.tzinfo is None:
            since = since.replace(tzinfo=timezone.utc)
        return since.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return str(since)


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: show nothing of it
        return "<unparseable URL>"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    try:
        # WAL: readers (stats, the retraining job) never block the writer; FULL: every commit is fsynced
        # before it returns, so an acknowledged report survives a crash of the process or of the machine.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")  # another process writing: wait for it, up to 30 s
    finally:
        cur.close()


class FeedbackStore:
    """Reports in `feedback_reports` of any SQLAlchemy database (default: the embedded SQLite file)."""

    def __init__(self, url: str | None = None, create: bool = True):
        self.url = url or os.environ.get(ENV_URL) or DEFAULT_URL
        try:
            u = make_url(self.url)
        except Exception as e:  # noqa: BLE001 - sqlalchemy.exc.ArgumentError and friends
            raise FeedbackError(f"feedback database URL {redact(self.url)!r} is not a database URL: {e}") from None
        self.backend = u.get_backend_name()
        kwargs: dict[str, Any] = {}
        if self.backend == "sqlite":
            db = u.database or ""
            if db and db != ":memory:" and not db.startswith("file:"):
                path = Path(db)
                if not create and not path.is_file():
                    raise FeedbackError(f"no feedback store at {path} (the server creates it when it starts)")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise FeedbackError(f"cannot create {path.parent} for the feedback store: {e.strerror}") from None
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(u, **kwargs)
        except Exception as e:  # noqa: BLE001 - a missing driver (ModuleNotFoundError), a bad option
            raise FeedbackError(f"cannot open feedback database {redact(self.url)}: {type(e).__name__}: {e}") from None
        if self.backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        if self.backend == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as upsert
        elif self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:  # e.g. MySQL: a plain INSERT in a savepoint, the UNIQUE violation caught
            upsert = None
        # Built once, executed with each row's parameters (SQLAlchemy caches their compiled form).
        if upsert is not None:
            self._insert_stmt = (upsert(reports).on_conflict_do_nothing(index_elements=list(KEY))
                                 .returning(reports.c.id))
        else:
            self._insert_stmt = reports.insert()
        self._upsert = upsert is not None
        self._find_stmt = select(reports.c.id).where(*(reports.c[k] == bindparam(f"key_{k}") for k in KEY))
        try:
            if create:
                self._create()
            elif not inspect(self.engine).has_table(TABLE):
                raise FeedbackError(f"{redact(self.url)} has no {TABLE} table (the server creates it when it starts)")
        except FeedbackError:
            self.engine.dispose()
            raise
        except Exception as e:  # noqa: BLE001 - cannot connect, no permission, ...
            self.engine.dispose()
            raise FeedbackError(f"cannot open feedback database {redact(self.url)}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0]}") from None

    def _create(self) -> None:
        try:
            metadata.create_all(self.engine)
        except Exception:  # noqa: BLE001 - another replica created it at the same moment: look again
            if not inspect(self.engine).has_table(TABLE):
                raise

    # ------------------------------------------------------------------ writing

    @staticmethod
    def row(text: str, label: str, reporter: str | None = "", note: str | None = "",
            probability: float | None = None, bundle_sha256: str = "", lang: str | None = None,
            threshold: float | None = None) -> dict:
        """The row a report becomes (validated; created_at now)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if label not in LABELS:
            raise ValueError(f"label must be 'spam' or 'ham', got {label!r}")
        reporter = reporter or ""
        if len(reporter) > MAX_REPORTER_CHARS:
            raise ValueError(f"reporter has {len(reporter)} characters; the limit is {MAX_REPORTER_CHARS}")
        norm = normalize(text, mask_digits=True)
        return {"created_at": utc_now(), "text": text,
                "text_hash": hashlib.sha256(norm.encode("utf-8")).hexdigest(), "label": label,
                "reporter": reporter, "note": note or "",
                "model_probability": None if probability is None else float(probability),
                "model_threshold": None if threshold is None else float(threshold),
                "bundle_sha256": bundle_sha256 or "", "lang": lang or language_tag(norm)}

    def add(self, text: str, label: str, reporter: str | None = "", note: str | None = "",
            probability: float | None = None, bundle_sha256: str = "", lang: str | None = None,
            threshold: float | None = None) -> tuple[int, bool]:
        """Store one report, committed before it returns. Returns (id, duplicate): a report already stored
        (same normalised text, label and reporter) is not stored again, and its first id is returned."""
        return self.add_many([dict(text=text, label=label, reporter=reporter, note=note, probability=probability,
                                   bundle_sha256=bundle_sha256, lang=lang, threshold=threshold)])[0]

    def add_many(self, items: Sequence[dict]) -> list[tuple[int, bool]]:
        """`add` for several reports (keyword dicts of `add`'s arguments) in one transaction, in order."""
        rows = [self.row(**item) for item in items]
        with self.engine.begin() as conn:
            return [self._insert(conn, r) for r in rows]

    def _insert(self, conn, row: dict) -> tuple[int, bool]:
        key = {f"key_{k}": row[k] for k in KEY}
        for _ in range(3):
            if self._upsert:  # INSERT ... ON CONFLICT DO NOTHING RETURNING id: no row back = a duplicate
                new_id = conn.execute(self._insert_stmt, row).scalar_one_or_none()
                if new_id is not None:
                    return int(new_id), False
            else:
                try:
                    with conn.begin_nested():
                        new_id = conn.execute(self._insert_stmt, row).inserted_primary_key[0]
                    return int(new_id), False
                except IntegrityError:
                    pass
            old = conn.execute(self._find_stmt, key).scalar_one_or_none()
            if old is not None:
                return int(old), True
            # The conflicting row went away between the two statements (deleted, or its transaction
            # rolled back): try the insert again.
        raise RuntimeError("could not store the report: its duplicate keeps appearing and disappearing")

    # ------------------------------------------------------------------ reading

    def rows(self, since: int | str | datetime | None = None, limit: int | None = None) -> list[dict]:
        """Reports as dicts with exactly the table's columns (COLUMNS), oldest first (by id).

        since: an id (int: reports with a greater id), or an ISO date/timestamp (str or datetime: reports
        created at or after it, UTC). An id cursor is exact on SQLite (one writer); with several writers
        (PostgreSQL replicas) a smaller id can commit after a larger one, so re-read a little overlap."""
        q = select(*(reports.c[c] for c in COLUMNS)).order_by(reports.c.id)
        if isinstance(since, bool):
            raise TypeError("since must be an id, a timestamp or None")
        if isinstance(since, int):
            q = q.where(reports.c.id > since)
        elif since is not None:
            q = q.where(reports.c.created_at >= _as_timestamp(since))
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def stats(self) -> dict:
        """{"total", "by_label", "by_lang", "by_day" (UTC date), "by_bundle" (first 16 hex digits),
        "reporters" (distinct, '' counted as one), "disagree": {"total", "reported_spam_model_ham",
        "reported_ham_model_spam"}, "first", "last"}. A report disagrees with the model when it says spam
        but the model's probability was below the threshold that applied, or ham at or above it (reports
        stored without a probability or threshold are not counted)."""
        c = reports.c
        day = func.substr(c.created_at, 1, 10)
        bundle = func.substr(c.bundle_sha256, 1, 16)
        disagrees = and_(c.model_probability.is_not(None), c.model_threshold.is_not(None),
                         or_(and_(c.label == "spam", c.model_probability < c.model_threshold),
                             and_(c.label == "ham", c.model_probability >= c.model_threshold)))
        with self.engine.connect() as conn:
            total, reporters, first, last = conn.execute(
                select(func.count(), func.count(func.distinct(c.reporter)), func.min(c.created_at),
                       func.max(c.created_at))).one()

            def grouped(col, where=None) -> dict:
                q = select(col, func.count()).group_by(col).order_by(col)
                if where is not None:
                    q = q.where(where)
                return {str(k): int(n) for k, n in conn.execute(q)}

            by_label = {label: 0 for label in LABELS} | grouped(c.label)
            dis = grouped(c.label, disagrees)
            out = {"total": int(total), "by_label": by_label, "by_lang": grouped(c.lang), "by_day": grouped(day),
                   "by_bundle": grouped(bundle), "reporters": int(reporters),
                   "disagree": {"total": sum(dis.values()), "reported_spam_model_ham": dis.get("spam", 0),
                                "reported_ham_model_spam": dis.get("ham", 0)},
                   "first": first, "last": last}
        return out

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ the server's writer


class AsyncWriter:
    """Group commit for an asyncio server: `await writer.add(report)` -> (id, duplicate), once committed.

    Reports wait in a queue; one thread takes everything waiting (up to `max_batch`) and writes it in one
    transaction, so N concurrent reports cost one commit (one fsync) instead of N. A failing transaction is
    retried report by report, so one bad report fails only its own request. `stats()` runs on a second
    thread: it never waits behind writes (SQLite in WAL mode reads while another connection writes)."""

    def __init__(self, store: FeedbackStore, max_batch: int = 256, on_commit: Callable[[int], Any] | None = None):
        self.store, self.max_batch, self.on_commit = store, max_batch, on_commit
        self._pending: deque[tuple[dict, asyncio.Future]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self.commits = 0  # transactions written (reports / commits = the group-commit factor)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamlingo-feedback")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spamlingo-feedback-read")
        self._task = asyncio.create_task(self._run(), name="spamlingo-feedback-writer")

    async def add(self, report: dict) -> tuple[int, bool]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((report, fut))
        self._wakeup.set()
        # shield: a client that goes away does not take its report back; resending it gets the same id
        return await asyncio.shield(fut)

    async def stats(self) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self._reader, self.store.stats)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            await self._write(loop, batch)

    async def _write(self, loop, batch: list[tuple[dict, asyncio.Future]]) -> None:
        try:
            results = await loop.run_in_executor(self._writer, self.store.add_many, [r for r, _ in batch])
            self.commits += 1
            if self.on_commit is not None:
                self.on_commit(len(batch))
        except Exception as e:  # noqa: BLE001 - the requests of this batch hear about it
            if len(batch) > 1:
                for item in batch:
                    await self._write(loop, [item])
                return
            log.exception("could not store a feedback report")
            if not batch[0][1].done():
                batch[0][1].set_exception(e)
            return
        for (_, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(res)

    async def stop(self) -> None:
        """Write what is still queued, then stop the threads and close the store."""
        if self._task:
            loop = asyncio.get_running_loop()
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
                await self._write(loop, batch)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for ex in (self._writer, self._reader):
            if ex:
                ex.shutdown(wait=True)
        self.store.close()


# ------------------------------------------------------------------------------------------ command line


def format_stats(s: dict, url: str) -> str:
    """The stats as plain-text tables."""
    lines = [f"feedback store {redact(url)}: {s['total']} reports from {s['reporters']} reporter(s)"
             + (f", {s['first'][:19]}Z .. {s['last'][:19]}Z" if s["total"] else "")]

    def table(title: str, counts: dict, total: int) -> None:
        if not counts:
            return
        width = max(len(title), *(len(str(k)) for k in counts))
        lines.extend(["", f"{title:<{width}}  {'reports':>8}  {'share':>6}", f"{'-' * width}  {'-' * 8}  {'-' * 6}"])
        for k, n in counts.items():
            lines.append(f"{str(k) or '-':<{width}}  {n:>8}  {100 * n / max(total, 1):>5.1f}%")

    table("label", s["by_label"], s["total"])
    table("language", s["by_lang"], s["total"])
    table("day (UTC)", s["by_day"], s["total"])
    table("bundle sha256", s["by_bundle"], s["total"])
    d = s["disagree"]
    lines.extend(["", "disagreement with the model's verdict at report time:",
                  f"  reported spam, model said ham (missed spam):     {d['reported_spam_model_ham']:>8}",
                  f"  reported ham, model said spam (false positives): {d['reported_ham_model_spam']:>8}",
                  f"  total:                                           {d['total']:>8}"
                  f"  ({100 * d['total'] / max(s['total'], 1):.1f}% of reports)"])
    return "\n".join(lines)


def _since(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.feedback", description="Read the feedback store.")
    p.add_argument("command", choices=["stats", "rows"], help="stats: counts as tables; rows: reports as JSON lines")
    p.add_argument("--db", default=None, metavar="URL",
                   help=f"SQLAlchemy URL [env {ENV_URL}; default {DEFAULT_URL}]")
    p.add_argument("--json", action="store_true", help="stats: print JSON instead of tables")
    p.add_argument("--since", type=_since, default=None, metavar="ID|DATE",
                   help="rows: only reports after this id, or at/after this ISO date or timestamp (UTC)")
    args = p.parse_args(argv)
    try:
        store = FeedbackStore(args.db, create=False)
    except FeedbackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "stats":
            s = store.stats()
            print(json.dumps(s, indent=2) if args.json else format_stats(s, store.url))
        else:
            for r in store.rows(since=args.since):
                sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
    except BrokenPipeError:  # `... rows | head`
        return 0
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
