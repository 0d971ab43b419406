"""Sampling answers from a policy: generation with the KV cache and llmft's own token draw, and the
`Experience` a batch of sampled answers becomes."""
