"""`llmft loop`: rounds of answers, feedback (programs, critiques, people), training rows and a trained policy whose
reference is the previous round's; a killed loop goes on to the same result."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from llmft.config import load_config
from llmft.errors import ConfigError
from llmft.judges.text import rouge_l
from llmft.loop import rounds
from llmft.loop import rows as rules
from llmft.loop.config import LoopConfig
from tests.helpers.tiny import ROWS

SHORT = '''
def short(prompts, answers, rows):
    """Shorter is better; what is long is said to be."""
    return [{"score": -len(a), "critique": "the answer is too long: say it in a few words" if len(a) > 8 else ""}
            for a in answers]
'''


# --------------------------------------------------------------------------------------------- the rules
def test_best_and_worst_pairs_the_first_of_equals_and_nothing_when_all_tie():
    assert rules.best_and_worst([0.5, 1.0, 0.0, 1.0, 0.0]) == (1, 2)
    assert rules.best_and_worst([0.3, 0.3]) is None


def test_the_answer_to_refine_is_the_worst_criticised_one():
    assert rules.to_refine([0.0, 0.5, 0.2], ["", "no commas", "too short"]) == 2  # 0.0 has no critique
    assert rules.to_refine([0.0, 0.5], ["", " "]) is None


def test_a_refinement_is_kept_only_when_it_beats_the_answer():
    assert rules.best_refinement(0.5, [0.25, 1.0, 1.0]) == 1
    assert rules.best_refinement(0.5, [0.5, 0.25]) is None
    assert rules.best_refinement(0.5, []) is None
    assert rules.best_refinement(0.5, [1.0, 0.75], [0.1, 0.4], min_overlap=0.3) == 1  # 1.0 is not an edit
    assert rules.best_refinement(0.5, [1.0], [0.1], min_overlap=0.3) is None


def test_the_refinement_conversation_shows_the_answer_then_the_critique():
    msgs = rules.refinement_messages([{"role": "user", "content": "no commas please"}], "a, b", "uses commas",
                                     "Fix: {critique}.")
    assert msgs == [{"role": "user", "content": "no commas please"}, {"role": "assistant", "content": "a, b"},
                    {"role": "user", "content": "Fix: uses commas."}]
    assert rules.sft_rows([rules.pair_row("p", "c", "r", (1.0, 0.0))]) == [{"prompt": "p", "completion": "c"}]


# ------------------------------------------------------------------------------------------------ a loop
@pytest.fixture
def loop_config(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "loopjudge.py").write_text(SHORT)
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"],
                                           "constraints": [{"type": "lowercase"}]}) + "\n" for r in ROWS))

    def make(**keys) -> LoopConfig:
        raw = {"model": {"name": str(tiny_model_dir)}, "prompts": str(prompts), "rounds": 2, "prompts_per_round": 4,
               "answers": 3, "sampling": {"temperature": 1.0, "max_new_tokens": 8},
               "feedback": {"judges": {"loopjudge:short": 1.0}, "missing_eos_penalty": 0.0},
               "held_out": {"prompts": str(prompts), "judges": ["constraints", "rouge_l"], "max_new_tokens": 6},
               "train": {"train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "save_every": 1},
                         "lora": {"r": 4, "alpha": 8}},
               "output_dir": str(tmp_path / "loop"), "device": "cpu"}
        for key, value in keys.items():
            raw[key] = value
        return load_config("loop", None, base=raw, schema=LoopConfig)

    return make


def manifest(path) -> dict:
    return json.loads((path / "llmft.json").read_text())


def test_each_round_trains_from_the_last_and_reports_against_it(loop_config, tmp_path):
    record = rounds.run(loop_config())
    r1, r2 = record["rounds"]
    assert r2["policy"] == r1["model"] == str(tmp_path / "loop/round-1/model")
    assert manifest(tmp_path / "loop/round-2/model")["config"]["model"]["name"] == r1["model"]  # its reference
    assert r1["prompts"] != r2["prompts"]  # the next slice of prompts
    pairs = [json.loads(x) for x in (tmp_path / "loop/round-1/train.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (tmp_path / "loop/round-1/feedback.jsonl").read_text().splitlines()]
    for p, line in zip(pairs, judged, strict=False):
        scores = [a["score"] for a in line["answers"]]
        assert p["scores"] == [max(scores), min(scores)] and p["chosen"] != p["rejected"]
    assert len(pairs) == r1["rows"] > 0
    assert set(r2["report"]["win_rate"]) == {"constraints", "rouge_l"}
    assert 0 <= r2["report"]["constraints/pass_rate"] <= 1
    saved = json.loads((tmp_path / "loop/loop.json").read_text())
    assert saved["rounds"] == record["rounds"] and "measured" in saved


def test_refine_shows_the_critique_and_keeps_rewrites_that_score_higher(loop_config, tmp_path):
    record = rounds.run(loop_config(method="refine", rounds=1, refine={"attempts": 3, "min_overlap": 0.0}))
    refined = [json.loads(x) for x in (tmp_path / "loop/round-1/refinements.jsonl").read_text().splitlines()]
    assert refined and all(len(r["refinements"]) == 3 and r["critique"] for r in refined)
    kept = [r for r in refined if r["chosen"] is not None]
    pairs = [json.loads(x) for x in (tmp_path / "loop/round-1/train.jsonl").read_text().splitlines()]
    assert len(pairs) == len(kept) == record["rounds"][0]["rows"]
    for r, p in zip(kept, pairs, strict=True):
        best = r["refinements"][r["chosen"]]
        assert best["score"] == -len(best["text"]) > r["score"]  # the judge's score, above the answer's
        assert (p["chosen"], p["rejected"], p["critique"]) == (best["text"], r["answer"], r["critique"])
        assert p["prompt"] in [row["prompt"] for row in ROWS]  # trained on the request alone
    assert all(t["overlap"] == rouge_l(t["text"], r["answer"]) for r in refined for t in r["refinements"])
    said = record["rounds"][0]["report"]["refine"]
    assert (said["criticised"], said["rewrites"]) == (len(refined), 3 * len(refined))
    assert said["improved"] == len(kept) / len(refined)


def test_a_rewrite_that_is_not_an_edit_of_the_answer_is_not_kept(loop_config, tmp_path, tiny_model_dir):
    record = rounds.run(loop_config(method="refine", rounds=1, held_out={"prompts": None},
                                    refine={"attempts": 3, "min_overlap": 0.5, "model": str(tiny_model_dir)}))
    refined = [json.loads(x) for x in (tmp_path / "loop/round-1/refinements.jsonl").read_text().splitlines()]
    better = [t for r in refined for t in r["refinements"] if t["score"] > r["score"]]
    assert better and any(t["overlap"] < 0.5 for t in better)  # some would be kept without the guard
    for r in refined:
        ok = [t["score"] for t in r["refinements"] if t["score"] > r["score"] and t["overlap"] >= 0.5]
        assert (r["chosen"] is None) == (not ok)
        assert r["chosen"] is None or r["refinements"][r["chosen"]]["score"] == max(ok)
    assert record["rounds"][0]["rows"] == sum(r["chosen"] is not None for r in refined)


def test_trainer_sft_fine_tunes_on_each_prompts_best_answer(loop_config, tmp_path):
    record = rounds.run(loop_config(rounds=1, trainer="sft", held_out={"prompts": None},
                                    train={"train": {"max_steps": 2, "batch_size": 2}, "lora": {"r": 4, "alpha": 8}}))
    rows = [json.loads(x) for x in (tmp_path / "loop/round-1/train.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (tmp_path / "loop/round-1/feedback.jsonl").read_text().splitlines()]
    best = [max(line["answers"], key=lambda a: a["score"])["text"] for line in judged
            if len({a["score"] for a in line["answers"]}) > 1]
    assert [r["completion"] for r in rows] == best and set(rows[0]) == {"prompt", "completion"}
    assert manifest(tmp_path / "loop/round-1/model")["stage"] == "sft" and record["rounds"][0]["trained"]


def test_a_killed_loop_goes_on_to_the_uninterrupted_result(loop_config, tmp_path, monkeypatch):
    whole = rounds.run(loop_config(output_dir=str(tmp_path / "whole")))
    real, calls = rounds.train, []

    def killed(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while round 2 trains
        return real(*args)

    monkeypatch.setattr(rounds, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        rounds.run(loop_config())
    monkeypatch.setattr(rounds, "train", real)
    sampled = []
    monkeypatch.setattr(rounds, "answer", lambda *args: sampled.append(1))
    again = rounds.run(loop_config())
    assert sampled == []  # nothing sampled again: round 1 was done, round 2 had its answers
    strip = [{k: v for k, v in r.items() if k not in ("policy", "model", "files")} for r in whole["rounds"]]
    assert [{k: v for k, v in r.items() if k not in ("policy", "model", "files")} for r in again["rounds"]] == strip
    for name in ("answers.jsonl", "feedback.jsonl", "train.jsonl"):
        assert (tmp_path / "loop/round-2" / name).read_text() == (tmp_path / "whole/round-2" / name).read_text()


def test_people_judge_a_round_on_the_page_and_their_picks_become_pairs(loop_config, tmp_path, free_port):
    cfg = loop_config(rounds=1, held_out={"prompts": None}, people={"items": 2, "port": free_port,
                                                                     "poll_seconds": 0.05})
    result = {}
    thread = threading.Thread(target=lambda: result.update(rounds.run(cfg)))
    thread.start()
    url = f"http://127.0.0.1:{free_port}"
    picked = []
    for _ in range(2):
        view = wait_for(lambda: get(f"{url}/api/item?annotator=ann"))
        item = view["item"]
        best = item["candidates"][-1]["index"]
        picked.append(next(c["text"] for c in item["candidates"] if c["index"] == best))
        post(f"{url}/api/judge", {"annotator": "ann", "item": item["id"], "action": "pick", "best": best})
        post(f"{url}/api/judge", {"annotator": "ann", "item": item["id"], "action": "done"})
    thread.join(timeout=120)
    pairs = [json.loads(x) for x in (tmp_path / "loop/round-1/train.jsonl").read_text().splitlines()]
    assert {p["chosen"] for p in pairs} == set(picked) and result["rounds"][0]["trained"]
    people = result["rounds"][0]["report"]["people"]
    assert people["items_judged"] == 2 and people["position_bias"]["choices"] == 2


def test_the_loop_refuses_what_it_cannot_do(loop_config, tmp_path):
    with pytest.raises(ConfigError, match="train.output_dir is the loop's own"):
        rounds.run(loop_config(train={"output_dir": "x"}))
    with pytest.raises(ConfigError, match="refine needs critiques"):
        rounds.run(loop_config(method="refine", feedback={"judges": {"rouge_l": 1.0}}, output_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match=r"loop config, train \(llmft schema dpo\): unknown key 'train.nope'"):
        rounds.run(loop_config(train={"train": {"nope": 1}}, output_dir=str(tmp_path / "b")))
    rounds.run(loop_config(rounds=1, held_out={"prompts": None}, output_dir=str(tmp_path / "c")))
    with pytest.raises(ConfigError, match="'answers' differs"):
        rounds.run(loop_config(rounds=1, answers=2, held_out={"prompts": None}, output_dir=str(tmp_path / "c")))
    with pytest.raises(ConfigError, match="'train.train.max_steps' differs"):
        rounds.run(loop_config(rounds=1, held_out={"prompts": None}, output_dir=str(tmp_path / "c"),
                               train={"train": {"max_steps": 3, "batch_size": 2}, "lora": {"r": 4, "alpha": 8}}))


def test_the_trainers_keys_can_be_set_from_the_command_line(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("prompts: p.jsonl\ntrain:\n  loss: {beta: 0.2}\n")
    cfg = load_config("loop", path, ["train.train.max_steps=3"], schema=LoopConfig)
    assert cfg.train == {"loss": {"beta": 0.2}, "train": {"max_steps": 3}}
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config("loop", path, ["trian.train.max_steps=3"], schema=LoopConfig)


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def wait_for(call, seconds: float = 120.0):
    """call() once it stops failing (the page is up once the round has sampled its answers)."""
    end = time.time() + seconds
    while True:
        try:
            return call()
        except OSError:
            if time.time() > end:
                raise
            time.sleep(0.1)
