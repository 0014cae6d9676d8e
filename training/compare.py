"""Compare MLflow runs side by side: a table (terminal + Markdown) and a chart.

    python -m training.compare                                   # every finished run in the store
    python -m training.compare --experiment spamlingo --tag spamlingo.kind=transformer
    python -m training.compare --runs 1a2b3c4d,baseline-tfidf --metric test/overall/pr_auc --out runs/cmp

Rows are runs (the TF-IDF baseline is a row like any other); columns are the config keys that differ
between them (from the logged params), the headline test metrics, the threshold, the model size and the
serving latency when logged (serve/* metrics, which `make bench` adds to the run it measured).
Breakdown tables give F1 / PR-AUC / recall at 0.1% FPR per source and per language. The best run by
`--metric` is marked. `--out` receives compare.md and compare.png.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from training.config import ROOT, fail
from training.metrics import metric_name
from training.tracking import match_run_ref

DEFAULT_METRIC = "test/overall/f1"
DEFAULT_OUT = "runs/compare"
KIND_TAG = "spamlingo.kind"
HIDDEN_KINDS = ("eval",)  # shown only when asked for (--tag spamlingo.kind=eval or --runs)

# The metrics of the breakdown tables, in order: (metric leaf name, column label).
HEADLINE = (("f1", "F1"), ("pr_auc", "PR-AUC"), ("recall_at_fpr_0.1pct", "R@FPR0.1%"))
# Params that say nothing about the model (the run name and experiment have columns of their own).
_NOISE_PARAMS = ("tracking.run_name", "tracking.experiment")
_MAX_VALUE_CHARS = 36
_MAX_CHART_RUNS = 8


class CompareError(Exception):
    """A user mistake (unknown run, bad filter, empty store): one line, non-zero exit."""


# --------------------------------------------------------------------------------------------- metric names


@dataclass(frozen=True)
class MetricKey:
    split: str  # val | test
    scope: str  # overall | source | lang
    name: str  # "" for overall, else the source or language
    metric: str  # f1, pr_auc, ...


# The inverse of training.metrics.metric_name: a scope is `overall` or `source.<corpus>` / `lang.<tag>`
# (MLflow rejects the '=' of "source=<corpus>"); ':' and '=' are accepted too for stores written otherwise.
_SCOPE = re.compile(r"^(source|lang)[.:=](.+)$")


def parse_metric(key: str) -> MetricKey | None:
    """`test/source.uci_sms/f1` -> MetricKey("test", "source", "uci_sms", "f1"); None for other metrics."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] not in ("val", "test"):
        return None
    scope = "/".join(parts[1:-1])
    if scope == "overall":
        return MetricKey(parts[0], "overall", "", parts[-1])
    m = _SCOPE.match(scope)
    if not m:
        return None
    return MetricKey(parts[0], m.group(1), m.group(2), parts[-1])


def lower_is_better(metric: str) -> bool:
    leaf = metric.rsplit("/", 1)[-1]
    return leaf in ("fpr", "loss", "size_mb", "parameters") or leaf.endswith("_ms") or leaf.endswith("loss")


# --------------------------------------------------------------------------------------------- the store


def default_tracking_uri() -> str:
    """The store training writes to ($MLFLOW_TRACKING_URI, else the embedded store under ./mlruns)."""
    from training.tracking import tracking_uri

    return tracking_uri()


