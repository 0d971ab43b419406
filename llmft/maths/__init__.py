"""The maths, in pure functions of tensors with their equations: the losses of every stage and the RL
quantities (advantages, KL, whitening, running moments)."""
