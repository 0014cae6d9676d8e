"""Figure feedback: the feedback store and hot reload, through a real spamlingo-serve on 127.0.0.1.

- Ingest: acknowledged reports/s into the embedded SQLite store (WAL, synchronous=FULL: every 201 was
  fsynced) with 32 concurrent clients, one report per request, every text distinct. Two flows: reports of
  texts the clients classified just before (the usual one: the server reuses that score), and cold reports
  (the server runs the model for each; concurrent ones share a batch). Commits are grouped: the reports
  waiting while one transaction is written go into the next (reports per commit is shown).
- Durability: reports at concurrency 32 until the server is killed with SIGKILL mid-load; restarted on the
  same database, every id that was answered 2xx must be there (lost = answered but missing).
- Reload under load: one-text classify requests at concurrency 32 while the bundle is swapped back and forth
  (POST /admin/reload to a twin bundle, SIGHUP back to the one it started with): failed requests, latency
  during the swaps against the same load without them.
The load generator (asyncio + aiohttp) shares the cores with the server, as in speed_server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from bench.inputs import BenchError, Inputs, load_split, rel, sample_rows
from bench.server_load import Server
from bench.timing import percentiles

TITLE = "Feedback store and hot reload under load"
NEEDS = ("bundle", "data")
CONCURRENCY = 32
ADMIN_KEY = "bench-admin-key"


def _settings(quick: bool) -> dict:
    # Sized for multilingual-e5-small on 2 cores (~120 texts/s): about a minute in all, five server starts
    # included; classifying the reported texts first is most of the ingest part's time.
    if quick:
        return {"reports_classified": 300, "reports_cold": 64, "kill_reports": 300, "kill_after": 100,
                "reload_requests": 240, "reloads": 2}
    return {"reports_classified": 1500, "reports_cold": 320, "kill_reports": 1200, "kill_after": 300,
            "reload_requests": 800, "reloads": 4}


def twin_bundle(src: Path, dst: Path, threshold: float | None = None) -> Path:
    """A copy of bundle `src` under another identity, re-checksummed: its ONNX graphs carry a doc string (so
    their sha256 differ; the predictions are the same), its global threshold moves (so labels can differ)."""
    import onnx

    from serving.bundle import MANIFEST, write_manifest

    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST).read_text(encoding="utf-8"))
    for name in sorted({m for m in manifest["models"].values() if m}):
        model = onnx.load(str(dst / name), load_external_data=False)
        model.doc_string = (model.doc_string + f" [reload twin of {src.name}]").strip()
        onnx.save(model, str(dst / name))
    if threshold is None:
        t = float(manifest["threshold"])
        threshold = round(t - 0.05 if t > 0.5 else t + 0.05, 6)
    manifest["threshold"] = threshold
    if manifest.get("thresholds"):
        manifest["thresholds"] = {**manifest["thresholds"], "default": threshold}
    manifest.pop("files", None)
    write_manifest(dst, manifest)
    return dst


# ------------------------------------------------------------------------------------------ load


async def _post_all(url: str, path: str, bodies: list[dict], concurrency: int, stop_after: int | None = None,
                    on_stop=None, headers: dict | None = None) -> dict:
    """POST every body with `concurrency` in flight. Returns statuses, JSON answers and latencies by index;
    transport errors (a killed server) are recorded, not raised. `on_stop()` runs once `stop_after` 2xx."""
    import aiohttp

    status: list = []
    answers: list = []
    spans: list = []  # (start, end) perf_counter
    ok = 0
    next_i = 0
    stopped = False

    async def worker(session):
        nonlocal next_i, ok, stopped
        while next_i < len(bodies):
            i = next_i
            next_i += 1
            status.append(None)
            answers.append(None)
            spans.append(None)
            t0 = time.perf_counter()
            try:
                async with session.post(url + path, json=bodies[i], headers=headers) as r:
                    answers[i] = await r.json(content_type=None)
                    status[i] = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                status[i] = type(e).__name__
            spans[i] = (t0, time.perf_counter())
            if isinstance(status[i], int) and 200 <= status[i] < 300:
                ok += 1
                if stop_after is not None and ok >= stop_after and not stopped:
                    stopped = True
                    on_stop()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"status": status, "answers": answers, "spans": spans, "wall_s": wall}


class _Endless:
    """`bodies` over and over, `n` at least, until `done` is set (a list for _post_all's workers)."""

    def __init__(self, bodies: list[dict], n: int, done: asyncio.Event):
        self.bodies, self.n, self.done = bodies, n, done

    def __len__(self) -> int:
        return self.n if self.done.is_set() else 1 << 40

    def __getitem__(self, i: int) -> dict:
        return self.bodies[i % len(self.bodies)]


def _counts(statuses: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        out[str(s)] = out.get(str(s), 0) + 1
    return out


def _metric(url: str, name: str, **labels: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return _sum_metric(r.read().decode(), name, labels)


async def _metric_async(session, url: str, name: str, **labels: str) -> float:
    async with session.get(url + "/metrics") as r:
        return _sum_metric(await r.text(), name, labels)


def _sum_metric(text: str, name: str, labels: dict) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _server(bundle: Path, threads: int, variant: str, db: Path, *extra: str) -> Server:
    s = Server(bundle, threads, variant)
    s.cmd += ["--feedback-db", f"sqlite:///{db}", *extra]
    return s


# ------------------------------------------------------------------------------------------ the three parts


def _ingest(bundle: Path, threads: int, variant: str, texts: list[str], st: dict, tmp: Path) -> dict:
    n_hot, n_cold = st["reports_classified"], st["reports_cold"]
    hot, cold = texts[:n_hot], texts[n_hot:n_hot + n_cold]
    with _server(bundle, threads, variant, tmp / "ingest.db") as server:
        # the client flow: classify a message, then the user reports it (classification not timed here)
        asyncio.run(_post_all(server.url, "/v1/classify", [{"texts": [t]} for t in hot], CONCURRENCY))
        c0, s0 = _metric(server.url, "spamlingo_feedback_commit_reports_count"), \
            _metric(server.url, "spamlingo_feedback_commit_reports_sum")
        a = asyncio.run(_post_all(server.url, "/v1/feedback", [{"text": t, "label": "spam", "reporter": "bench"}
                                                                for t in hot], CONCURRENCY))
        c1, s1 = _metric(server.url, "spamlingo_feedback_commit_reports_count"), \
            _metric(server.url, "spamlingo_feedback_commit_reports_sum")
        b = asyncio.run(_post_all(server.url, "/v1/feedback", [{"text": t, "label": "ham", "reporter": "bench"}
                                                                for t in cold], CONCURRENCY))
    from serving.feedback import FeedbackStore

    with FeedbackStore(f"sqlite:///{tmp / 'ingest.db'}", create=False) as store:
        stored = store.stats()["total"]

    def part(r: dict, n: int) -> dict:
        acked = sum(1 for s in r["status"] if s in (200, 201))  # 200: a duplicate, answered with its first id
        lat = [e - s for (s, e), code in zip(r["spans"], r["status"]) if code in (200, 201)]
        return {"reports": n, "acknowledged": acked, "statuses": _counts(r["status"]), "wall_s": r["wall_s"],
                "reports_per_s": acked / r["wall_s"], **percentiles(lat or [float("nan")])}

    return {"classified_first": part(a, len(hot)) | {"reports_per_commit": (s1 - s0) / max(c1 - c0, 1)},
            "cold": part(b, len(cold)), "rows_stored": stored}


def _durability(bundle: Path, threads: int, variant: str, texts: list[str], st: dict, tmp: Path) -> dict:
    db = tmp / "kill.db"
    n = st["kill_reports"]
    bodies = [{"text": f"{texts[i % len(texts)]} #{i}", "label": "spam" if i % 2 else "ham", "reporter": "bench"}
              for i in range(n)]
    server = _server(bundle, threads, variant, db)
    with server:
        def kill():
            os.kill(server.proc.pid, signal.SIGKILL)

        r = asyncio.run(_post_all(server.url, "/v1/feedback", bodies, CONCURRENCY, stop_after=st["kill_after"],
                                  on_stop=kill))
        server.proc.wait(30)
    acked = {i: r["answers"][i]["id"] for i, s in enumerate(r["status"]) if isinstance(s, int) and 200 <= s < 300}
    with _server(bundle, threads, variant, db) as again:  # restarted on the same database
        from serving.feedback import FeedbackStore

        with FeedbackStore(f"sqlite:///{db}", create=False) as store:
            rows = {row["id"]: row for row in store.rows()}
        # the server that came back knows them too: resending an acknowledged report is a duplicate, same id
        sample = sorted(acked)[:50]
        resent = asyncio.run(_post_all(again.url, "/v1/feedback", [bodies[i] for i in sample], CONCURRENCY))
    lost = [i for i, rid in acked.items()
            if rid not in rows or rows[rid]["text"] != bodies[i]["text"] or rows[rid]["label"] != bodies[i]["label"]]
    same_ids = sum(1 for k, i in enumerate(sample)
                   if resent["status"][k] == 200 and resent["answers"][k] == {"id": acked[i], "duplicate": True})
    return {"reports_sent": n, "acknowledged": len(acked), "rows_after_restart": len(rows), "lost": len(lost),
            "committed_not_acknowledged": len(set(rows) - set(acked.values())),
            "unanswered": sum(1 for s in r["status"] if not (isinstance(s, int) and 200 <= s < 300)),
            "resent_after_restart": len(sample), "resent_same_id": same_ids}


def _reload(bundle: Path, threads: int, variant: str, texts: list[str], st: dict, tmp: Path) -> dict:
    twin = twin_bundle(bundle, tmp / "twin")
    n = st["reload_requests"]
    bodies = [{"texts": [texts[i % len(texts)]]} for i in range(n)]
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with _server(bundle, threads, variant, tmp / "reload.db", "--admin-key", ADMIN_KEY) as server:
        asyncio.run(_post_all(server.url, "/v1/classify", bodies[:64], 8))  # warm-up
        base = asyncio.run(_post_all(server.url, "/v1/classify", bodies, CONCURRENCY))

        async def with_reloads():
            import aiohttp

            swapping = asyncio.Event()
            # as many requests as needed to cover every swap (at least n): the load stops when the swaps are done
            endless = _Endless(bodies, n, swapping)
            load = asyncio.create_task(_post_all(server.url, "/v1/classify", endless, CONCURRENCY))
            windows, outcomes = [], []
            async with aiohttp.ClientSession() as s:
                await asyncio.sleep(0.2)
                for k in range(st["reloads"]):
                    t0 = time.perf_counter()
                    if k % 2 == 0:  # to the twin over HTTP
                        async with s.post(server.url + "/admin/reload", json={"bundle": str(twin)},
                                          headers=auth) as r:
                            outcomes.append({"trigger": "http", "status": r.status, **(await r.json())})
                    else:  # back to the bundle it started with: SIGHUP, then wait until it has reloaded
                        before = await _metric_async(s, server.url, "spamlingo_reloads_total")
                        os.kill(server.proc.pid, signal.SIGHUP)
                        while await _metric_async(s, server.url, "spamlingo_reloads_total") == before:
                            await asyncio.sleep(0.02)
                        ok = await _metric_async(s, server.url, "spamlingo_reloads_total", result="success",
                                                 trigger="sighup")
                        outcomes.append({"trigger": "sighup", "status": 200 if ok >= (k + 1) // 2 else 500})
                    windows.append((t0, time.perf_counter()))
                    await asyncio.sleep(0.3)
            swapping.set()
            return await load, windows, outcomes

        loaded, windows, outcomes = asyncio.run(with_reloads())
        counters = {r: _metric(server.url, "spamlingo_reloads_total", result=r) for r in ("success", "failure")}

    def summary(r: dict, windows=()) -> dict:
        ok = [i for i, s in enumerate(r["status"]) if s == 200 and len(r["answers"][i]["results"]) == 1]
        lat = [r["spans"][i][1] - r["spans"][i][0] for i in ok]
        sent = len(r["status"])
        out = {"requests": sent, "ok": len(ok), "failed": sent - len(ok), "statuses": _counts(r["status"]),
               "wall_s": r["wall_s"], "texts_per_s": len(ok) / r["wall_s"], **percentiles(lat or [float("nan")])}
        if windows:
            during = [r["spans"][i][1] - r["spans"][i][0] for i in ok
                      if any(r["spans"][i][0] <= b and r["spans"][i][1] >= a for a, b in windows)]
            out["during_swaps"] = {"requests": len(during), **percentiles(during or [float("nan")])}
            out["served_by"] = _counts([r["answers"][i]["model"]["sha256"] for i in ok])
        return out

    return {"without_reloads": summary(base), "with_reloads": summary(loaded, windows),
            "reloads": [{k: o.get(k) for k in ("trigger", "status", "seconds", "changed")} for o in outcomes],
            "reload_counters": counters, "twin": "copy of the bundle with a doc string in its graphs and "
            "the global threshold moved by 0.05, re-checksummed"}


def _letters(i: int) -> str:
    out = ""
    while True:
        i, r = divmod(i, 26)
        out = chr(97 + r) + out
        if not i:
            return out


def measure(inputs: Inputs, quick: bool, threads: int, seed: int = 0) -> dict:
    from serving.bundle import load_bundle
    from serving.feedback import text_hash

    st = _settings(quick) | {"threads": threads, "seed": seed, "concurrency": CONCURRENCY}
    bundle = load_bundle(inputs.bundle_dir)
    variant = "int8" if bundle.has("int8") and bundle.int8.get("status", "passed") == "passed" else "fp32"
    need = st["reports_classified"] + st["reports_cold"]
    rows = sample_rows(load_split(inputs, "test"), need, seed)
    # Distinct reports: one text per normalised form (texts that differ only in digits are one report).
    by_hash = {text_hash(r["text"]): r["text"] for r in rows if r["text"].strip() and len(r["text"]) <= 20_000}
    texts = list(by_hash.values())
    base = len(texts)
    while len(texts) < need:  # a small test split: variants of its texts (a letter code: digits are masked)
        i = len(texts)
        texts.append(f"{texts[i % base]} ~{_letters(i)}")
    tmp = Path(tempfile.mkdtemp(prefix="spamlingo-bench-feedback-"))
    try:
        ingest = _ingest(inputs.bundle_dir, threads, variant, texts, st, tmp)
        durability = _durability(inputs.bundle_dir, threads, variant, texts, st, tmp)
        reload = _reload(inputs.bundle_dir, threads, variant, texts, st, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if durability["lost"]:
        raise BenchError(f"feedback: {durability['lost']} acknowledged report(s) lost after SIGKILL")
    return {"settings": st, "variant": variant, "bundle": rel(inputs.bundle_dir),
            "mean_chars": sum(map(len, texts[:need])) / need,
            "ingest": ingest, "durability": durability, "reload": reload}


def render(result: dict) -> str:
    s, ing, dur, rl = result["settings"], result["ingest"], result["durability"], result["reload"]
    hot, cold = ing["classified_first"], ing["cold"]
    w, wo = rl["with_reloads"], rl["without_reloads"]
    lines = [f"Bundle variant {result['variant']}, {s['threads']} ONNX Runtime threads, {s['concurrency']} concurrent "
             "clients (asyncio + aiohttp on the same machine), one report or one text per request, texts from the "
             f"test split (mean {result['mean_chars']:.0f} characters). Store: the embedded SQLite file, WAL, "
             "synchronous=FULL (every acknowledged report fsynced).", "",
             "| reports | n | acknowledged | reports/s | p50 ms | p99 ms | reports per commit |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| of texts just classified (score reused) | {hot['reports']} | {hot['acknowledged']} | "
             f"**{hot['reports_per_s']:.0f}** | {hot['p50_ms']:.1f} | {hot['p99_ms']:.1f} | "
             f"{hot['reports_per_commit']:.1f} |",
             f"| cold (the model scores each) | {cold['reports']} | {cold['acknowledged']} | "
             f"{cold['reports_per_s']:.0f} | {cold['p50_ms']:.1f} | {cold['p99_ms']:.1f} | |", "",
             f"**SIGKILL mid-load:** {dur['reports_sent']} reports sent, the server killed after "
             f"{s['kill_after']} acknowledgements; {dur['acknowledged']} acknowledged, {dur['rows_after_restart']} "
             f"rows after the restart, **{dur['lost']} lost** ({dur['committed_not_acknowledged']} committed "
             f"but never answered: in flight at the kill); {dur['resent_same_id']}/{dur['resent_after_restart']} "
             "resent after the restart were answered as duplicates with their first id.", "",
             f"**Reload under load** ({len(rl['reloads'])} swaps: /admin/reload to a twin bundle, SIGHUP back; "
             f"{rl['twin']}):", "",
             "| load | requests | failed | p50 ms | p99 ms | p99 ms during swaps | texts/s |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| without reloads | {wo['requests']} | {wo['failed']} | {wo['p50_ms']:.1f} | {wo['p99_ms']:.1f} | | "
             f"{wo['texts_per_s']:.0f} |",
             f"| with reloads | {w['requests']} | **{w['failed']}** | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | "
             f"{w['during_swaps']['p99_ms']:.1f} ({w['during_swaps']['requests']} requests) | {w['texts_per_s']:.0f} |",
             "", "Swaps: " + ", ".join(f"{r['trigger']} {r['status']}"
                                       + (f" {r['seconds']:.2f} s" if r.get("seconds") is not None else "")
                                       for r in rl["reloads"])
             + f"; responses by model sha256: {w['served_by']}."]
    return "\n".join(lines)
