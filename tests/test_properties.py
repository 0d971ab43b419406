"""Property-based: whatever config, command line or data row a user (or a fuzzer) brings, llmft either runs or says
one line `error: …` and exits 2 — never a traceback — and touches no file (the checks run with --dry-run, which
must refuse everything the real run refuses before it writes)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llmft.cli import main  # noqa: E402
from llmft.config import SFTConfig  # noqa: E402
from llmft.schema import all_key_paths  # noqa: E402

SETTINGS = settings(max_examples=80, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KEYS = all_key_paths(SFTConfig) + ["bogus", "train.bogus", "lora", "train", "data", "model.name.x"]
ANY = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.text(max_size=12),
                st.lists(st.integers(-3, 3), max_size=3),
                st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12)  # lone surrogates included


def invoke(*args) -> tuple[int, str]:
    """`llmft ARGS` in this process: (exit code, stdout + stderr)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = ["llmft", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue()


def assert_ran_or_one_line(code: int, output: str) -> None:
    assert "Traceback" not in output, output[-2000:]
    assert code in (0, 2), output[-2000:]
    if code == 2:
        last = output.strip().splitlines()[-1]
        assert last.startswith("error: "), output[-2000:]


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "rows.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    base = {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(root / "rows.jsonl")},
            "output_dir": str(root / "out")}
    return root, base


def set_path(cfg: dict, key: str, value) -> None:
    node, *parts = cfg, *key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


@SETTINGS
@given(overrides=st.dictionaries(st.sampled_from(KEYS), ANY, max_size=4))
def test_any_config_runs_or_is_one_line(world, overrides):
    root, base = world
    cfg = json.loads(json.dumps(base))
    for key, value in overrides.items():
        set_path(cfg, key, value)
    path = root / "fuzz.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = files(root)
    code, output = invoke("sft", path, "--dry-run")
    assert_ran_or_one_line(code, output)
    assert files(root) == before  # a dry run writes nothing, output_dir included


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=100)))
def test_any_config_file_content_runs_or_is_one_line(world, text):
    root, _ = world
    path = root / "raw.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    assert_ran_or_one_line(*invoke("sft", path, "--dry-run"))


WORDS = ["sft", "reward", "dpo", "ppo", "eval", "generate", "schema", "plot", "--set", "--dry-run", "--bogus",
         "--model", "--prompts", "--out", "--max-new-tokens", "--temperature", "--limit", "--compare", "x=1",
         "train.epochs=abc", "train.learning_rate=-1", "nosuch.yaml", "abc", "-1", "1e99", "", "=", "--", "no-model"]


@SETTINGS
@given(argv=st.lists(st.sampled_from(WORDS), min_size=1, max_size=5))
def test_any_command_line_runs_or_is_one_line(world, argv):
    root, _ = world
    cwd = os.getcwd()
    os.chdir(root)  # relative names resolve here, and nothing in the repository can be touched
    try:
        before = files(root)
        assert_ran_or_one_line(*invoke(*argv))
        assert files(root) == before
    finally:
        os.chdir(cwd)


ROW_KEYS = ["prompt", "completion", "messages", "text", "chosen", "rejected", "margin", "responses", "role", "content"]
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_subnormal=False), TEXT)
ROW = st.recursive(LEAF,
                   lambda inner: st.one_of(st.lists(inner, max_size=3),
                                           st.dictionaries(st.sampled_from(ROW_KEYS), inner, max_size=4)),
                   max_leaves=8)


@SETTINGS
@given(rows=st.lists(st.dictionaries(st.sampled_from(ROW_KEYS), ROW, min_size=1, max_size=4), min_size=1,
                     max_size=3), stage=st.sampled_from(["sft", "dpo"]))
def test_any_data_row_trains_or_is_one_line(world, rows, stage):
    root, base = world
    data = root / "fuzz.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {**base, "data": {"train": str(data)}}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = files(root)
    assert_ran_or_one_line(*invoke(stage, path, "--dry-run"))
    assert files(root) == before
