"""User mistakes that end a run with one line (``error: ...``, exit code 2), never a traceback.

Torch-free so the CLI can catch them without importing the training stack.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A flag, config-file value or flag combination that cannot work; the message says which and why."""


class DataError(ValueError):
    """Input data that cannot be used (a malformed prompt row, a missing file); names the file and line."""


class UnsupportedCheckpoint(ConfigError):
    """An HF config (or our model) uses something the family mapping cannot represent exactly.

    A ConfigError, so a run that cannot export its model for SGLang ends with one line, not a traceback.
    """


class EngineStartError(RuntimeError):
    """A rollout engine (or its router) could not start; one line: the command, its exit code, its log's last lines."""


class EngineFailed(RuntimeError):
    """A rollout engine went away mid-run and could not be used; one line: which engine, its log."""


class TrainerFailed(RuntimeError):
    """A trainer actor (``--ray``) failed or died; one line: its rank, its node and what happened."""
