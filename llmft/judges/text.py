"""Reference-based judges: sentence BLEU-4 and ROUGE-L F1 on lower-cased whitespace tokens."""

from __future__ import annotations

import math
from collections import Counter


def tokens(text: str) -> list[str]:
    return text.lower().split()


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al. 2002) with add-one smoothing of the n>1 precisions (Lin & Och 2004).

        BLEU = BP · exp( (1/N) Σ_n log p_n ),   BP = min(1, exp(1 − r/c))
        p_1 = matches_1 / c_1,   p_n = (matches_n + 1) / (c_n + 1) for n > 1

    matches_n: clipped n-gram matches; c_n: candidate n-grams; r, c: reference and candidate lengths.
    """
    cand, ref = tokens(candidate), tokens(reference)
    if not cand or not ref:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        c_grams = Counter(tuple(cand[i:i + n]) for i in range(len(cand) - n + 1))
        r_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matches, ngrams = sum((c_grams & r_grams).values()), sum(c_grams.values())
        if n == 1 and matches == 0:
            return 0.0
        log_p += math.log(matches / ngrams) if n == 1 else math.log((matches + 1) / (ngrams + 1))
    brevity = min(1.0, math.exp(1 - len(ref) / len(cand)))
    return brevity * math.exp(log_p / max_n)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): with L = length of the longest common subsequence,
        P = L / |candidate|,  R = L / |reference|,  F1 = 2PR / (P + R)
    """
    cand, ref = tokens(candidate), tokens(reference)
    if not cand or not ref:
        return 0.0
    prev = [0] * (len(ref) + 1)
    for a in cand:
        row = [0]
        for j, b in enumerate(ref):
            row.append(prev[j] + 1 if a == b else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(cand), lcs / len(ref)
    return 2 * p * r / (p + r)
