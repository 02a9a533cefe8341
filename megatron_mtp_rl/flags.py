"""Declaring a command-line flag once, on the dataclass field it fills.

A field declared with :func:`flag` becomes ``--field-name`` (underscores → dashes) in
``mtp-rl --help``, a valid key of ``--config FILE.yaml``, and a typed, checked value of the
run config. Defaults, help text, choices and range checks live here and nowhere else.
This module imports neither torch nor megatron, so ``--help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any

ENGINE_PREFIX = "--sglang-"
ROUTER_PREFIX = "--sglang-router-"


def flag(
    default: Any,
    help: str,
    *,
    choices: tuple | list | None = None,
    min: float | None = None,
    min_exclusive: bool = False,
    name: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field that is also a flag.

    ``min``/``min_exclusive``: the value must be ≥ (or >) ``min`` (checked for CLI and YAML).
    ``name``: the flag name when it is not ``--`` + the field name with dashes.
    ``cli=False``: a field of the config that no flag sets (derived or internal).
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min}
    meta.update(min_exclusive=min_exclusive, name=name, cli=cli)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(f) -> str:
    """``--flag-name`` of a dataclass field."""
    return f.metadata.get("name") or "--" + f.name.replace("_", "-")


def split_passthrough_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(engine flags, router flags, the rest) from a command line.

    ``--sglang-router-X v`` → router ``--X v``; ``--sglang-X v`` → engine ``--X v``; ``=`` forms
    and flags with several values (up to the next ``--`` token) or none (booleans) are kept as
    written. Everything else is returned untouched, in order.
    """
    engine: list[str] = []
    router: list[str] = []
    rest: list[str] = []
    target = rest
    for tok in argv:
        if tok.startswith(ROUTER_PREFIX) and len(tok) > len(ROUTER_PREFIX):
            target = router
            tok = "--" + tok[len(ROUTER_PREFIX) :]
        elif tok.startswith(ENGINE_PREFIX) and len(tok) > len(ENGINE_PREFIX):
            target = engine
            tok = "--" + tok[len(ENGINE_PREFIX) :]
        elif tok.startswith("--"):
            target = rest
        target.append(tok)
    return engine, router, rest
