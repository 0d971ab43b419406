"""METEOR: hand-computed scores, the stages (exact, stem, WordNet synonyms), nltk's meteor_score where synonyms do
not matter, the judge in eval, and a one-line error without nltk."""

from __future__ import annotations

import builtins

import pytest

pytest.importorskip("nltk", reason="the meteor judge needs nltk (pip install 'llmft[meteor]')")

from llmft.data.records import Record  # noqa: E402
from llmft.errors import ConfigError  # noqa: E402
from llmft.judges import make_judge  # noqa: E402
from llmft.judges import meteor as M  # noqa: E402


def test_meteor_by_hand():
    # candidate the cats sat quietly / reference the cat sat: 'the', 'sat' exact, 'cats' ~ 'cat' by stem: m = 3 in
    # one chunk; P = 3/4, R = 1, F = PR / (0.9 P + 0.1 R) = 0.75 / 0.775 = 30/31; penalty 0.5 (1/3)^3 = 1/54
    assert M.meteor("The cats sat quietly", "the cat sat") == pytest.approx(30 / 31 * 53 / 54)
    # every word matched, in two chunks ('sat' | 'the cat'): F = 1, penalty 0.5 (2/3)^3 = 4/27
    assert M.meteor("sat the cat", "the cat sat") == pytest.approx(23 / 27)
    assert M.meteor("the cat sat", "the cat sat") == pytest.approx(1 - 0.5 / 27)  # one chunk of 3
    assert M.meteor("dogs bark", "the cat sat") == 0.0 and M.meteor("", "the cat") == 0.0


def test_stages_match_only_what_is_left_and_runs_are_kept_together():
    exact = [M.EXACT]
    assert M.align("a b x a b".split(), "a b a b".split(), exact) == [(0, 0), (1, 1), (3, 2), (4, 3)]
    assert M.chunks([(0, 0), (1, 1), (3, 2), (4, 3)]) == 2  # x splits the candidate: "a b" | "a b"
    assert M.chunks([(0, 0), (1, 1), (2, 2), (3, 4)]) == 2 and M.chunks([(0, 3)]) == 1
    # a repeated word joins the run it continues: "the dog" of the candidate matches "the dog" whole (1 chunk:
    # P = 2/4, R = 1, F = 0.5 / 0.55, penalty 0.5 (1/2)^3) rather than the first "the" alone (2 chunks)
    assert M.align("the cat the dog".split(), "the dog".split(), exact) == [(2, 0), (3, 1)]
    assert M.meteor("the cat the dog", "the dog", exact) == pytest.approx(0.5 / 0.55 * (1 - 0.5 / 8))
    # crossing matches still count: every equal pair is matched (m = 3), in 2 runs
    assert M.align("c a b".split(), "a b c".split(), exact) == [(0, 2), (1, 0), (2, 1)]
    # 'running' matches 'running' exactly, so the prefix stage cannot give it to 'runs'
    stages = [M.EXACT, M.Stage(key=lambda w: w[:3])]
    assert M.align("running runs".split(), "running".split(), stages) == [(0, 0)]


def test_wordnet_synonyms_when_installed(monkeypatch):
    class Lemma:
        def __init__(self, name):
            self._name = name

        def name(self):
            return self._name

    class Synset:
        def __init__(self, *names):
            self._lemmas = [Lemma(n) for n in names]

        def lemmas(self):
            return self._lemmas

    class WordNet:
        def synsets(self, word):
            return [Synset("quick", "fast", "speedy_up")] if word == "fast" else []

    stemmer, _ = M.nltk_parts()
    monkeypatch.setattr(M, "nltk_parts", lambda: (stemmer, WordNet()))
    with_synonyms = M.meteor("a fast car", "a quick car")
    monkeypatch.setattr(M, "nltk_parts", lambda: (stemmer, None))
    without = M.meteor("a fast car", "a quick car")
    assert with_synonyms == pytest.approx(1 - 0.5 / 27) and without < with_synonyms


SENTENCES = [  # (candidate, reference): no word repeats within a sentence, so every alignment is the same
    ("It is a guide to action which ensures that the military always obeys commands",
     "It is a guide to action that ensures the military will forever heed Party commands"),
    ("the cats were sitting on mats near doors", "a cat sat on the mat by the door"),
    ("Learn to cook by following recipes step by step", "Start with simple recipes and follow each step"),
    ("Earthquakes are caused by movement along faults", "faults moving cause earthquakes"),
    ("no overlap here", "completely different words"),
]


@pytest.mark.parametrize("candidate, reference", SENTENCES)
def test_equals_nltk_meteor_score_without_synonyms(candidate, reference):
    nltk_meteor = pytest.importorskip("nltk.translate.meteor_score")

    class NoWordNet:
        def synsets(self, word):
            return []

    theirs = nltk_meteor.meteor_score([reference.split()], candidate.split(), wordnet=NoWordNet())
    stemmer, _ = M.nltk_parts()
    ours = M.meteor(candidate, reference, [M.EXACT, M.Stage(key=lambda w: M.stem(stemmer, w))])
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_the_meteor_judge_in_eval_and_without_nltk(monkeypatch):
    rows = [Record({"prompt": "p", "completion": "the cat sat"}, "f.jsonl:1")]
    judge = make_judge("meteor", rows)
    assert judge(["p"], ["sat the cat"], [r.row for r in rows]) == [pytest.approx(23 / 27, abs=1e-9)]
    real_import = builtins.__import__

    def no_nltk(name, *args, **kwargs):
        if name.startswith("nltk"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    M.nltk_parts.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_nltk)
    with pytest.raises(ConfigError, match=r"meteor judge needs nltk.*llmft\[meteor\]"):
        make_judge("meteor", rows)
    monkeypatch.undo()
    M.nltk_parts.cache_clear()