def local_store_missing(uri: str) -> str | None:
    """Opening a missing sqlite/file store would create an empty one: say so instead."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        return None if path.exists() else str(path)
    if uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:"))
        return None if path.exists() else str(path)
    return None


@dataclass
class RunRow:
    run_id: str
    name: str
    kind: str
    status: str
    experiment: str
    start_time: int
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    @property
    def label(self) -> str:
        return self.name or self.short_id


def _row(run, experiments: dict[str, str]) -> RunRow:
    return RunRow(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        kind=run.data.tags.get(KIND_TAG, "?"),
        status=run.info.status,
        experiment=experiments.get(run.info.experiment_id, run.info.experiment_id),
        start_time=run.info.start_time or 0,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
    )


def _all_pages(fn, **kwargs) -> list:
    out, token = [], None
    while True:
        page = fn(page_token=token, **kwargs)
        out.extend(page)
        token = page.token
        if not token:
            return out


def parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CompareError(f"--tag '{item}' is not of the form key=value (e.g. --tag spamlingo.kind=baseline)")
        tags[key.strip()] = value.strip()
    return tags


def find_runs(
    client,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
    run_ids: Sequence[str] = (),
) -> list[RunRow]:
    """Finished model runs (transformer, baseline) of `experiment` (default: every experiment) carrying
    every tag of `tags`. `run_ids` picks runs explicitly: each a full run id, a unique id prefix or a run name.
    """
    from mlflow.entities import ViewType

    experiments = {e.experiment_id: e.name for e in _all_pages(client.search_experiments, view_type=ViewType.ALL)}
    if experiment is not None:
        ids = [i for i, n in experiments.items() if n == experiment]
        if not ids:
            known = ", ".join(sorted(experiments.values())) or "none"
            raise CompareError(f"no MLflow experiment named '{experiment}' (experiments in the store: {known})")
    else:
        ids = list(experiments)
    if not ids:
        return []
    runs = [_row(r, experiments) for r in _all_pages(client.search_runs, experiment_ids=ids,
                                                       run_view_type=ViewType.ACTIVE_ONLY)]
    if run_ids:
        runs = _pick(runs, run_ids)  # named explicitly: kept whatever their status or kind
    else:
        runs = [r for r in runs if r.status == "FINISHED"]
        if KIND_TAG not in (tags or {}):  # `make eval DATA=...` runs score a file, not a model: not rows here
            runs = [r for r in runs if r.kind not in HIDDEN_KINDS]
    for key, value in (tags or {}).items():
        runs = [r for r in runs if r.tags.get(key) == value]
    return runs


def _pick(runs: list[RunRow], wanted: Sequence[str]) -> list[RunRow]:
    picked: list[RunRow] = []
    for w in wanted:
        hits = [runs[k] for k in match_run_ref(w, [(r.run_id, r.name) for r in runs])]
        if not hits:
            raise CompareError(f"no run with id, id prefix or name '{w}' in the store")
        if len(hits) > 1:
            ids = ", ".join(f"{h.short_id} ({h.name})" for h in hits)
            raise CompareError(f"'{w}' matches {len(hits)} runs ({ids}): give a longer id")
        if hits[0] not in picked:
            picked.append(hits[0])
    return picked


# --------------------------------------------------------------------------------------------- the report


def differing_params(runs: Sequence[RunRow]) -> list[str]:
    """Param keys whose value is not the same in every run (missing counts as a value)."""
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if k not in _NOISE_PARAMS and len({r.params.get(k) for r in runs}) > 1]


def scopes(runs: Sequence[RunRow], split: str) -> tuple[list[str], list[str]]:
    """The sources and languages that any run logged metrics for on `split`."""
    sources, langs = set(), set()
    for r in runs:
        for k in r.metrics:
            mk = parse_metric(k)
            if mk and mk.split == split:
                (sources if mk.scope == "source" else langs if mk.scope == "lang" else set()).add(mk.name)
    return sorted(sources), sorted(langs)


def metric_value(run: RunRow, split: str, scope: str, name: str, metric: str) -> float | None:
    """A metric by its parts: under training.metrics' name, else any other scope separator."""
    key = metric_name(split, "overall" if scope == "overall" else f"{scope}={name}", metric)
    if key in run.metrics:
        return run.metrics[key]
    for k, v in run.metrics.items():
        mk = parse_metric(k)
        if mk == MetricKey(split, scope, name, metric):
            return v
    return None


def threshold(run: RunRow, split: str) -> float | None:
    for key in ("threshold", f"{split}/threshold", "val/threshold", "test/threshold"):
        if key in run.metrics:
            return run.metrics[key]
    return None


