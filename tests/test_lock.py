"""The lock file is what set-up installs: every dependency pyproject names is pinned there, and
each pin lies inside pyproject's supported range (a pyproject edit without `make lock` fails here)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        assert m, f"requirements-lock.txt: '{line}' is not an exact pin (name==version)"
        pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def test_every_dependency_is_pinned_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = _locked()
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements-lock.txt: run make test-latest && make lock"
        version = pins[name]
        # local labels (+cpu) are not part of the range
        assert req.specifier.contains(Version(version.public), prereleases=True), (
            f"{req.name}=={version} in the lock is outside pyproject's '{req.specifier}': refresh the lock")

