"""Fault injection for the reliability tests: ``MTP_RL_FAULTS="nan_loss@2,crash_in_save@4"``.

Each entry is ``name@step``. Off unless the variable is set; checked at a handful of named
points (``nan_loss`` in the train step, ``crash_in_save`` between writing a checkpoint's
shards and publishing it, ``kill_engine_actor`` — ``--ray`` with SGLang engines — as the step's
first generation begins: the last engine actor is killed, cluster/engine_recovery.py brings it back).
"""

from __future__ import annotations

import os

current_step = 0


def active(name: str) -> bool:
    spec = os.environ.get("MTP_RL_FAULTS", "")
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        fault, _, step = entry.partition("@")
        if fault == name and (not step or int(step) == current_step):
            return True
    return False
