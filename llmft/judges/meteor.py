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
from functools import lru_cache

from llmft.errors import ConfigError
from llmft.judges.text import tokens

ALPHA, BETA, GAMMA = 0.9, 3.0, 0.5
Same = Callable[[str, str], bool]  # does a candidate word match a reference word at this stage


def meteor(candidate: str, reference: str, stages: list[Same] | None = None, alpha: float = ALPHA,
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


def align(cand: list[str], ref: list[str], stages: list[Same]) -> list[tuple[int, int]]:
    """Matched (candidate position, reference position) pairs, sorted: each stage matches the words the earlier
    stages left. Within a stage, candidate words are taken left to right, each matched with the unmatched reference
    word that continues the previous match if one does, else the nearest after it, else the nearest before: a
    maximal matching (for exact and stem stages) that keeps runs together."""
    free_c, free_r = set(range(len(cand))), set(range(len(ref)))
    matches: list[tuple[int, int]] = []
    for same in stages:
        last = -1
        for i in sorted(free_c):
            options = [j for j in free_r if same(cand[i], ref[j])]
            if not options:
                continue
            j = min(options, key=lambda j: (j <= last, abs(j - (last + 1))))
            matches.append((i, j))
            free_c.discard(i)
            free_r.discard(j)
            last = j
    return sorted(matches)


def chunks(matches: list[tuple[int, int]]) -> int:
    """Runs of matches (sorted by candidate position) whose words are adjacent in both sentences."""
    pairs = zip(matches, matches[1:], strict=False)
    return 1 + sum(1 for (i, j), (k, n) in pairs if not (k == i + 1 and n == j + 1))


def exact(a: str, b: str) -> bool:
    return a == b


def default_stages() -> list[Same]:
    """exact, Porter stem (nltk's stemmer), and WordNet synonyms when nltk has WordNet's data."""
    stemmer, wordnet = nltk_parts()
    stages = [exact, lambda a, b: stem(stemmer, a) == stem(stemmer, b)]
    if wordnet is not None:
        stages.append(lambda a, b: b in synonyms(wordnet, a))
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
