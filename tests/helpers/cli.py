"""The command line as a user runs it: `llmft(...)` in this process, its one-line errors, a free port."""

from __future__ import annotations

import socket
import sys

from llmft.cli import main


def llmft(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["llmft", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    """Exit code 2, no traceback, and the error on one line (the last; progress lines may precede it)."""
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 2, err
    assert last.startswith("error: ") and "Traceback" not in err, err
    for part in expected:
        assert part in last, last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
