"""`llmft loop`: rounds of on-policy feedback (programs or people, scores or critiques) and training on it."""
