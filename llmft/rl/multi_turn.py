"""Multi-turn rollouts: the policy's turns alternate with an environment's (`env:`), one conversation per trajectory,
all trajectories of a step advancing together one policy turn at a time (one batched generation per turn).

    start     env = Class(**env.args); messages = env.reset(row); the opening rendered with the tools → prompt ids
    turn      the engine samples every live trajectory's next turn from its whole sequence so far (token ids in,
              token ids out), cut at the first stop id and at the token budget                 [mask 1]
    respond   tool calls → llmft runs them; none → env.step(messages) → observations, reward, done
    extend    the observations' tokens (the rendering's new suffix: `env.conversation`)             [mask 0]

The result is one `Answer` per trajectory whose answer ids hold everything after the opening and whose mask is 1 on
the policy's tokens only, so `pack`, the trainer's log-probs, the sampler-vs-trainer check and the losses see
exactly the tokens the policy chose. A trajectory's score is the sum of its turns' rewards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from llmft import distributed
from llmft.data.prompts import PromptSet
from llmft.data.records import Record, read_all
from llmft.env import conversation as conv
from llmft.env.protocol import EnvError, call, check_messages, environment_class, make_environment, step_result
from llmft.env.tools import call_format, parse_calls, run_call, schemas, tool_table
from llmft.errors import ConfigError, DataError
from llmft.rollout.experience import pack
from llmft.rollout.generation import Answer

TURN_SEED = 104_729  # a turn's sampling seed: the step's + TURN_SEED × turn


@dataclass
class Trajectory:
    """One conversation being rolled out."""

    record: Record
    env: object
    messages: list[dict]  # the conversation so far; a policy turn as {"role": "assistant", "content": what it wrote}
    prompt_ids: list[int]  # the opening, through the generation prompt
    text: str  # the rendering of everything in prompt_ids + ids (the template's view of the sequence)
    opening: int  # how many of the messages are the opening
    ids: list[int] = field(default_factory=list)  # every token after the opening: the policy's and the environment's
    mask: list[int] = field(default_factory=list)  # 1 on the policy's tokens
    logprobs: list[float] = field(default_factory=list)  # the sampler's log-prob of each policy token, 0 elsewhere
    rewards: list[float] = field(default_factory=list)  # one per policy turn (0 where none)
    ends: list[int] = field(default_factory=list)  # one per policy turn: the index in ids of its last token
    tool_calls: int = 0
    tool_errors: int = 0
    finished: bool = True  # the last policy turn ended with a stop id
    cut: bool = False  # stopped by env.max_tokens
    failed: str | None = None  # the environment's error (env.on_error: zero)
    over: bool = False

    @property
    def turns(self) -> int:
        return len(self.rewards)

    @property
    def turn_scores(self) -> list[float]:
        return [0.0] * self.turns if self.failed else self.rewards

    @property
    def score(self) -> float:
        return sum(self.turn_scores)

    def answer(self) -> Answer:
        final = next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")
        return Answer(self.prompt_ids, self.ids, final.strip(), self.finished and not self.cut, self.logprobs,
                      self.mask)

    def sample_row(self) -> dict:
        """The whole trajectory for samples.jsonl: its turns (tool calls, observations) and per-turn rewards."""
        return {"prompt": self.messages[self.opening - 1]["content"], "turns": self.messages[self.opening:],
                "turn_rewards": self.rewards, "cut": self.cut, "error": self.failed}


class Conversations:
    """The environment a run names, checked at start: its class, its tools' schemas, the template's tool format and
    that the template is prefix-preserving for the turns it produces."""

    def __init__(self, cfg, chat):
        self.cfg, self.chat = cfg.env, chat
        conv.check_template(chat)
        self.cls = environment_class(self.cfg.name)
        probe = make_environment(self.cls, self.cfg.args)
        self.tools = schemas(list(getattr(probe, "tools", None) or []))
        self.format = call_format(chat.tokenizer.chat_template) if self.tools else None

    def prompts(self, path, split: str, max_length: int) -> PromptSet:
        """Every row's opening rendered with the tools (each row reset by an instance of its own), too-long ones
        dropped and counted; the template's prefix self-test on the first."""
        prompts = self.prompts_of(read_all(path, split), max_length)
        if not prompts.ids:
            raise DataError(f"{path}: no opening fits data.max_prompt_length={max_length} ({prompts.too_long} longer)")
        return prompts

    def prompts_of(self, rows: list[Record], max_length: int | None = None) -> PromptSet:
        records, ids, too_long = [], [], 0
        for r in rows:
            opening = self.reset(make_environment(self.cls, self.cfg.args), r)
            if not records:
                conv.prefix_self_test(self.chat, opening, self.tools, self.format, f"{r.where} (env self-test)")
            p = self.chat.ids(conv.render(self.chat, opening, self.tools, r.where))
            if max_length is not None and len(p) > max_length:
                too_long += 1
                continue
            records.append(r)
            ids.append(p)
        return PromptSet(records, ids, too_long)

    def reset(self, env, record: Record) -> list[dict]:
        try:
            opening = call(f"{self.cls.__name__}.reset", self.cfg.timeout, env.reset, dict(record.row))
            check_messages(opening, "reset")
        except EnvError as e:
            raise DataError(f"{record.where}: env {e}") from None
        return opening

    def start(self, record: Record) -> Trajectory:
        env = make_environment(self.cls, self.cfg.args)
        opening = self.reset(env, record)
        text = conv.render(self.chat, opening, self.tools, record.where)
        return Trajectory(record, env, list(opening), self.chat.ids(text), text, len(opening))

    # ------------------------------------------------------------------------------------------- turns
    def rollout(self, engine, model, records: list[Record], sampling) -> list[Trajectory]:
        """Every record's trajectory, all advancing one policy turn per batched generation. Every process runs
        env.max_turns generations unless all are over everywhere (the engine's weight sync is collective)."""
        trajectories = [self.start(r) for r in records]
        for turn in range(self.cfg.max_turns):
            live = [t for t in trajectories if not t.over]
            if not distributed.any_rank(bool(live)):
                break
            turn_sampling = dataclasses.replace(sampling, seed=sampling.seed + TURN_SEED * turn)
            answers = engine.sample(model, [t.prompt_ids + t.ids for t in live], turn_sampling, logprobs=True)
            for t, a in zip(live, answers, strict=True):
                self.advance(t, a, last_turn=turn + 1 == self.cfg.max_turns)
        return trajectories

    def advance(self, t: Trajectory, a: Answer, last_turn: bool) -> None:
        """Take the policy's turn into the trajectory, then the environment's answer to it."""
        left = self.cfg.max_tokens - len(t.ids)
        ids, logprobs = a.answer_ids[:left], (a.logprobs or [0.0] * len(a.answer_ids))[:left]
        t.finished = a.finished and len(ids) == len(a.answer_ids)
        t.ids += ids
        t.mask += [1] * len(ids)
        t.logprobs += logprobs
        t.ends.append(len(t.ids) - 1)
        content = conv.assistant_content(self.chat, ids, t.finished)
        t.messages.append({"role": "assistant", "content": content})
        t.rewards.append(0.0)
        if not t.finished:  # ran into max_new_tokens or the budget: no turn end to go on from
            t.cut, t.over = len(ids) < len(a.answer_ids) or len(t.ids) >= self.cfg.max_tokens, True
            return
        t.text += self.chat.answer_text(content)
        try:
            observations, done = self.respond(t, content)
        except EnvError as e:
            return self.fail(t, str(e))
        if done or last_turn:
            t.over = True
            return
        self.extend(t, observations)

    def respond(self, t: Trajectory, content: str) -> tuple[list[dict], bool]:
        """The tools' results when the turn calls tools; else the environment's step."""
        calls = parse_calls(content, self.format) if self.tools else []
        if calls:
            table = tool_table(list(t.env.tools))
            t.messages[-1]["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                            for c in calls]
            results = [run_call(table, c, self.cfg.timeout) for c in calls]
            t.tool_calls += len(calls)
            t.tool_errors += sum(failed for _, failed in results)
            return [{"role": "tool", "name": c.name, "content": text} for c, (text, _) in zip(calls, results,
                                                                                            strict=True)], False
        result = step_result(call(f"{self.cls.__name__}.step", self.cfg.timeout, t.env.step, list(t.messages)))
        t.rewards[-1] = result.reward or 0.0
        return result.messages or [], result.done

    def extend(self, t: Trajectory, observations: list[dict]) -> None:
        """The environment's turn: the rendering's new text as tokens, masked out; over the budget, the trajectory
        is cut before it."""
        t.messages += observations
        rendered = conv.render(self.chat, t.messages, self.tools, t.record.where)
        added = conv.following_ids(self.chat, t.text, rendered, t.record.where)
        if len(t.ids) + len(added) >= self.cfg.max_tokens:  # no room for the policy's next turn
            t.cut, t.over = True, True
            return
        t.ids += added
        t.mask += [0] * len(added)
        t.logprobs += [0.0] * len(added)
        t.text = rendered

    def fail(self, t: Trajectory, message: str) -> None:
        if self.cfg.on_error == "raise":
            raise DataError(f"{t.record.where}: env {message} (env.on_error: zero gives such a trajectory reward 0 "
                            f"instead)")
        t.failed, t.over = message, True


def sample_trajectories(conversations: Conversations, model, s, records: list[Record], seed: int,
                        greedy: bool = False):
    """(Experience [B], the parts of the score {"env": [B]}, the combined score [B], the trajectories)."""
    sampling = dataclasses.replace(s.cfg.rollout, seed=seed, **({"temperature": 0.0} if greedy else {}))
    trajectories = conversations.rollout(s.engine, model, records, sampling)
    exp = pack([t.answer() for t in trajectories], s.chat.pad_id, s.device)
    parts = {"env": torch.tensor([t.score for t in trajectories], dtype=torch.float32)}
    finished = torch.tensor([a.finished for a in exp.answers])
    return exp, parts, s.scorer.combine(parts, finished), trajectories


def turn_tensors(trajectories: list[Trajectory]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trajectory's turn scores [B, K] (0-padded) and the index of each turn's last token [B, K] (padded with
    the last turn's): what `maths.rl.turn_rewards` places."""
    k = max(t.turns for t in trajectories)
    scores = torch.tensor([t.turn_scores + [0.0] * (k - t.turns) for t in trajectories], dtype=torch.float32)
    ends = torch.tensor([t.ends + [t.ends[-1]] * (k - t.turns) for t in trajectories], dtype=torch.long)
    return scores, ends


def trajectory_metrics(trajectories: list[Trajectory]) -> dict:
    """env/…: turns per trajectory, tool calls and failed ones per trajectory, the shares cut by the budget and
    failed by the environment."""
    n = len(trajectories)
    return {"env/turns": sum(t.turns for t in trajectories) / n,
            "env/tool_calls": sum(t.tool_calls for t in trajectories) / n,
            "env/tool_errors": sum(t.tool_errors for t in trajectories) / n,
            "env/cut_ratio": sum(t.cut for t in trajectories) / n,
            "env/error_ratio": sum(t.failed is not None for t in trajectories) / n}


def check_env_config(cfg) -> None:
    if cfg.reward.model or cfg.reward.judges:
        raise ConfigError("reward.model / reward.judges: with env.name the environment scores each trajectory "
                          "(its step rewards); leave the reward sources empty")
    distributed.refuse_fsdp("env: a multi-turn rollout")
