"""A training run: the step plan, the optimizer, the loop every stage shares, its logs and its output folder."""