def best_run(runs: Sequence[RunRow], metric: str) -> RunRow | None:
    scored = [r for r in runs if _finite(r.metrics.get(metric))]
    if not scored:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(scored, key=lambda r: r.metrics[metric])


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) >= 1000:
            return f"{int(v):,}"
        return f"{v:.{digits}f}"
    s = str(v)
    return s if len(s) <= _MAX_VALUE_CHARS else s[: _MAX_VALUE_CHARS - 1] + "…"


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Report:
    runs: list[RunRow]
    metric: str
    split: str
    best: RunRow | None
    differing: list[str]
    tables: list[Table]
    warning: str = ""

    @property
    def best_line(self) -> str:
        if self.best is None:
            return f"best: none (no run logged {self.metric})"
        return (f"best by {self.metric}: {self.best.label} ({self.best.short_id}) = "
                f"{_fmt(self.best.metrics[self.metric])}")


def _split_of(metric: str) -> str:
    head = metric.split("/", 1)[0]
    return head if head in ("val", "test") else "test"


def build_report(runs: Sequence[RunRow], metric: str = DEFAULT_METRIC) -> Report:
    split = _split_of(metric)
    best = best_run(runs, metric)
    sign = 1 if lower_is_better(metric) else -1

    def order(r: RunRow):  # best first; runs without the metric last; newest first among equals
        v = r.metrics.get(metric)
        return (0, sign * v, -r.start_time) if _finite(v) else (1, 0.0, -r.start_time)

    runs = sorted(runs, key=order)
    differing = differing_params(runs)
    several_experiments = len({r.experiment for r in runs}) > 1
    # test figures of runs scored on different data mixes (other corpora, caps or seed) are not comparable
    mixes = {r.tags.get("data_hash") for r in runs if r.tags.get("data_hash")}
    warning = (f"these runs were scored on {len(mixes)} different data mixes (column data): compare figures "
               f"within one mix; --tag data_hash=<the dataset hash of its mix card> keeps one") if len(mixes) > 1 else ""
    serve_keys = sorted({k for r in runs for k in r.metrics if k.startswith("serve/")})

    def mark(r: RunRow) -> str:
        return "*" if best is not None and r.run_id == best.run_id else ""

    headers = ["", "run", "id", "kind"] + (["experiment"] if several_experiments else [])
    headers += (["data"] if warning else []) + differing
    headers += [f"{label} {split}" for _, label in HEADLINE] + ["threshold", "size MB", "parameters"] + serve_keys
    if metric not in {f"{split}/overall/{m}" for m, _ in HEADLINE}:
        headers.append(metric)
    summary = []
    for r in runs:
        row = [mark(r), r.name or "—", r.short_id, r.kind] + ([r.experiment] if several_experiments else [])
        row += [r.tags.get("data_hash", "")[:12] or "—"] if warning else []
        row += [_fmt(r.params.get(k)) for k in differing]
        row += [_fmt(metric_value(r, split, "overall", "", m)) for m, _ in HEADLINE]
        row += [_fmt(threshold(r, split)), _fmt(r.metrics.get("model/size_mb"), 1),
                _fmt(_int_or_none(r.metrics.get("model/parameters")))]
        row += [_fmt(r.metrics.get(k), 1) for k in serve_keys]
        if len(row) < len(headers):
            row.append(_fmt(r.metrics.get(metric)))
        summary.append(row)
    tables = [Table(f"Runs ({len(runs)}; {split} split)", headers, summary)]

    sources, langs = scopes(runs, split)
    for m, label in HEADLINE:
        cols = [("source", s) for s in sources] + [("lang", lang) for lang in langs]
        if not cols:
            break
        rows = [[mark(r), r.label, r.short_id] + [_fmt(metric_value(r, split, sc, n, m)) for sc, n in cols]
                for r in runs]
        tables.append(Table(f"{label} ({split}) per source and per language", ["", "run", "id"]
                            + [f"{'lang ' if sc == 'lang' else ''}{n}" for sc, n in cols], rows))
    ood = ood_table(runs, mark)
    if ood is not None:
        tables.append(ood)
    return Report(list(runs), metric, split, best, differing, tables, warning)


# which out-of-distribution figures (training/ood.py, logged as ood/<protocol>/<scope>/<metric>) make columns
_OOD_COLUMNS = {"unseen_ham": ("fpr",), "eval_sets": ("f1",), "evasion": ("recall_drop", "fpr"), "loco": ("f1", "roc_auc")}


