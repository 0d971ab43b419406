"""The substance judge scores what the demo's reward hacks lacked (docs/results.md): the share of 10 words an answer
has; reward.combine: min makes an answer score as its weaker side."""

from __future__ import annotations

import json

import pytest
import torch

from llmft.judges import make_judge
from llmft.judges.substance import substance
from tests.helpers import ROOT


@pytest.mark.parametrize("answer, expected", [
    ("", 0.0),  # meets "all caps", says nothing
    ("Thanks for asking.", 0.3),  # the whole "description" of a train station
    ("roots.", 0.1),
    ("A LIGHTHOUSE GUIDES SHIPS.", 0.4),
    ("don't panic — it's fine", 0.4),  # a contraction is one word, a dash none
    ("A lighthouse is a tall tower with a bright lamp that guides ships at night.", 1.0),
])
def test_substance_by_hand(answer, expected):
    assert substance(answer) == pytest.approx(expected)


def test_the_demos_reference_answers_have_substance():
    rows = [json.loads(line) for line in open(ROOT / "data" / "demo" / "sft_eval.jsonl")]
    scores = make_judge("substance", [])([r["prompt"] for r in rows], [r["completion"] for r in rows], rows)
    assert sum(s == 1.0 for s in scores) >= len(rows) - 1


def test_combine_min_scores_an_answer_as_its_weaker_side():
    from llmft.config import RewardSourcesConfig
    from llmft.rl.scoring import Scorer

    parts = {"constraints": torch.tensor([1.0, 1.0, 0.5]), "substance": torch.tensor([0.0, 1.0, 0.8])}
    finished = torch.tensor([True, True, False])
    summed = Scorer(RewardSourcesConfig(judges={"constraints": 1.0, "substance": 1.0}, missing_eos_penalty=1.0), [])
    assert summed.combine(parts, finished).tolist() == pytest.approx([1.0, 2.0, 0.3])
    least = Scorer(RewardSourcesConfig(judges={"constraints": 1.0, "substance": 1.0}, missing_eos_penalty=1.0,
                                       combine="min"), [])
    assert least.combine(parts, finished).tolist() == pytest.approx([0.0, 1.0, -0.5])
