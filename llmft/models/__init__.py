"""Loading a model and running it: what a model name refers to, the weights (quantised, adapters merged,
no Hub kernels), LoRA adapters, the forward passes every log-prob goes through, and the reward model."""
