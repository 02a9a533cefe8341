"""``python -m megatron_mtp_rl.rollout.die_with_parent PPID CMD...``: exec CMD, killed when PPID dies.

The SGLang engines and router run in sessions of their own (so their whole process tree can be
signalled), which also puts them out of reach of whatever kills the trainer: a trainer that is
SIGKILLed, OOM-killed or told to exit at once would leave servers holding the GPUs and ports for
the next job. Linux's parent-death signal (``PR_SET_PDEATHSIG``) survives ``execve``, so this
wrapper sets it and becomes the server; SGLang's own workers die with their leader. (Set in a
``preexec_fn`` instead, it would run between fork and exec of a multi-threaded trainer.)
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def arm_parent_death_signal() -> None:
    """Linux: the kernel SIGKILLs this process when the thread that started it dies (elsewhere: a no-op,
    the trainer's own shutdown still stops it). Used here and by the reward workers."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m megatron_mtp_rl.rollout.die_with_parent PPID CMD [ARGS...]")
    expected_parent, cmd = int(argv[0]), argv[1:]
    arm_parent_death_signal()
    if os.getppid() != expected_parent:
        sys.exit(1)  # the trainer died before the signal was armed
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
