"""Critiques in words: what each constraint's failing answer (tests/judges/test_judges.py's CASES) is told, written by
hand; substance's; a user's judge returning {score, critique}; several critics joined per answer."""

from __future__ import annotations

import pytest

from llmft.data.records import Record
from llmft.errors import ConfigError
from llmft.judges import join_critiques, make_critic, make_judge, make_judgement
from llmft.judges.constraints import CONSTRAINTS, critique
from tests.judges.test_judges import CASES

SAID = {  # the failing answer of each case → its critique
    "lowercase": "the reply has capital letters; the request said all lowercase",
    "uppercase": "the reply has lowercase letters; the request said all capitals",
    "max_words": "the reply has 5 words; the request said at most 4",
    "min_words": "the reply has 2 words; the request said at least 3",
    "bullets": "the reply has 3 bullet points ('- ' lines); the request said exactly 2",
    "include_keyword": "the reply never says 'staff'; the request said to include it",
    "exclude_word": "the reply says 'shelter'; the request said not to",
    "starts_with": "the reply does not start with 'Of course.'; the request said to",
    "ends_with": "the reply does not end with 'Hope this helps!'; the request said to",
    "quoted": "the reply is not wrapped in double quotes; the request said to wrap it in them",
    "json_key": "the reply has no key 'answer'; the request said a JSON object with key 'answer'",
    "no_commas": "the reply uses commas; the request said no commas",
    "sentences": "the reply ends mid-sentence; the request said exactly 2 sentences",
}


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[c["type"] for c, _, _ in CASES])
def test_each_unmet_constraint_is_said_in_words(constraint, good, bad):
    assert set(SAID) == set(CONSTRAINTS)
    assert critique([constraint], good) == ""
    assert critique([constraint], bad) == SAID[constraint["type"]]


def test_several_faults_and_several_critics_are_joined():
    spec = [{"type": "no_commas"}, {"type": "json_key", "key": "a"}, {"type": "sentences", "n": 1}]
    assert critique(spec, "Yes, no. Maybe!") == (
        "the reply uses commas; the request said no commas; the reply is not valid JSON; the request said a JSON "
        "object with key 'a'; the reply has 2 sentences; the request said exactly 1 sentence")
    rows = [{"constraints": [{"type": "lowercase"}]}, {"constraints": [{"type": "lowercase"}]}]
    records = [Record(r, f"p.jsonl:{i + 1}") for i, r in enumerate(rows)]
    critics = {name: make_critic(name, records) for name in ("constraints", "substance")}
    answers = ["Hi.", "a whole answer of at least ten words, all of it in lowercase"]
    assert join_critiques([critic(["", ""], answers, rows) for critic in critics.values()], 2) == [
        "the reply has capital letters; the request said all lowercase; the reply says 1 word; an answer needs "
        "at least 10", ""]
    assert make_critic("rouge_l", records) is None and join_critiques([], 1) == [""]


def scored(prompts, answers, rows):
    return [{"score": 0.0, "critique": f"'{a}' is too short"} if len(a) < 4 else 1.0 for a in answers]


def unscored(prompts, answers, rows):
    return [{"critique": "no score"} for _ in answers]


def test_a_users_judge_may_return_a_score_and_a_critique():
    answers = ["No.", "Yes, gladly."]
    assert make_judge(f"{__name__}:scored", [])([], answers, [{}, {}]) == [0.0, 1.0]
    assert make_critic(f"{__name__}:scored", [])([], answers, [{}, {}]) == ["'No.' is too short", ""]
    with pytest.raises(ConfigError, match=r"unscored' must return one finite number per answer \(2\), or "
                                          r"\{score, critique\} objects"):
        make_judge(f"{__name__}:unscored", [])([], answers, [{}, {}])


CALLS = []


def counted(prompts, answers, rows):
    CALLS.append(len(answers))
    return scored(prompts, answers, rows)


def test_a_judgement_calls_a_users_function_once_for_scores_and_critiques():
    answers = ["No.", "Yes, gladly."]
    assert make_judgement(f"{__name__}:counted", [])([], answers, [{}, {}]) == ([0.0, 1.0], ["'No.' is too short", ""])
    assert CALLS == [2]
    rows = [{"completion": "Yes, gladly."}] * 2
    records = [Record(r, f"p.jsonl:{i + 1}") for i, r in enumerate(rows)]
    assert make_judgement("rouge_l", records)([], answers, rows) == ([0.0, 1.0], ["", ""])
