"""llmft: LLM post-training (SFT, reward, DPO, PPO) with LoRA, from the command line."""

__version__ = "0.1.0"
