"""`llmft annotate export`: the judgements in force → the files the stages read, and what they say about the people.

Per item, over every annotator's judgements in force (the latest of each kind):
    votes      a ≻ b from rankings (every ordered pair), picks (best ≻ each other, each other ≻ worst) and blind
               comparisons (winner ≻ loser); one vote per person and pair, the majority decides, a draw decides nothing
    ratings    the mean of the people's 1-5 ratings of each answer
    edits      each edited text, which is preferred to the answer it was made from

    a ≻ b      when the votes decide it, else when both are rated and their means differ by ≥ min_gap (the gap is
               the pair's `margin`)

    --to dpo | reward   pairs {prompt, chosen, rejected[, margin]}: the best against the worst answer of each item
                        (--pairs best-worst: best and worst by votes won, then mean rating), or every decided pair
                        (--pairs all); and edited ≻ original
    --to ranked         {prompt, responses: [best, ..., worst]} where the answers are in a strict order (for reward)
    --to kto            {prompt, completion, label}: one label per answer text: an answer someone edited is
                        undesirable whatever its rating (someone found it worth fixing), an edit desirable, any other
                        rated answer desirable when its mean rating ≥ threshold
    --to sft            {prompt, completion}: edits, and answers whose mean rating ≥ threshold that nobody edited
    --to critiques      {prompt, completion, critique, critics[, rating]}: each answer someone criticised in words
                        (the critiques of the answer, then of the item as a whole, one per line), for every answer
                        of an item criticised as a whole

A tie takes back the person's votes and ratings of the item (no answer is better: their ratings must not decide a
pair either); a skip does the same. Edits and critiques stay: each is about one answer, not about the others.

Other columns of the candidates file (constraints, a reference) are kept in every row.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from llmft.annotate.items import Item
from llmft.annotate.store import Judgement, Store
from llmft.checkpoint import atomic_write_text
from llmft.errors import ConfigError

TARGETS = ("dpo", "reward", "ranked", "kto", "sft", "critiques")


@dataclass
class Verdicts:
    """Everything the people said about one item."""

    item: Item
    votes: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)  # (a, b) → annotator → +1 a, −1 b
    ratings: dict[int, dict[str, int]] = field(default_factory=dict)  # candidate → annotator → rating
    edits: list[tuple[int, str]] = field(default_factory=list)  # (candidate, edited text)
    critiques: dict[int | None, dict[str, str]] = field(default_factory=dict)  # candidate (None: item) → who → text

    def vote(self, annotator: str, winner: int, loser: int) -> None:
        a, b = min(winner, loser), max(winner, loser)
        self.votes.setdefault((a, b), {})[annotator] = 1 if winner == a else -1

    def forget(self, annotator: str) -> None:
        """Drop a person's votes and ratings of the item (a tie: no answer is better; a skip: no judgement)."""
        for table in (self.votes, self.ratings):
            for key in list(table):
                table[key].pop(annotator, None)
                if not table[key]:
                    del table[key]

    def mean_rating(self, c: int) -> float | None:
        r = self.ratings.get(c)
        return sum(r.values()) / len(r) if r else None

    def prefer(self, a: int, b: int, min_gap: float) -> tuple[int, int, float | None] | None:
        """(winner, loser, margin) when the people decided between a and b, else None."""
        net = sum(self.votes.get((min(a, b), max(a, b)), {}).values()) * (1 if a < b else -1)
        if net:
            return (a, b, None) if net > 0 else (b, a, None)
        ra, rb = self.mean_rating(a), self.mean_rating(b)
        if ra is None or rb is None or abs(ra - rb) < min_gap:
            return None
        return (a, b, ra - rb) if ra > rb else (b, a, rb - ra)

    def order(self, min_gap: float) -> list[int]:
        """Candidates by pairwise wins, then mean rating (best first)."""
        k = len(self.item.candidates)
        wins = [sum(1 for o in range(k) if o != c and (p := self.prefer(c, o, min_gap)) and p[0] == c)
                for c in range(k)]
        return sorted(range(k), key=lambda c: (-wins[c], -(self.mean_rating(c) or 0.0), c))


