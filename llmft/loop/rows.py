"""What a round's feedback becomes: training rows, from the scores alone (pairs) or from the critiques (refine).

pairs (iterative DPO; Xu et al. 2023, Yuan et al. 2024): of the G answers y_1..y_G to a prompt x with scores
s_1..s_G, the pair (x, y_w ≻ y_l) with w = argmax s, l = argmin s, when s_w > s_l.

refine (ILF, Scheurer et al. 2023): the answer y_l is criticised in words (c); the policy, shown (x, y_l, c), samples
refinements y'_1..y'_K; the best that scores higher than y_l and is an edit of it (ROUGE-L(y', y_l) ≥ min_overlap)
is kept: (x, y' ≻ y_l). The pair is trained on x alone,
without the critique: the policy learns to answer as it would after the feedback.
"""

from __future__ import annotations


def best_and_worst(scores: list[float]) -> tuple[int, int] | None:
    """(w, l): the first highest- and the first lowest-scoring answer; None when every score is the same."""
    w = max(range(len(scores)), key=lambda i: (scores[i], -i))
    lo = min(range(len(scores)), key=lambda i: (scores[i], i))
    return (w, lo) if scores[w] > scores[lo] else None


def to_refine(scores: list[float], critiques: list[str]) -> int | None:
    """The answer to rewrite: the lowest-scoring one that has a critique (the first of equals); None when no answer
    was criticised."""
    said = [i for i, c in enumerate(critiques) if c.strip()]
    return min(said, key=lambda i: (scores[i], i)) if said else None


def best_refinement(original: float, scores: list[float], overlaps: list[float] | None = None,
                    min_overlap: float = 0.0) -> int | None:
    """The first highest-scoring refinement that scores higher than the answer it rewrites and keeps at least
    `min_overlap` of it (ROUGE-L, `overlaps`); else None."""
    ok = [i for i in range(len(scores)) if scores[i] > original and (overlaps is None or overlaps[i] >= min_overlap)]
    return max(ok, key=lambda i: (scores[i], -i)) if ok else None


def refinement_messages(request: list[dict], answer: str, critique: str, template: str) -> list[dict]:
    """The conversation a refinement is sampled from: the request, the answer, and the critique as the next user
    turn (roles alternate, as every family's template needs)."""
    return [*request, {"role": "assistant", "content": answer},
            {"role": "user", "content": template.replace("{critique}", critique)}]


def pair_row(prompt: str | list[dict], chosen: str, rejected: str, scores: tuple[float, float], **extra) -> dict:
    """A preference row (llmft dpo's {prompt, chosen, rejected}) with the scores that decided it."""
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "scores": list(scores), **extra}


def sft_rows(pairs: list[dict]) -> list[dict]:
    """The chosen answers of preference rows as {prompt, completion} (ILF's fine-tuning on refinements; for
    pairs, rejection sampling: each prompt's best answer)."""
    return [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
