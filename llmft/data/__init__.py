"""Data: reading rows from files, the chat template's rules for prompts and answers, and each stage's
tokenised examples (SFT rows, preference pairs, labelled answers, RL prompts)."""
