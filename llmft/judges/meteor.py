"""METEOR (Banerjee & Lavie 2005): unigram matches of a candidate against a reference, in stages — the same word,
then the same Porter stem, then WordNet synonyms when WordNet's data is installed (it is never downloaded) —
scored by a recall-weighted harmonic mean and a penalty for matches that come in scattered pieces:

    P = m / |candidate|,   R = m / |reference|,   F_mean = P R / (α P + (1 − α) R)       (α = 0.9: 10 P R / (R + 9 P))
    Penalty = γ (chunks / m)^β                                                         (β = 3, γ = 0.5)
    METEOR = F_mean (1 − Penalty)

m: matched unigrams; chunks: the fewest runs of matches adjacent in both the candidate and the reference. Words are
lower-cased whitespace tokens, as for bleu and rouge_l.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache

from llmft.errors import ConfigError
from llmft.judges.text import tokens

ALPHA, BETA, GAMMA = 0.9, 3.0, 0.5


@dataclass(frozen=True)
class Stage:
    """One matching stage: words match when their `key`s are equal (exact: the word; stem: its stem), or, for a
    relation that is not an equality (synonymy), when `same(candidate word, reference word)`."""

    key: Callable[[str], str] | None = None
    same: Callable[[str, str], bool] | None = None


EXACT = Stage(key=lambda w: w)


def meteor(candidate: str, reference: str, stages: list[Stage] | None = None, alpha: float = ALPHA,
           beta: float = BETA, gamma: float = GAMMA) -> float:
    """The sentence METEOR of `candidate` against `reference` (0 when nothing matches)."""
    cand, ref = tokens(candidate), tokens(reference)
    matches = align(cand, ref, stages if stages is not None else default_stages())
    if not matches:
        return 0.0
    m = len(matches)
    p, r = m / len(cand), m / len(ref)
    f_mean = p * r / (alpha * p + (1 - alpha) * r)
    return f_mean * (1 - gamma * (chunks(matches) / m) ** beta)


def align(cand: list[str], ref: list[str], stages: list[Stage]) -> list[tuple[int, int]]:
    """Matched (candidate position, reference position) pairs, sorted; each stage matches only the words the
    earlier stages left. A keyed stage first takes the longest runs of words matching in the same order (difflib's
    matching blocks), so that repeated words join the run they continue, then any remaining equal pair: a maximal
    matching in few chunks (the paper's rule, fewest crossings among maximal alignments, is approximated as nltk
    approximates it, and agrees with it where no word repeats). A relation stage matches greedily, left to right."""
    free_c, free_r = set(range(len(cand))), set(range(len(ref)))
    matches: list[tuple[int, int]] = []

    def take(i: int, j: int) -> None:
        matches.append((i, j))
        free_c.discard(i)
        free_r.discard(j)

    for stage in stages:
        if stage.key is not None:
            a = [stage.key(w) if i in free_c else ("c", i) for i, w in enumerate(cand)]  # taken: never equal
            b = [stage.key(w) if j in free_r else ("r", j) for j, w in enumerate(ref)]
            for block in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
                for t in range(block.size):
                    take(block.a + t, block.b + t)
            same = lambda x, y, key=stage.key: key(x) == key(y)  # noqa: E731
        else:
            same = stage.same
        for i in sorted(free_c):
            j = next((j for j in sorted(free_r) if same(cand[i], ref[j])), None)
            if j is not None:
                take(i, j)
    return sorted(matches)


def chunks(matches: list[tuple[int, int]]) -> int:
    """Runs of matches (sorted by candidate position) whose words are adjacent in both sentences."""
    pairs = zip(matches, matches[1:], strict=False)
    return 1 + sum(1 for (i, j), (k, n) in pairs if not (k == i + 1 and n == j + 1))


def default_stages() -> list[Stage]:
    """exact, Porter stem (nltk's stemmer), and WordNet synonyms when nltk has WordNet's data."""
    stemmer, wordnet = nltk_parts()
    stages = [EXACT, Stage(key=lambda w: stem(stemmer, w))]
    if wordnet is not None:
        stages.append(Stage(same=lambda a, b: b in synonyms(wordnet, a)))
    return stages


@lru_cache(maxsize=1)
def nltk_parts():
    """(Porter stemmer, WordNet reader or None when its data is not installed)."""
    try:
        from nltk.corpus import wordnet
        from nltk.stem.porter import PorterStemmer
    except ImportError:
        raise ConfigError("the meteor judge needs nltk for its Porter stemmer: pip install 'llmft[meteor]'") from None
    try:
        wordnet.ensure_loaded()
    except LookupError:  # nltk's data is not there: exact and stem matches only
        wordnet = None
    return PorterStemmer(), wordnet


def has_wordnet() -> bool:
    return nltk_parts()[1] is not None


@lru_cache(maxsize=65536)
def stem(stemmer, word: str) -> str:
    return stemmer.stem(word)


@lru_cache(maxsize=65536)
def synonyms(wordnet, word: str) -> frozenset[str]:
    """The single-word lemma names of every WordNet synset of `word`."""
    return frozenset(lemma.name().lower() for s in wordnet.synsets(word) for lemma in s.lemmas()
                     if "_" not in lemma.name())
