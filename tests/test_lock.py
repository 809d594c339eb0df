"""The lock files agree with pyproject.toml: `make install` installs the pins of requirements-dev.lock,
so a dependency added to or re-bounded in pyproject.toml without `make lock` would go untested."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.paths import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        m = re.match(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _unmet(requirements: list[str], pins: dict[str, str]) -> list[str]:
    unmet = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned, prereleases=True):
            unmet.append(f"{text} (locked: {pinned})")
    return unmet


def test_the_dev_lock_pins_every_requirement_within_its_bounds() -> None:
    project = PYPROJECT["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    assert _unmet(requirements, _pins("requirements-dev.lock")) == [], "run `make lock`"


def test_the_product_lock_pins_the_product_requirements_as_the_dev_lock_does() -> None:
    product, dev = _pins("requirements.lock"), _pins("requirements-dev.lock")
    assert _unmet(PYPROJECT["project"]["dependencies"], product) == [], "run `make lock`"
    assert {n: v for n, v in product.items() if dev.get(n) != v} == {}, "run `make lock`"


def test_every_dependency_has_an_upper_bound() -> None:
    project = PYPROJECT["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        assert any(spec.operator in ("<", "<=", "~=", "==") for spec in Requirement(text).specifier), text
