"""The reward of a sampled answer: program judges and/or a reward model, combined with weights, a penalty
for an answer that reached no stop id, and optional running normalisation and clipping; `score_rollout` scores a
batch of answers with them."""

from __future__ import annotations

import torch

from llmft import distributed
from llmft.config import RewardSourcesConfig
from llmft.data.records import Record
from llmft.errors import ConfigError
from llmft.judges import make_judge
from llmft.maths.rl import RunningMoments
from llmft.models.sources import resolve_source
from llmft.rollout.experience import Experience
from llmft.run.plan import chunks

REWARD_MODEL = "reward_model"
ENV = "env"  # the part an environment scores (multi-turn rollouts)


class Scorer:
    def __init__(self, cfg: RewardSourcesConfig, records: list[Record], env: bool = False):
        """`env`: the trajectories' scores come from an environment (the part "env"), not from these sources."""
        if not cfg.model and not cfg.judges and not env:
            raise ConfigError("reward: name a reward model (reward.model) or at least one judge (reward.judges)")
        self.cfg = cfg
        self.judges = {name: make_judge(name, records, cfg.reference_column) for name in cfg.judges}
        self.weights = {**({REWARD_MODEL: cfg.model_weight} if cfg.model else {}), **cfg.judges}
        if env:
            self.weights = {ENV: 1.0}
        self.moments = RunningMoments()
        self.range = trained_range(cfg.model) if cfg.model and not env else None  # (low, high) or None

    def range_metrics(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """rewards/reward_model/out_of_range: the share of answers the reward model scores outside the range of its
        scores on its own training answers (what the alarm's reward_model_range watches)."""
        if self.range is None or REWARD_MODEL not in parts:
            return {}
        r, (low, high) = parts[REWARD_MODEL], self.range
        return {"rewards/reward_model/out_of_range": float(((r < low) | (r > high)).float().mean())}

    def parts(self, prompts: list[str], answers: list[str], rows: list[dict],
              model_scores: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Every source's raw scores [B] (fp32, CPU)."""
        out = {name: torch.tensor(judge(prompts, answers, rows), dtype=torch.float32)
               for name, judge in self.judges.items()}
        if model_scores is not None:
            out[REWARD_MODEL] = model_scores.float().cpu()
        return out

    def combine(self, parts: dict[str, torch.Tensor], finished: torch.Tensor) -> torch.Tensor:
        """The weighted sum [B] (reward.combine: min, the weighted scores' minimum), with the penalty for answers
        that never emitted EOS."""
        weighted = [self.weights[name] * parts[name] for name in self.weights]
        score = torch.stack(weighted).amin(0) if self.cfg.combine == "min" else sum(weighted)
        return score - self.cfg.missing_eos_penalty * (~finished).float()

    def shape(self, score: torch.Tensor) -> torch.Tensor:
        """What PPO optimises: the score, normalised by the running moments (updated with it first) and
        clipped when asked."""
        if self.cfg.normalize:
            self.moments.update(distributed.gather(score))  # the moments of every process's scores
            score = (score - self.moments.mean) / self.moments.std
        if self.cfg.clip is not None:
            score = score.clamp(-self.cfg.clip, self.cfg.clip)
        return score

    @property
    def scale(self) -> float:
        """The factor `shape` multiplies a score by (before its shift and clipping): 1 / the running std, or 1."""
        return 1.0 / self.moments.std if self.cfg.normalize else 1.0


def score_rollout(model, s, exp: Experience, rows: list[dict]):
    """Every source's scores and their combined score [B] (before normalisation), on the host (model: the
    ActorCritic, s: the RLSetup; not imported here, which the setup imports)."""
    model_scores = None
    if s.share_reward:
        model_scores = torch.cat([model.rewards(exp.input_ids[r], exp.attention_mask[r])
                                  for r in chunks(range(exp.size), s.cfg.train.batch_size)])
    elif s.external_reward:
        model_scores = s.external_reward.score_ids([g.prompt_ids + g.answer_ids for g in exp.answers])
    prompts = [s.chat.decode(g.prompt_ids) for g in exp.answers]
    parts = s.scorer.parts(prompts, [g.text for g in exp.answers], rows, model_scores)
    finished = torch.tensor([g.finished for g in exp.answers])
    return parts, s.scorer.combine(parts, finished)


def trained_range(path: str) -> tuple[float, float] | None:
    """reward_range/low and /high from a reward run's manifest (None for a run written before llmft recorded them)."""
    metrics = (resolve_source(path).manifest or {}).get("metrics", {})
    low, high = metrics.get("reward_range/low"), metrics.get("reward_range/high")
    return (float(low), float(high)) if isinstance(low, (int, float)) and isinstance(high, (int, float)) else None


def no_eos_share(exp: Experience) -> float:
    return 1 - sum(g.finished for g in exp.answers) / exp.size