def _ood_column(key: str) -> tuple[str, str, str] | None:
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "ood" or parts[3] not in _OOD_COLUMNS.get(parts[1], ()):
        return None
    proto, scope, name = parts[1:]
    if proto == "evasion" and (name == "fpr") != scope.startswith("hard_negative_ham"):
        return None  # recall drops of the perturbations, FPR of the hard negatives
    if proto == "loco" and "." in scope:
        return None  # each fold's own score; its per-source/language rows stay in ood.json
    return proto, scope, name


def ood_table(runs: Sequence[RunRow], mark) -> Table | None:
    """Out-of-distribution columns (`make ood`): each run's model and, below it, the TF-IDF baseline
    scored beside it (logged as ood_baseline/...)."""
    cols = sorted({c for r in runs for k in r.metrics if (c := _ood_column(k))},
                  key=lambda c: (list(_OOD_COLUMNS).index(c[0]), c[1], c[2]))
    if not cols:
        return None
    headers = ["", "run", "id"] + [f"{p} {sc.replace('lang.', '')} {'drop' if n == 'recall_drop' else n}"
                                   for p, sc, n in cols]
    def cell(metrics: dict, key: str) -> str:
        low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
        band = f" ({_fmt(low)}-{_fmt(high)})" if low is not None and high is not None else ""
        return _fmt(metrics.get(key)) + band

    rows = []
    for r in runs:
        if not any(f"ood/{p}/{sc}/{n}" in r.metrics for p, sc, n in cols):
            continue
        rows.append([mark(r), r.label, r.short_id] + [cell(r.metrics, f"ood/{p}/{sc}/{n}") for p, sc, n in cols])
        rows.append(["", "  TF-IDF baseline beside it", ""]
                    + [cell(r.metrics, f"ood_baseline/{p}/{sc}/{n}") for p, sc, n in cols])
    return Table("Out-of-distribution (make ood): FPR on unseen ham, F1 on held-out sets, evasion recall "
                 "drop, leave-one-corpus-out folds; in brackets, at the low and high ends of the threshold's "
                 "spread (runs that differ by less are not told apart)", headers, rows)


def _int_or_none(v):
    return float(int(v)) if _finite(v) else None


# --------------------------------------------------------------------------------------------- rendering


def render_text(report: Report) -> str:
    out = []
    for t in report.tables:
        widths = [max(len(h), *(len(row[i]) for row in t.rows)) for i, h in enumerate(t.headers)]
        out.append(t.title)
        out.append("  ".join(h.ljust(w) for h, w in zip(t.headers, widths)).rstrip())
        out.append("  ".join("-" * w for w in widths))
        out.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in t.rows)
        out.append("")
    if not report.differing and len(report.runs) > 1:
        out.append("config: every logged param is the same in all runs")
    if report.warning:
        out.append("warning: " + report.warning)
    out.append(report.best_line + "   (* marks it)")
    return "\n".join(out)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|") or " "


def render_markdown(report: Report, chart: str | None = None, command: str = "") -> str:
    out = ["# Run comparison", ""]
    if command:
        out += [f"Generated by `{command}`.", ""]
    out += [f"**{report.best_line}** (marked ★).", ""]
    if report.warning:
        out += [f"> **Warning:** {report.warning}.", ""]
    if report.differing:
        out += ["Config columns are the params that differ between these runs; every other param is equal.", ""]
    for t in report.tables:
        out += [f"## {t.title}", ""]
        out.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
        out.append("|" + "|".join("---" for _ in t.headers) + "|")
        for row in t.rows:
            cells = ["★" if row[0] == "*" else " "] + [_md_cell(c) for c in row[1:]]
            if row[0] == "*":
                cells[1] = f"**{cells[1]}**"
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if chart:
        out += [f"![per-source and per-language scores]({chart})", ""]
    return "\n".join(out)


