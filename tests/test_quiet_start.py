"""A start that says only what llmft says: the GGUF conversion's bar becomes ten lines in a log."""

from __future__ import annotations

import sys

from llmft.models.sources import conversion_progress, progress_lines


def test_progress_lines_print_each_tenth_once(capsys):
    assert list(progress_lines(range(272), desc="Converting tensors...")) == list(range(272))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Converting tensors: 10% (28/272)" and lines[-1] == "Converting tensors: 100% (272/272)"
    assert len(lines) == 10
    list(progress_lines(range(3), desc="x"))
    assert capsys.readouterr().err.splitlines() == ["x: 30% (1/3)", "x: 60% (2/3)", "x: 100% (3/3)"]


def test_the_conversion_bar_is_lines_in_a_log_and_a_bar_on_a_terminal(monkeypatch):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    real = gguf_utils.tqdm
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with conversion_progress():
        assert gguf_utils.tqdm is progress_lines
    assert gguf_utils.tqdm is real
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with conversion_progress():
        assert gguf_utils.tqdm is real
