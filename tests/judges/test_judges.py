"""The constraint judge: every constraint with a passing and a failing response written by hand."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from llmft.errors import DataError
from llmft.judges.constraints import CONSTRAINTS, judge
from tests.helpers import ROOT

CASES = [  # (constraint, passing response, failing response)
    ({"type": "lowercase"}, "the sea is blue.", "The sea is blue."),
    ({"type": "uppercase"}, "THE SEA IS BLUE!", "THE SEA IS Blue!"),
    ({"type": "max_words", "n": 4}, "- The sea is blue", "The sea is very blue"),
    ({"type": "min_words", "n": 3}, "The sea, again.", "The sea."),
    ({"type": "bullets", "n": 2}, "Tips:\n- rest\n- water", "- rest\n- water\n- sleep"),
    ({"type": "include_keyword", "word": "staff"}, "The STAFF help.", "The staffing helps."),
    ({"type": "exclude_word", "word": "shelter"}, "Reefs give shelters.", "Reefs give Shelter."),
    ({"type": "starts_with", "phrase": "Of course."}, "  Of course. Here it is.", "Sure. Of course."),
    ({"type": "ends_with", "phrase": "Hope this helps!"}, "Done. Hope this helps!\n", "Hope this helps! Bye."),
    ({"type": "quoted"}, ' "The sea is blue." ', '"The sea is blue.'),
    ({"type": "json_key", "key": "answer"}, '{"answer": "blue"}', '{"reply": "blue"}'),
    ({"type": "no_commas"}, "Blue and deep.", "Blue, and deep."),
    ({"type": "sentences", "n": 2}, "It is blue. It is deep!", "It is blue. It is deep"),
]


def test_every_constraint_is_covered():
    assert {c["type"] for c, _, _ in CASES} == set(CONSTRAINTS)


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[c["type"] for c, _, _ in CASES])
def test_pass_and_fail(constraint, good, bad):
    assert judge([constraint], good).passed == [True]
    assert judge([constraint], bad).passed == [False]


def test_score_is_the_share_passed():
    v = judge([{"type": "lowercase"}, {"type": "no_commas"}, {"type": "max_words", "n": 2}], "a, b")
    assert v.passed == [True, False, True] and v.score == pytest.approx(2 / 3) and not v.all_passed
    assert judge([{"type": "json_key", "key": "a"}], "not json").score == 0.0


@pytest.mark.parametrize("spec, message", [
    ([{"type": "rhymes"}], "unknown constraint 'rhymes'"),
    ([{"type": "max_words"}], "needs 'n' as int, got None"),
    ([{"type": "max_words", "n": "5"}], "needs 'n' as int"),
    ([{"type": "include_keyword", "word": 3}], "needs 'word' as str"),
    ([{"n": 3}], "must be an object with a 'type'"),
    ([], "non-empty list"),
    ("lowercase", "non-empty list"),
])
def test_malformed_specs_are_clear_errors(spec, message):
    with pytest.raises(DataError, match=message) as e:
        judge(spec, "text", where="eval.jsonl:3")
    assert str(e.value).startswith("eval.jsonl:3: ")


def test_shipped_demo_data_regenerates_byte_identical_and_passes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts/make_demo_data.py"), "--seed", "0", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("sft_train.jsonl", "sft_eval.jsonl"):
        shipped, fresh = (ROOT / "data/demo" / name).read_bytes(), (tmp_path / name).read_bytes()
        assert hashlib.sha256(fresh).digest() == hashlib.sha256(shipped).digest(), name
        for n, line in enumerate(shipped.decode().splitlines(), 1):
            row = json.loads(line)
            assert judge(row["constraints"], row["completion"], f"{name}:{n}").all_passed
