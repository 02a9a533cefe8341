"""User mistakes that end a run with one line (``error: ...``, exit code 2), never a traceback.

Torch-free so the CLI can catch them without importing the training stack.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# How long a rank other than 0 waits for the launcher before printing the error itself: ranks reach the
# same check seconds apart on a loaded machine (imports), and rank 0 must print before torchrun ends it.
PEER_GRACE_S = 60.0


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


def print_user_error(line: str, code: int = 2) -> None:
    """Print a user mistake's line once per job: rank 0 at once, another rank only if it outlives a grace.

    Every rank of a torchrun job parses the same flags and checks the same configuration, so every rank
    would print the same line. The others wait instead (up to ``PEER_GRACE_S``): when rank 0 had the same
    error, the launcher ends them meanwhile, and its SIGTERM (or SIGINT) exits with ``code`` like rank 0; a rank still
    running after the grace saw an error rank 0 did not, and prints it.
    """
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        rank, world = 0, 1
    if rank != 0 and world > 1 and threading.current_thread() is threading.main_thread():

        def _exit(signum, frame):
            sys.stdout.flush()
            os._exit(code)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit)
        time.sleep(PEER_GRACE_S)
    print(line, file=sys.stderr, flush=True)
