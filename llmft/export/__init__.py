"""`llmft export`: a run's adapter chain merged into a transformers model, or written as a GGUF file."""
