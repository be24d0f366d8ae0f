"""The tested dependency set is pinned whole, agrees with pyproject.toml, and is what this run uses.

A fresh machine once resolved pytest 9.2 next to schemathesis 4.32 and the README's test command failed,
while CI passed on a machine that still had older packages. These checks keep `.ci/constraints.txt` the
single tested set that CI, the README and the Dockerfile install from.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / ".ci" / "constraints.txt"


def _pins() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not pinned: run bash .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{req.name}=={pins[name]} (pinned) is outside pyproject.toml's {req.specifier}: run bash .ci/lock"


def test_this_environment_is_the_pinned_one() -> None:
    """Every pinned package present here has the pinned version (local build tags like +cpu aside)."""
    wrong = []
    for name, version in _pins().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
        if Version(installed.public) != version:
            wrong.append(f"{name} {installed} (pinned {version})")
    assert not wrong, "installed without .ci/constraints.txt? " + ", ".join(wrong)


def test_ci_and_docs_install_from_the_pins() -> None:
    run = (REPO / ".ci" / "run").read_text()
    assert "python3 -m venv" in run and "-c .ci/constraints.txt" in run
    readme = (REPO / "README.md").read_text()
    assert 'pip install -c .ci/constraints.txt -e ".[dev]" && python -m pytest -q' in readme
    assert "pip install -c .ci/constraints.txt -e . && depthserve serve" in readme
    assert "-c constraints.txt" in (REPO / "Dockerfile").read_text()
