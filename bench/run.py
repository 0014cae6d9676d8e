"""Benchmarks: each figure measured in its own process, then BENCHMARKS.md regenerated from the results.

    python -m bench.run                                   # make bench: every figure, newest run + its bundle
    python -m bench.run --run <run id> --bundle bundles/x --only quality,speed
    python -m bench.run --quick --only size               # small samples (tests, a first look)

Figures: quality, speed_engines, speed_server, speed_training, size, feedback, explain (`--only speed` = the three
speed figures); ood and the ensemble and probe studies only when asked for (`--only ood`, `--only ensemble`,
`--only probe`). Each runs as `python -m bench.run --figure NAME ...` in a fresh process, so one figure's
threads, caches and memory cannot skew another's, and writes bench/results/NAME.json (machine, versions, date,
inputs, the command that reproduces it, the numbers). BENCHMARKS.md is then rebuilt from every JSON file there; it is generated,
never edited by hand.

Sample and step counts keep `make bench` under 20 minutes on 2 cores with multilingual-e5-small (7.5
minutes measured on a shared 2-core machine, the PyTorch model's test split scored again included).
--quick shrinks the speed figures' samples to seconds; quality always scores the whole test split.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench import env
from bench.inputs import BenchError, load_inputs, load_split, rel
from training.config import ROOT, ConfigError, fail, load_config

FIGURES = {  # name -> module; also the order of BENCHMARKS.md
    "quality": "bench.quality",
    "speed_engines": "bench.speed",
    "speed_server": "bench.server_load",
    "speed_training": "bench.training_speed",
    "size": "bench.size",
    "feedback": "bench.feedback",
    "explain": "bench.explain",
    "ood": "bench.ood",
    "ensemble": "bench.ensemble",
    "probe": "bench.probe",
}
# A plain `make bench` measures these; `ood` trains its folds' models, so it runs on its own (`make ood`), and
# `ensemble` and `probe` (studies, not shipped figures) read the models those folds leave.
DEFAULT_FIGURES = [f for f in FIGURES if f not in ("ood", "ensemble", "probe")]
GROUPS = {"speed": ["speed_engines", "speed_server", "speed_training"]}
RESULTS = "bench/results"
MARKDOWN = "BENCHMARKS.md"
DEFAULT_CONFIG = "configs/default.yaml"
# Exceptions the other modules raise for user mistakes (printed as one line, like ours).
_DOMAIN_ERRORS = ("BundleError", "EvaluateError", "TrackingError", "DataError", "BackboneError", "StartupError")


def module(figure: str):
    return importlib.import_module(FIGURES[figure])


def select(only: str) -> list[str]:
    if not only:
        return list(DEFAULT_FIGURES)
    out: list[str] = []
    for item in (x.strip() for x in only.split(",") if x.strip()):
        names = GROUPS.get(item) or ([item] if item in FIGURES else None)
        if names is None:
            raise BenchError(f"--only: unknown figure '{item}' (figures: {', '.join(FIGURES)}; groups: "
                             f"{', '.join(GROUPS)})")
        out += [n for n in names if n not in out]
    return out


def default_threads() -> int:
    return env.cpu_count()


# ------------------------------------------------------------------------------------------ one figure


def reproduce_command(figure: str, args: argparse.Namespace, run_ref: str | None, bundle: str | None) -> str:
    parts = ["python -m bench.run", f"--only {figure}"]
    if args.config != DEFAULT_CONFIG:
        parts.append(f"--config {shlex.quote(args.config)}")
    if run_ref:
        parts.append(f"--run {shlex.quote(run_ref)}")
    if bundle:
        parts.append(f"--bundle {shlex.quote(bundle)}")
    for opt in getattr(module(figure), "OPTIONS", ()):
        value = getattr(args, opt)
        if value and not (opt == "bundle" and bundle):  # a figure's own --bundle, said once and repo-relative
            parts.append(f"--{opt} {shlex.quote(rel(Path(value)) if opt == 'bundle' else value)}")
    parts.append(f"--threads {args.threads}")
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)


def run_figure(figure: str, args: argparse.Namespace) -> Path:
    """Measure one figure in this process and write <results>/<figure>.json."""
    mod = module(figure)
    cfg = load_config(args.config)
    inputs = load_inputs(cfg, args.run, args.bundle, need_model="model" in mod.NEEDS,
                         need_bundle="bundle" in mod.NEEDS)
    load_before = env.load_average()
    t0 = time.perf_counter()
    options = {k: getattr(args, k) for k in getattr(mod, "OPTIONS", ())}
    result = mod.measure(inputs, quick=args.quick, threads=args.threads, seed=args.seed, **options)
    record = {
        "figure": figure,
        "title": mod.TITLE,
        "command": reproduce_command(figure, args, inputs.run_ref,
                                     rel(inputs.bundle_dir) if inputs.bundle_dir else None),
        "quick": bool(args.quick),
        "date": env.now(),
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": env.machine(),
        "versions": env.versions(),
        "threads": args.threads,
        # Other processes' load skews timings on a shared machine: say how busy it was.
        "load_average_1min": [load_before, env.load_average()],
        "inputs": inputs.describe(),
        "result": result,
    }
    for key in getattr(mod, "TOP_LEVEL", ()):  # keys a figure's readers expect at the top of its file
        record[key] = result.pop(key)
    previous = _path(args.results) / f"{figure}.json"
    if hasattr(mod, "merge") and previous.is_file():  # a figure measured in parts keeps its other parts
        try:
            record = mod.merge(json.loads(previous.read_text(encoding="utf-8")), record)
        except ValueError:
            print(f"warning: {rel(previous)} is not valid JSON: replaced", file=sys.stderr)
    out_dir = _path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{figure}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / f"{figure}.json")
    return out_dir / f"{figure}.json"


def _json_default(x):
    import numpy as np

    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _path(p: str) -> Path:
    p = Path(p)
    return p if p.is_absolute() else ROOT / p


# ------------------------------------------------------------------------------------------ all figures


def preflight(figures: list[str], args: argparse.Namespace):
    """Resolve the run, bundle and data once, so a missing piece is one message before anything runs."""
    cfg = load_config(args.config)
    needs = {n for f in figures for n in module(f).NEEDS}
    inputs = load_inputs(cfg, args.run, args.bundle, need_model="model" in needs, need_bundle="bundle" in needs)
    if "data" in needs:
        load_split(inputs, "test")
    return inputs


def run_all(figures: list[str], args: argparse.Namespace) -> int:
    inputs = preflight(figures, args)
    results = _path(args.results)
    base = [sys.executable, "-m", "bench.run", "--config", args.config, "--threads", str(args.threads),
            "--results", str(results), "--seed", str(args.seed), "--protocols", args.protocols,
            "--folds", args.folds]
    if inputs.model_dir is not None:  # resolved once: a model dir from another store needs no lookup again
        base += ["--run", str(inputs.model_dir)]
    elif inputs.run_ref:
        base += ["--run", inputs.run_ref]
    if inputs.bundle_dir:
        base += ["--bundle", str(inputs.bundle_dir)]
    elif args.bundle:  # a figure that resolves its bundle itself (ood) still gets the one asked for
        base += ["--bundle", args.bundle]
    if args.quick:
        base.append("--quick")
    print(f"bench: run {inputs.run_ref or '—'}, bundle {rel(inputs.bundle_dir) if inputs.bundle_dir else '—'}, "
          f"{args.threads} threads{', quick' if args.quick else ''}; figures: {', '.join(figures)}", flush=True)
    if inputs.bundle_note:
        print(f"bench: note: {inputs.bundle_note}", flush=True)
    failed = []
    for i, figure in enumerate(figures, 1):
        print(f"[{i}/{len(figures)}] {figure} ...", flush=True)
        t0 = time.perf_counter()
        # A fresh process per figure: no thread pool, cache or allocator state carries over.
        rc = subprocess.call(base + ["--figure", figure], cwd=ROOT)
        took = time.perf_counter() - t0
        if rc != 0:
            failed.append(figure)
            print(f"[{i}/{len(figures)}] {figure} FAILED (exit {rc}) after {took:.0f} s", flush=True)
        else:
            print(f"[{i}/{len(figures)}] {figure} done in {took:.0f} s -> {rel(results / (figure + '.json'))}",
                  flush=True)
    if not args.no_markdown:
        md = write_markdown(results, _path(args.markdown))
        print(f"wrote {rel(md)} from {rel(results)}/*.json")
    if failed:
        print(f"error: figure(s) failed: {', '.join(failed)} (their previous results, if any, are kept)",
              file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ BENCHMARKS.md


def load_results(results: Path) -> list[dict]:
    records = []
    for p in sorted(results.glob("*.json")):
        try:
            records.append(json.loads(p.read_text(encoding="utf-8")))
        except ValueError:
            print(f"warning: {rel(p)} is not valid JSON: skipped", file=sys.stderr)
    order = {name: i for i, name in enumerate(FIGURES)}
    return sorted(records, key=lambda r: (order.get(r.get("figure"), len(order)), r.get("figure", "")))


def _versions_line(v: dict) -> str:
    return ", ".join(f"{k} {val}" for k, val in v.items())


def render_markdown(records: list[dict], results_dir: str = RESULTS) -> str:
    out = ["# Benchmarks", "",
           f"Generated by `make bench` (`python -m bench.run`) from `{results_dir}/*.json`: do not edit by hand. "
           "Each figure was measured in its own process; the command under it reproduces it (`make bench "
           "ARGS=\"...\"` takes the same arguments).", ""]
    if not records:
        return "\n".join(out + ["No results yet: run `make bench`.", ""])
    envs: dict[str, list[str]] = {}
    for r in records:
        key = f"{env.describe(r.get('machine', {}))}; {_versions_line(r.get('versions', {}))}"
        envs.setdefault(key, []).append(r.get("figure", "?"))
    out += ["## Machine and versions", ""]
    for key, figs in envs.items():
        out.append(f"- {key} — {', '.join(figs)}")
    out.append("")
    for r in records:
        figure = r.get("figure", "?")
        out += [f"## {r.get('title', figure)}", ""]
        inp = r.get("inputs", {})
        model = f"model `{inp['model_dir']}`" if inp.get("model_dir") else ""
        what = [f"run `{inp['run_id']}`" if inp.get("run_id") else model,
                f"bundle `{inp['bundle']}`" if inp.get("bundle") else "",
                f"backbone {inp['backbone']}" if inp.get("backbone") else ""]
        load = r.get("load_average_1min") or []
        busy = (f" (load average {load[0]:.1f} → {load[1]:.1f})" if len(load) == 2 and None not in load else "")
        out.append(f"Measured {r.get('date', '?')} in {r.get('seconds', '?')} s on {env.describe(r.get('machine', {}))}"
                   f"{busy}; {', '.join(w for w in what if w)}.")
        if r.get("quick"):
            out.append("**--quick run: small samples, for checking the plumbing only; do not quote these numbers.**")
        out += ["", f"Reproduce: `{r.get('command', '?')}`", ""]
        try:
            result = {**r["result"], **{k: r[k] for k in getattr(module(figure), "TOP_LEVEL", ()) if k in r}} \
                if figure in FIGURES else r.get("result")
            out.append(module(figure).render(result) if figure in FIGURES else
                       "```json\n" + json.dumps(r.get("result"), indent=2) + "\n```")
        except (KeyError, TypeError, ValueError) as e:  # a result written by an older bench version
            out.append(f"(cannot render this result: {type(e).__name__}: {e}; rerun the command above)")
        out.append("")
    return "\n".join(out)


def write_markdown(results: Path, path: Path) -> Path:
    shown = rel(results)
    path.write_text(render_markdown(load_results(results), shown), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config naming the MLflow experiment and bundle root "
                   "(default: %(default)s)")
    p.add_argument("--run", default=None, help="MLflow run id or model dir (default: newest finished training run)")
    p.add_argument("--bundle", default=None, help="bundle dir (default: the newest exported from the run)")
    p.add_argument("--only", default="", help=f"comma-separated figures or groups: {', '.join(FIGURES)}, "
                   f"{', '.join(GROUPS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small speed samples (seconds), no baseline training: "
                   "for tests and a first look")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="threads for PyTorch and ONNX Runtime alike (default: the CPUs available, %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="text sampling seed (default: %(default)s)")
    p.add_argument("--results", default=RESULTS, help="where the JSON results go (default: %(default)s)")
    p.add_argument("--markdown", default=MARKDOWN, help="the generated report (default: %(default)s)")
    p.add_argument("--no-markdown", action="store_true", help="measure only; leave the report as it is")
    p.add_argument("--render-only", action="store_true", help="rebuild the report from the JSON results only")
    p.add_argument("--protocols", default="", help="ood: comma-separated protocols (default: all: "
                   "unseen_ham, eval_sets, evasion, loco)")
    p.add_argument("--folds", default="", help="ood: comma-separated leave-one-corpus-out folds (default: all)")
    p.add_argument("--figure", choices=list(FIGURES), help=argparse.SUPPRESS)  # one figure, in this process
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.render_only:
            md = write_markdown(_path(args.results), _path(args.markdown))
            print(f"wrote {rel(md)}")
            return 0
        if args.figure:
            path = run_figure(args.figure, args)
            print(f"{args.figure}: wrote {rel(path)}")
            return 0
        return run_all(select(args.only), args)
    except (BenchError, ConfigError) as e:
        fail(str(e))
    except Exception as e:  # the other steps' own one-line user errors (bad bundle, bad model dir, ...)
        if type(e).__name__ in _DOMAIN_ERRORS:
            fail(str(e))
        raise
    except KeyboardInterrupt:
        fail("interrupted", code=130)


if __name__ == "__main__":
    raise SystemExit(main())
