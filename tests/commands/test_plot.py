"""`llmft plot`: a PNG of the curves of several runs; a directory without metrics is a clear error."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import assert_one_line_error, llmft


def test_plot_draws_the_logged_figures(capsys, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    for name, scale in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": scale / s, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 6)]
        rows.append({"step": 5, "eval/loss": scale})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = llmft(capsys, monkeypatch, "plot", tmp_path / "a", tmp_path / "b")
    assert code == 0, err
    png = tmp_path / "a" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss, eval/loss, lr, tokens_per_s" in out


def test_plot_of_a_directory_without_metrics(capsys, monkeypatch, tmp_path):
    code, _, err = llmft(capsys, monkeypatch, "plot", tmp_path)
    assert_one_line_error(code, err, "no metrics.jsonl")
