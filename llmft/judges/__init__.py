"""Judges: programs that score answers exactly (no model can argue with them).

A judge takes (prompts, answers, rows) — the prompt texts, the answer texts and the data rows they came
from — and returns one finite score per answer. `make_judge` builds one by name for `llmft eval` and for
PPO's reward: constraints, bleu, rouge_l, meteor, or a user's `module:function`.

Some judges can also say what is wrong in words: `make_critic` gives, for constraints, substance and a user's
function that returns {"score": x, "critique": "..."} per answer, one sentence per answer ("" when nothing is wrong),
so that a loop can run on critiques without people.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable

from llmft.data.records import Record
from llmft.errors import ConfigError, DataError

Judge = Callable[[list[str], list[str], list[dict]], list[float]]  # (prompts, answers, rows) → scores
Critic = Callable[[list[str], list[str], list[dict]], list[str]]  # (prompts, answers, rows) → what is wrong, or ""
Judgement = Callable[[list[str], list[str], list[dict]], tuple[list[float], list[str]]]  # → (scores, critiques)
NAMES = ("constraints", "substance", "bleu", "rouge_l", "meteor")


def make_judge(name: str, records: list[Record], reference_column: str = "completion") -> Judge:
    """A judge by name, after checking that every row has what it needs."""
    from llmft.judges import constraints, text

    if name == "constraints":
        for r in records:
            if "constraints" not in r.row:
                raise DataError(f"{r.where}: the constraints judge needs a 'constraints' column")
            constraints.validate(r.row["constraints"], r.where)
        return lambda prompts, answers, rows: [constraints.Verdict(constraints.check(row["constraints"], resp)).score
                                                 for resp, row in zip(answers, rows, strict=True)]
    if name == "substance":
        from llmft.judges.substance import substance

        return lambda prompts, answers, rows: [substance(resp) for resp in answers]
    if name in ("bleu", "rouge_l", "meteor"):
        col = reference_column
        for r in records:
            if not isinstance(r.row.get(col), str):
                raise DataError(f"{r.where}: the {name} judge needs a text column '{col}' (reference_column)")
        fn = meteor_fn() if name == "meteor" else text.bleu if name == "bleu" else text.rouge_l
        return lambda prompts, answers, rows: [fn(resp, row[col]) for resp, row in zip(answers, rows, strict=True)]
    if ":" in name:
        return user_judge(name)
    raise ConfigError(f"unknown judge '{name}' ({', '.join(NAMES)}, reward, or module:function)")


def make_critic(name: str, records: list[Record]) -> Critic | None:
    """The judge's critic by name, when it has one (the rows checked as for `make_judge`); None for the judges
    that only score (bleu, rouge_l, meteor)."""
    from llmft.judges import constraints, substance

    if name == "constraints":
        make_judge(name, records)  # the same checks of every row
        return lambda prompts, answers, rows: [constraints.critique(row["constraints"], a)
                                               for a, row in zip(answers, rows, strict=True)]
    if name == "substance":
        return lambda prompts, answers, rows: [substance.critique(a) for a in answers]
    if ":" in name:
        return user_judge(name, part="critique")
    return None


def make_judgement(name: str, records: list[Record], reference_column: str = "completion") -> Judgement:
    """The judge and its critic as one call, (prompts, answers, rows) → (scores, critiques): a user's function is
    called once for both; the critiques are "" for a judge that only scores."""
    if ":" in name:
        both = user_judge(name, part="both")
        return lambda prompts, answers, rows: split(both(prompts, answers, rows))
    judge, critic = make_judge(name, records, reference_column), make_critic(name, records)
    return lambda prompts, answers, rows: (judge(prompts, answers, rows),
                                           critic(prompts, answers, rows) if critic else [""] * len(answers))


def split(verdicts: list[tuple[float, str]]) -> tuple[list[float], list[str]]:
    return [v[0] for v in verdicts], [v[1] for v in verdicts]


def join_critiques(said: list[list[str]], n: int) -> list[str]:
    """Several critics' sentences (one list per critic, one sentence per answer) → one line per answer: the
    sentences that are not empty, joined by "; " ("" when no critic found a fault)."""
    return ["; ".join(s for s in per if s) for per in zip(*said, strict=True)] if said else [""] * n


def meteor_fn() -> Callable[[str, str], float]:
    """METEOR with its matching stages built once (nltk's stemmer; WordNet synonyms when installed)."""
    from llmft.judges.meteor import default_stages, meteor

    stages = default_stages()
    return lambda candidate, reference: meteor(candidate, reference, stages)


def import_from_here(module: str):
    """Import `module` as `python -m` would: the working directory first on the path (the `llmft` command itself,
    an installed script, does not have it there)."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module)
    finally:
        if added:
            sys.path.remove(here)


def user_judge(spec: str, part: str = "score"):
    """A user's `module:function(prompts, answers, rows)`, returning per answer a number or {"score": number,
    "critique": text}: its scores, its critiques ("" for a bare number), or `both` as (score, critique) pairs.
    Whatever it raises or returns amiss becomes one clear error naming it."""
    module, _, func = spec.partition(":")
    try:
        fn = getattr(import_from_here(module), func)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"judge '{spec}': cannot import {func} from {module}: {e} (modules are found on "
                          f"PYTHONPATH and in the working directory)") from None

    def call(prompts: list[str], answers: list[str], rows: list[dict]) -> list:
        try:
            result = list(fn(prompts, answers, rows))
        except Exception as e:  # noqa: BLE001 - the user's code
            raise ConfigError(f"judge '{spec}' raised {type(e).__name__}: {e}") from None
        verdicts = [verdict(v) for v in result] if len(result) == len(answers) else None
        if verdicts is None or any(v is None for v in verdicts):
            raise ConfigError(f"judge '{spec}' must return one finite number per answer ({len(answers)}), or "
                              f"{{score, critique}} objects, got {str(result)[:80]}")
        return verdicts if part == "both" else [v[part == "critique"] for v in verdicts]

    return call


def verdict(value: object) -> tuple[float, str] | None:
    """(score, critique) of one answer's judgement: a number, or {"score": number, "critique": text}."""
    said = ""
    if isinstance(value, dict):
        value, said = value.get("score"), value.get("critique", "")
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return (score, said) if math.isfinite(score) and isinstance(said, str) else None
