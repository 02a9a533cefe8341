"""Workarounds for megatron-core 0.19 behaviours, kept in one place.

Each patch names the megatron-core call site and why it is needed; :func:`apply` is
idempotent and only patches what the installed version still needs.
"""

from __future__ import annotations

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
