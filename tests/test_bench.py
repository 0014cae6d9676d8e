"""bench.run --quick on the tiny model and bundle fixtures: each figure in its own process, real ONNX
Runtime sessions, a real spamlingo-serve subprocess on 127.0.0.1, JSON results and the generated report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run as bench_run

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, tiny_model_dir, tiny_bundle):
    out = tmp_path_factory.mktemp("bench")
    proc = _bench("--run", str(tiny_model_dir), "--bundle", str(tiny_bundle), "--quick",
                  "--only", "size,speed_engines,speed_server", "--threads", "1",
                  "--results", str(out / "results"), "--markdown", str(out / "BENCH.md"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc.stdout


def _load(out: Path, figure: str) -> dict:
    return json.loads((out / "results" / f"{figure}.json").read_text(encoding="utf-8"))


def test_each_figure_written_with_its_command_and_machine(quick_results):
    out, stdout = quick_results
    for figure in ("size", "speed_engines", "speed_server"):
        rec = _load(out, figure)
        assert rec["figure"] == figure and rec["quick"] is True
        assert rec["command"].startswith(f"python -m bench.run --only {figure} ") and "--quick" in rec["command"]
        assert rec["machine"]["cores"] >= 1 and rec["versions"]["onnxruntime"]
        assert rec["threads"] == 1
        assert f"[{['size', 'speed_engines', 'speed_server'].index(figure) + 1}/3] {figure} done" in stdout


def test_size_matches_the_files(quick_results, tiny_bundle, tiny_model_dir):
    out, _ = quick_results
    r = _load(out, "size")["result"]
    mb = 1024 * 1024
    for name in ("model.onnx", "tokenizer.json"):
        assert r["bundle_files_mb"][name] == pytest.approx((tiny_bundle / name).stat().st_size / mb)
    on_disk = sum(p.stat().st_size for p in tiny_bundle.iterdir() if p.is_file()) / mb
    assert r["bundle_total_mb"] == pytest.approx(on_disk)
    assert r["model_dir_total_mb"] == pytest.approx(
        sum(p.stat().st_size for p in tiny_model_dir.iterdir() if p.is_file()) / mb)
    if r["models"].get("int8"):
        assert 0 < r["int8_over_fp32"] < 1  # a quantised graph is smaller


def test_speed_engines_side_by_side(quick_results):
    out, _ = quick_results
    r = _load(out, "speed_engines")["result"]
    assert r["cells"], r
    for cell in r["cells"]:
        assert {"pytorch_eager", "onnx_fp32"} <= set(cell["engines"])
        assert cell["engines"]["pytorch_eager"]["speedup_vs_eager"] == pytest.approx(1.0)
        for st in cell["engines"].values():
            assert st["texts_per_s"] > 0 and st["calls"] >= 2
            assert st["ms_per_batch_p90"] >= st["ms_per_batch_p50"] > 0


def test_server_vs_raw(quick_results):
    out, _ = quick_results
    r = _load(out, "speed_server")["result"]
    assert set(r["latency"]) == {"1", "8", "32"}
    for c, lat in r["latency"].items():
        assert lat["ok"] == lat["requests"] and not lat["errors"], (c, lat)
        assert lat["p99_ms"] >= lat["p50_ms"] > 0
    tp = r["throughput"]
    assert tp["server_texts_per_s"] > 0 and tp["raw_texts_per_s"] > 0
    assert tp["server_over_raw"] == pytest.approx(tp["server_texts_per_s"] / tp["raw_texts_per_s"])
    assert "--host 127.0.0.1" in r["server_command"]


def test_markdown_generated_from_the_results(quick_results):
    out, _ = quick_results
    md = (out / "BENCH.md").read_text(encoding="utf-8")
    for figure in ("size", "speed_engines", "speed_server"):
        rec = _load(out, figure)
        assert f"## {rec['title']}" in md
        assert f"Reproduce: `{rec['command']}`" in md
    assert "## Machine and versions" in md and "onnxruntime" in md
    assert "--quick run" in md
    assert "server/raw" in md and "ONNX Runtime fp32" in md
    # The report is a pure function of the JSON files: rebuilding it gives the same text.
    again = out / "AGAIN.md"
    assert bench_run.main(["--render-only", "--results", str(out / "results"), "--markdown", str(again)]) == 0
    assert again.read_text(encoding="utf-8") == md


def test_missing_inputs_name_the_make_command(tmp_path, tiny_model_dir):
    proc = _bench("--run", str(tmp_path / "nope"), "--only", "size", "--results", str(tmp_path / "r"),
                  "--markdown", str(tmp_path / "B.md"), timeout=120)
    assert proc.returncode != 0
    assert "neither a model directory nor an MLflow run id" in proc.stderr and "make train" in proc.stderr
    assert "Traceback" not in proc.stderr

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"inherit: {ROOT / 'configs' / 'smoke.yaml'}\nexport:\n  output_dir: {tmp_path / 'no_bundles'}\n")
    proc = _bench("--config", str(cfg), "--run", str(tiny_model_dir), "--only", "size", "--results",
                  str(tmp_path / "r"), "--markdown", str(tmp_path / "B.md"), timeout=120)
    assert proc.returncode != 0
    assert "make export" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_only_accepts_figures_and_groups():
    assert bench_run.select("") == list(bench_run.FIGURES)
    assert bench_run.select("speed,size") == ["speed_engines", "speed_server", "speed_training", "size"]
    with pytest.raises(bench_run.BenchError, match="unknown figure 'fast'"):
        bench_run.select("fast")
