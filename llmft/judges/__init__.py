"""Judges: programs that score answers exactly (no model can argue with them).

A judge takes (prompts, answers, rows) — the prompt texts, the answer texts and the data rows they came
from — and returns one finite score per answer. `make_judge` builds one by name for `llmft eval` and for
PPO's reward: constraints, bleu, rouge_l, meteor, or a user's `module:function`.
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


def user_judge(spec: str) -> Judge:
    """A user's `module:function(prompts, answers, rows)`; whatever it raises or returns amiss becomes one clear
    error naming it."""
    module, _, func = spec.partition(":")
    try:
        fn = getattr(import_from_here(module), func)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"judge '{spec}': cannot import {func} from {module}: {e} (modules are found on "
                          f"PYTHONPATH and in the working directory)") from None

    def call(prompts: list[str], answers: list[str], rows: list[dict]) -> list[float]:
        try:
            result = fn(prompts, answers, rows)
        except Exception as e:  # noqa: BLE001 - the user's code
            raise ConfigError(f"judge '{spec}' raised {type(e).__name__}: {e}") from None
        try:
            scores = [float(s) for s in result]
        except (TypeError, ValueError):
            scores = None
        if scores is None or len(scores) != len(answers) or not all(math.isfinite(s) for s in scores):
            raise ConfigError(f"judge '{spec}' must return one finite number per answer ({len(answers)}), "
                              f"got {str(result)[:80]}")
        return scores

    return call
