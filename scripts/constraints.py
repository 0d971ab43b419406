#!/usr/bin/env python3
"""The tested dependency set (constraints.txt): read it, compare an environment with it, write it anew.

    python3 scripts/constraints.py python constraints.txt              # the Python it was tested on, e.g. 3.11
    python3 scripts/constraints.py torch constraints.txt               # the torch version it was tested with
    python3 scripts/constraints.py without-torch constraints.txt OUT   # the set minus torch (setup installs torch)
    python3 scripts/constraints.py diff constraints.txt FREEZE         # packages whose version differs
    python3 scripts/constraints.py write constraints.txt FREEZE        # FREEZE (pip freeze) becomes the tested set

Only the standard library: it runs before any virtual environment exists.
"""

from __future__ import annotations

import platform
import re
import sys
from datetime import date
from pathlib import Path

HEADER = """\
# The dependency set llmft's tests passed with: scripts/setup.sh installs exactly these versions (pip constraints;
# pyproject.toml keeps the ranges a user's own install may take). Written on CPython {python}, {machine}, {day},
# by `scripts/test_latest.sh --update` after the fast tests passed on these versions; `scripts/test.sh` (the whole
# suite) runs on them before this file is committed.
# Regenerate: scripts/test_latest.sh --update (writes this file from the newest releases when their tests pass).
# python: {python}
"""
SKIP = {"llmft", "pip", "setuptools", "wheel"}


def name_of(line: str) -> str:
    return re.split(r"[=<>!~ ;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pins(path: str) -> dict[str, str]:
    """name → version of each `name==version` line (comments and blank lines skipped)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            out[name_of(name)] = version.strip().split("+", 1)[0]  # torch 2.13.0+cpu → 2.13.0
    return out


def tested_python(path: str) -> str:
    found = re.search(r"^# python: (\S+)", Path(path).read_text(), re.M)
    return found.group(1) if found else ""


def diff(tested: dict[str, str], now: dict[str, str]) -> list[str]:
    rows = [f"{n}: {tested.get(n, '-')} -> {now.get(n, '-')}" for n in sorted(set(tested) | set(now))
            if tested.get(n) != now.get(n) and n not in SKIP]
    return rows or ["the same versions as constraints.txt"]


def write(path: str, freeze: str) -> None:
    now = {n: v for n, v in pins(freeze).items() if n not in SKIP}
    python = ".".join(platform.python_version_tuple()[:2])
    text = HEADER.format(python=python, machine=platform.machine(), day=date.today().isoformat())
    Path(path).write_text(text + "".join(f"{n}=={v}\n" for n, v in sorted(now.items())))


def main(argv: list[str]) -> None:
    command, path, *rest = argv
    if command == "python":
        print(tested_python(path))
    elif command == "torch":
        print(pins(path).get("torch", ""))
    elif command == "without-torch":
        lines = Path(path).read_text().splitlines(keepends=True)
        Path(rest[0]).write_text("".join(line for line in lines if name_of(line) != "torch"))
    elif command == "diff":
        print("\n".join(diff(pins(path), pins(rest[0]))))
    elif command == "write":
        write(path, rest[0])
    else:
        sys.exit(f"unknown command {command}: python, torch, without-torch, diff or write")


if __name__ == "__main__":
    main(sys.argv[1:])
