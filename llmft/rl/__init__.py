"""What the RL stages (ppo, grpo) share around their algorithms: the roles on one base, the set-up, the
reward, and the stage plumbing (sampling, the sampler-vs-trainer check, greedy evaluation)."""
