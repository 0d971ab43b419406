"""Write the calculator example's rows: RL rows {a, b} (train and held-out) and SFT demonstrations of the tool in use
(`python -m examples.calculator.make_data OUT_DIR`)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from examples.calculator.calculator import Calculator, question


def pairs(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(rng.randint(10_000, 99_999), rng.randint(10_000, 99_999)) for _ in range(n)]


def demonstration(a: int, b: int) -> dict:
    """A conversation in which the tool is used, with the tools' schemas as the environment offers them."""
    from transformers.utils import get_json_schema

    call = json.dumps({"name": "add", "arguments": {"a": a, "b": b}})
    return {"tools": [get_json_schema(Calculator().add)], "messages": [{"role": "user", "content": question(a, b)},
                         {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
                         {"role": "tool", "name": "add", "content": str(a + b)},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}


def main(out: Path) -> None:
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 256), ("eval", 64)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"a": a, "b": b}) + "\n" for a, b in pairs(rng, n)))
    (out / "sft.jsonl").write_text("".join(json.dumps(demonstration(a, b)) + "\n" for a, b in pairs(rng, 64)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/calculator"))
