"""What the tests share: tiny models and data, running llmft as a user does, the model families, a fake CUDA
device. Tests import helpers from here, never from each other."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
