"""Reward functions: ``fn(prompt: str, response: str, label) -> float``.

Custom rewards are plugged in by dotted path (``--reward-fn package.module:function``);
modules in the working directory are found without ``PYTHONPATH=.``. A reward must be a
finite int or float: anything else (None, a string such as ``"0.75"``, NaN) is an error
the scorer counts and reports, never a silently coerced score.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable

from megatron_mtp_rl.errors import ConfigError

RewardFn = Callable[[str, str, object], float]


def exact_match(prompt: str, response: str, label) -> float:
    """1.0 when the response, stripped, equals the label."""
    return float(response.strip() == str(label).strip())


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def final_answer(text: str) -> str | None:
    """The last ``\\boxed{...}``, else the text after the last ``Answer:`` (DAPO-Math-17k's format)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    i = text.rfind("Answer:")
    if i < 0:
        return None
    answer = text[i + len("Answer:") :].strip().split("\n", 1)[0].strip().strip("$").strip()
    return answer or None


def math_verify(prompt: str, response: str, label) -> float:
    """1.0 when the final answer (last ``\\boxed{}``, else ``Answer: ...``) equals the label (math-verify)."""
    from math_verify import parse, verify

    answer = final_answer(response)
    if answer is None:
        return 0.0
    gold = str(label)
    gold_parsed = parse(gold if "\\boxed" in gold or "$" in gold else f"${gold}$")
    pred_parsed = parse(f"${answer}$")
    if not gold_parsed or not pred_parsed:
        return 0.0
    return float(verify(gold_parsed, pred_parsed))


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match, "math_verify": math_verify}


def check_reward(value) -> float:
    """``value`` as a float when it is a finite real number; ``TypeError``/``ValueError`` otherwise.

    Strings are refused rather than parsed: ``"0.75"`` from a reward function is almost
    always a bug (a parsed answer returned instead of a score). 0-d tensors/arrays are read.
    """
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TypeError(f"reward function returned {type(value).__name__} {shown}; expected an int or float")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"reward function returned {out}; expected a finite number")
    return out


def _with_working_directory_on_path() -> None:
    """``--reward-fn mymod:fn`` with ``mymod.py`` in the current directory: found as ``python -m`` would.

    The console script's ``sys.path[0]`` is its bin directory, not the working directory.
    Appended (not prepended) so a local file never shadows an installed package.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def load_reward_fn(spec: str) -> RewardFn:
    """A built-in name (``exact_match``, ``math_verify``) or ``module:function`` / ``module.function``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, name = spec.partition(":")
    if not sep:
        module, _, name = spec.rpartition(".")
    if not module or not name:
        raise ConfigError(f"--reward-fn {spec!r}: expected a built-in name ({', '.join(BUILTIN)}) or 'module:function'")
    _with_working_directory_on_path()
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--reward-fn {spec!r}: cannot load ({e})") from None
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec!r} is not callable")
    return fn