def verdicts(store: Store) -> list[Verdicts]:
    by_item = {it.id: Verdicts(it) for it in store.items.items}
    for j in store.current():  # in the order of each judgement's latest version
        v, who, line = by_item[j.item], j.annotator, j.line
        k = len(v.item.candidates)
        if j.action in ("tie", "skip"):  # takes back what this person said before on the item
            v.forget(who)
        elif j.action == "rate":
            v.ratings.setdefault(line["candidate"], {})[who] = line["rating"]
        elif j.action == "rank":
            for a, b in combinations(line["order"], 2):
                v.vote(who, a, b)
        elif j.action == "pick":
            for o in range(k):
                if o != line["best"]:
                    v.vote(who, line["best"], o)
                if line.get("worst") is not None and o not in (line["worst"], line["best"]):
                    v.vote(who, o, line["worst"])
        elif j.action == "compare" and line.get("winner") is not None:
            v.vote(who, line["winner"], 1 - line["winner"])
        elif j.action == "edit":
            v.edits.append((line["candidate"], line["text"]))
        elif j.action == "critique":
            by = v.critiques.setdefault(line.get("candidate"), {})
            by.pop(who, None)
            if line["text"].strip():  # "" takes it back
                by[who] = line["text"].strip()
    return [v for v in by_item.values() if v.votes or v.ratings or v.edits or any(v.critiques.values())]


# ------------------------------------------------------------------------------------------------ rows
def rows_for(target: str, found: list[Verdicts], pairs: str = "best-worst", min_gap: float = 1.0,
             threshold: float = 4.0) -> list[dict]:
    if target not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got '{target}'")
    if min_gap <= 0:
        raise ConfigError(f"--min-gap must be > 0 (equal ratings decide nothing), got {min_gap}")
    if pairs not in ("best-worst", "all"):
        raise ConfigError(f"--pairs must be best-worst or all, got '{pairs}'")
    out = []
    for v in found:
        base = {"prompt": v.item.prompt, **v.item.row}
        text = [c.text for c in v.item.candidates]
        if target in ("dpo", "reward"):
            for w, lo, margin in decided_pairs(v, pairs, min_gap):
                out.append(base | {"chosen": text[w], "rejected": text[lo]} | ({"margin": margin} if margin else {}))
            out += [base | {"chosen": t, "rejected": text[c]} for c, t in v.edits]
        elif target == "ranked":
            if (order := strict_order(v, min_gap)) is not None:
                out.append(base | {"responses": [text[c] for c in order]})
        elif target == "kto":
            out += [base | {"completion": t, "label": label} for t, label in kto_labels(v, threshold).items()]
        elif target == "critiques":
            out += critique_rows(v, base)
        else:  # sft
            edited = {text[c] for c, _ in v.edits}
            out += [base | {"completion": t} for _, t in v.edits]
            out += [base | {"completion": text[c]} for c in v.ratings
                    if v.mean_rating(c) >= threshold and text[c] not in edited]
    return out


def critique_rows(v: Verdicts, base: dict) -> list[dict]:
    """One row per answer with a critique of its own or of its item: the critiques joined one per line (the
    answer's first), who wrote them, and the answer's mean rating when rated."""
    whole = v.critiques.get(None, {})
    out = []
    for c, cand in enumerate(v.item.candidates):
        said = v.critiques.get(c, {})
        lines = [*said.values(), *whole.values()]
        if not lines:
            continue
        row = base | {"completion": cand.text, "critique": "\n".join(lines),
                      "critics": list(dict.fromkeys([*said, *whole]))}
        rating = v.mean_rating(c)
        out.append(row | ({"rating": rating} if rating is not None else {}))
    return out


def kto_labels(v: Verdicts, threshold: float) -> dict[str, bool]:
    """One label per answer text, never both: by mean rating, then an edit desirable, then an answer someone edited
    undesirable (the later rule wins)."""
    text = [c.text for c in v.item.candidates]
    labels = {text[c]: v.mean_rating(c) >= threshold for c in v.ratings}
    labels.update({t: True for _, t in v.edits})
    labels.update({text[c]: False for c, _ in v.edits})
    return labels


def strict_order(v: Verdicts, min_gap: float) -> list[int] | None:
    """The candidates best first when the people decided every pair and the way the order says (no cycle)."""
    order = v.order(min_gap)
    for a, b in combinations(order, 2):
        p = v.prefer(a, b, min_gap)
        if not p or p[0] != a:
            return None
    return order


def decided_pairs(v: Verdicts, pairs: str, min_gap: float) -> list[tuple[int, int, float | None]]:
    """(winner, loser, margin) of every decided pair, or of the best against the worst; never two answers of the
    same text (they teach nothing)."""
    text = [c.text.strip() for c in v.item.candidates]
    if pairs == "all":
        found = [v.prefer(a, b, min_gap) for a, b in combinations(range(len(text)), 2)]
    else:
        order = v.order(min_gap)
        found = [v.prefer(order[0], order[-1], min_gap)]
    return [p for p in found if p and text[p[0]] != text[p[1]]]


