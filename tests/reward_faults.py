"""Reward functions that misbehave on purpose (reliability tests).

``flaky`` picks a behaviour from the prompt text: hang forever, raise, abort the process
(like a segfault in native code), or score by exact match. Before misbehaving it drops a
marker file in $REWARD_FAULT_DIR so the test knows how many calls should have failed.
"""

import os
import time
import uuid
from pathlib import Path


def _mark(kind: str) -> None:
    d = os.environ.get("REWARD_FAULT_DIR")
    if d:
        Path(d, f"{kind}-{uuid.uuid4().hex}").touch()


def kind_of(prompt: str) -> str:
    return {0: "hang", 1: "raise", 2: "abort"}.get(sum(map(ord, prompt)) % 5, "ok")


def flaky(prompt, response, label):
    kind = kind_of(prompt)
    if kind == "hang":
        _mark(kind)
        time.sleep(3600)
    if kind == "raise":
        _mark(kind)
        raise RuntimeError("reward function failed on purpose")
    if kind == "abort":
        _mark(kind)
        os.abort()
    return float(response.strip() == str(label))


def hang(prompt, response, label):
    time.sleep(3600)


def boom(prompt, response, label):
    raise ValueError("boom")


def abort(prompt, response, label):
    os.abort()


def ok(prompt, response, label):
    return 1.0


def nan(prompt, response, label):
    return float("nan")


def string(prompt, response, label):
    return "0.75"


def none(prompt, response, label):
    return None


def mixed(prompt, response, label):
    """NaN, the string "0.75" or a score, chosen by the prompt; marks each failing call."""
    kind = ("nan", "string", "ok")[sum(map(ord, prompt)) % 3]
    if kind != "ok":
        _mark(kind)
    return {"nan": float("nan"), "string": "0.75"}.get(kind, 1.0)