def plot(report: Report, path: Path) -> Path:
    """Grouped bars: the chosen metric per source (and per language) for each run; the best run stands out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mk = parse_metric(report.metric)
    leaf = mk.metric if mk else "f1"
    split = report.split
    runs = report.runs[:_MAX_CHART_RUNS]  # best first already
    sources, langs = scopes(runs, split)
    panels = [("by source", [("overall", "")] + [("source", s) for s in sources])]
    if langs:
        panels.append(("by language", [("lang", lang) for lang in langs]))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 1.2 * sum(len(p[1]) for p in panels) + 3), 4.6),
                             squeeze=False, gridspec_kw={"width_ratios": [len(p[1]) for p in panels]})
    palette = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(runs))
    for ax, (title, cols) in zip(axes[0], panels):
        for i, r in enumerate(runs):
            is_best = report.best is not None and r.run_id == report.best.run_id
            vals = [metric_value(r, split, sc, n, leaf) for sc, n in cols]
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(cols))]
            bars = ax.bar(xs, [v if v is not None else 0 for v in vals], width,
                          color=palette(i % 10), alpha=1.0 if is_best else 0.55,
                          edgecolor="black" if is_best else "none", linewidth=1.4 if is_best else 0,
                          hatch="//" if is_best else None,
                          label=("★ " if is_best else "") + f"{r.label} ({r.kind})")
            if is_best:
                for b, v in zip(bars, vals):
                    if v is not None:
                        ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                                    ha="center", va="bottom", fontsize=7, fontweight="bold",
                                    xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([n or sc for sc, n in cols], rotation=20, ha="right")
        ax.set_ylim(0, 1.08)
        ax.set_title(f"{leaf} ({split}) {title}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(leaf)
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(runs), 4)
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=ncol, frameon=False)
    more = f" (top {_MAX_CHART_RUNS} of {len(report.runs)})" if len(report.runs) > _MAX_CHART_RUNS else ""
    fig.suptitle(report.best_line + more, fontsize=10)
    # Room under the axes for the legend (one line per `ncol` runs).
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(runs) / ncol), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- command


def compare(
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
    run_ids: Sequence[str] = (),
    metric: str = DEFAULT_METRIC,
    out_dir: str | Path = DEFAULT_OUT,
    tracking_uri: str | None = None,
    command: str = "",
) -> tuple[Report, str, Path, Path]:
    """Build the comparison and write compare.md + compare.png; returns (report, text, md path, png path)."""
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    missing = local_store_missing(uri)
    if missing:
        raise CompareError(f"no MLflow store at {missing}: run `make train` or `make baseline` first")
    client = MlflowClient(tracking_uri=uri)
    runs = find_runs(client, experiment, tags, run_ids)
    if not runs:
        what = [f"experiment '{experiment}'" if experiment else "",
                ", ".join(f"{k}={v}" for k, v in (tags or {}).items())]
        where = " matching " + "; ".join(w for w in what if w) if any(what) else ""
        raise CompareError(f"no finished runs{where} in {uri}: run `make train` or `make baseline` first")
    report = build_report(runs, metric)
    if report.best is None and not any(metric in r.metrics for r in runs):
        known = sorted({k for r in runs for k in r.metrics if parse_metric(k)})
        hint = f" (e.g. {', '.join(known[:4])})" if known else ""
        raise CompareError(f"no selected run logged the metric '{metric}'{hint}")
    out = Path(out_dir)
    out = out if out.is_absolute() else ROOT / out
    png = plot(report, out / "compare.png")
    md = out / "compare.md"
    md.write_text(render_markdown(report, chart=png.name, command=command), encoding="utf-8")
    return report, render_text(report), md, png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare MLflow runs: table + Markdown + chart.")
    parser.add_argument("--experiment", help="only runs of this MLflow experiment (default: every experiment)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs with this tag (repeatable), e.g. --tag spamlingo.kind=transformer")
    parser.add_argument("--runs", default="", help="comma-separated run ids, id prefixes or run names")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="picks the best run (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where compare.md and compare.png go (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    args = parser.parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    import shlex
    import sys

    given = argv if argv is not None else sys.argv[1:]
    command = "python -m training.compare " + " ".join(shlex.quote(a) for a in given)
    try:
        _report, text, md, png = compare(
            experiment=args.experiment,
            tags=parse_tags(args.tag),
            run_ids=[r.strip() for r in args.runs.split(",") if r.strip()],
            metric=args.metric,
            out_dir=args.out,
            tracking_uri=args.tracking_uri,
            command=command.strip(),
        )
    except CompareError as e:
        fail(str(e))
    print(text)
    print(f"\nwrote {_rel(md)}\nwrote {_rel(png)}")


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    main()