# ------------------------------------------------------------------------------------- about the people
def agreement(store: Store, min_gap: float = 1.0) -> dict:
    """Where two or more people judged the same item: the share of answer pairs both decided (each by their own
    votes, or their own ratings apart by ≥ min_gap) that they ordered alike, and the mean gap between two people's
    ratings of the same answer."""
    same = total = several = 0
    gaps = []
    for v in verdicts(store):
        orders = list(person_orders(v, min_gap).values())
        several += len(orders) > 1
        for x, y in combinations(orders, 2):
            for pair in x.keys() & y.keys():
                total += 1
                same += x[pair] == y[pair]
        gaps += [abs(a - b) for by in v.ratings.values() for a, b in combinations(by.values(), 2)]
    return {"items_judged_by_several": several, "pairs_compared": total,
            "pairwise_agreement": same / total if total else None,
            "ratings_compared": len(gaps), "mean_rating_gap": sum(gaps) / len(gaps) if gaps else None}


def person_orders(v: Verdicts, min_gap: float) -> dict[str, dict[tuple[int, int], int]]:
    """Each person's decided pairs of one item: (a, b) with a < b → +1 for a ≻ b, −1 for b ≻ a."""
    out: dict[str, dict[tuple[int, int], int]] = defaultdict(dict)
    for pair, by in v.votes.items():
        for who, sign in by.items():
            out[who][pair] = sign
    for who in {who for by in v.ratings.values() for who in by}:
        mine = {c: by[who] for c, by in v.ratings.items() if who in by}
        for a, b in combinations(sorted(mine), 2):
            if abs(mine[a] - mine[b]) >= min_gap:
                out[who].setdefault((a, b), 1 if mine[a] > mine[b] else -1)
    return out


def win_rates(store: Store) -> dict[str, dict]:
    """Blind comparisons by model: "B vs A" with B's wins, losses and ties, its win rate (ties count half) and a 95%
    Wilson interval. A is the model of the first candidate where the comparison was first met (the first
    `generate` output given to `llmft annotate candidates`), whichever side each item shows it on."""
    counts: dict[tuple[str, str], list[int]] = {}  # (B, A) → wins, losses, ties of B
    for j in store.current():
        if j.action != "compare":
            continue
        names = [" + ".join(c.sources) or f"answer {i + 1}" for i, c in enumerate(store.by_id[j.item].candidates)]
        b, a = names[1], names[0]
        flip = (a, b) in counts
        key = (a, b) if flip else (b, a)
        winner = j.line.get("winner")
        tally = counts.setdefault(key, [0, 0, 0])
        tally[2 if winner is None else 0 if (winner == 1) != flip else 1] += 1
    out = {}
    for (b, a), (w, lo, t) in counts.items():
        n = w + lo + t
        rate = (w + t / 2) / n
        out[f"{b} vs {a}"] = {"n": n, "wins": w, "losses": lo, "ties": t, "win_rate": rate, "ci95": wilson(rate, n)}
    return out


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a proportion p over n trials:
    (p + z²/2n ± z √(p(1 − p)/n + z²/4n²)) / (1 + z²/n)."""
    centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


def position_bias(store: Store) -> dict:
    """How often the answer a person preferred (best pick, top of a ranking, blind winner) was the one shown first,
    against the chance rate 1/K."""
    first = total = 0
    chance = 0.0
    for j in store.current():
        winner = preferred(j)
        if winner is None:
            continue
        total += 1
        first += j.line["shown"][0] == winner
        chance += 1 / len(j.line["shown"])
    return {"choices": total, "first_shown_preferred": first / total if total else None,
            "chance": chance / total if total else None}


def preferred(j: Judgement) -> int | None:
    return {"pick": j.line.get("best"), "compare": j.line.get("winner"),
            "rank": (j.line.get("order") or [None])[0]}.get(j.action)


def write_rows(rows: list[dict], out: str | Path) -> None:
    atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def report(store: Store, min_gap: float = 1.0) -> dict:
    """What the annotations hold: items finished per person, agreement, position bias, blind win rates."""
    said = sum(j.action == "critique" and bool(j.line["text"].strip()) for j in store.current())
    return {"candidates": store.items.path, "items": len(store.items), "judgements": len(store.judgements),
            "critiques": said,
            "finished_by": {a: len(store.finished(a)) for a in store.annotators()},
            "agreement": agreement(store, min_gap), "position_bias": position_bias(store),
            "win_rates": win_rates(store)}
