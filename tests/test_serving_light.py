"""serving/ stays light: it never imports torch or transformers, and runs where they are not installed.

Each check runs in a fresh interpreter (this test process has long since imported torch elsewhere).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["serving.server", "serving.client", "serving.inference", "serving.bundle", "serving.text",
           "serving.feedback"]
# What `pip install spamlingo[serve]` provides (pyproject's `serve` extra) and what those bring with them
# that serving uses directly (pydantic: FastAPI's models; starlette: FastAPI's base; yaml: a base dependency).
ALLOWED = {"numpy", "yaml", "onnxruntime", "tokenizers", "fastapi", "starlette", "pydantic", "uvicorn",
           "prometheus_client", "sqlalchemy", "serving"}

# Imports everything, loads the bundle, opens the ONNX Runtime session (as `spamlingo-serve` does), builds
# the app and sends one request through it in process; prints the heavy modules that got imported.
SCRIPT = r"""
import asyncio, json, sys
BLOCK = sys.argv[2] == "block"
if BLOCK:
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked: serving must not need it")
    sys.meta_path.insert(0, Blocker())
import serving.server, serving.client, serving.inference, serving.bundle, serving.text, serving.feedback
import httpx
from serving.server import create_app, load_model
from serving.settings import ServerSettings

settings = ServerSettings(bundle=sys.argv[1], threads=1)
clf, info = load_model(settings)
app = create_app(settings, clf.classify, info)

async def go():
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/classify", json={"texts": ["free money now", "会議は3時です"]})
            return r.status_code, r.json()

status, body = asyncio.run(go())
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({"status": status, "n": len(body.get("results", [])), "heavy": heavy}))
"""


def _run(bundle: Path, mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle), mode], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_serving_imports_neither_torch_nor_transformers(tiny_bundle):
    out = _run(tiny_bundle, "plain")
    assert out["status"] == 200 and out["n"] == 2
    assert out["heavy"] == []


def test_serving_works_where_torch_and_transformers_cannot_be_imported(tiny_bundle):
    out = _run(tiny_bundle, "block")
    assert out["status"] == 200 and out["n"] == 2 and out["heavy"] == []


def test_serving_source_imports_only_the_serve_extra():
    """Static: every import in serving/*.py (top level or inside functions) is the standard library, serving
    itself or a package of the `serve` extra, so `pip install spamlingo[serve]` is enough to run it."""
    found = {}
    for path in sorted((ROOT / "serving").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(path.name)
    assert set(found) <= ALLOWED, {k: sorted(v) for k, v in found.items() if k not in ALLOWED}
    assert "torch" not in found and "transformers" not in found
