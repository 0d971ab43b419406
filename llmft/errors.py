"""The errors llmft reports to users as one clear line (the CLI prints them without a traceback)."""


class LlmftError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in llmft."""


class ConfigError(LlmftError):
    """A config file or --set override is missing, malformed, or has a bad key or value."""


class DataError(LlmftError):
    """A dataset file is missing, malformed, empty, or has a bad row."""


class ModelError(LlmftError):
    """A model source cannot be resolved or loaded."""


class RunError(LlmftError):
    """The output directory or a checkpoint is in a state that forbids the run."""


class TrainingAborted(LlmftError):
    """Training stopped on purpose (e.g. a non-finite loss); the last good checkpoint is kept."""
