"""Prompt sources: the built-in ``arith`` task and JSONL / Parquet prompt files.

A source is indexed by a global cursor: ``take(start, count)`` returns the prompts at
positions ``start .. start+count-1`` of an endless, seed-determined stream, so a resumed
run (which stores the cursor) sees exactly the prompts an uninterrupted run would.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Prompt:
    text: str
    label: object
    index: int


class PromptSource(Protocol):
    def take(self, start: int, count: int) -> list[Prompt]: ...

    def eval_prompts(self) -> list[Prompt]: ...


class ArithTask:
    """Integer arithmetic ``a<op>b=`` → exact result, generated deterministically from the seed.

    Held-out evaluation problems come from their own seed stream and never appear in
    training (training draws are re-drawn when they hit the held-out set).
    """

    def __init__(self, seed: int = 0, digits: int = 2, ops: str = "+", num_eval: int = 200):
        if digits < 1 or not ops or any(o not in "+-*" for o in ops):
            raise ValueError("arith task needs --arith-digits ≥ 1 and --arith-ops drawn from '+-*'")
        self.seed, self.digits, self.ops = seed, digits, ops
        space = (10**digits) ** 2 * len(ops)
        if num_eval >= space // 2:
            raise ValueError(f"--num-eval-prompts {num_eval} leaves too few training problems")
        self._eval = []
        seen = set()
        rng = random.Random(f"arith-eval-{seed}")
        while len(self._eval) < num_eval:
            p = self._draw(rng)
            if p not in seen:
                seen.add(p)
                self._eval.append(p)
        self._eval_set = seen

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        hi = 10**self.digits - 1
        return rng.randint(0, hi), rng.choice(self.ops), rng.randint(0, hi)

    @staticmethod
    def _prompt(p: tuple[int, str, int], index: int) -> Prompt:
        a, op, b = p
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return Prompt(text=f"{a}{op}{b}=", label=str(value), index=index)

    def take(self, start: int, count: int) -> list[Prompt]:
        out = []
        for i in range(start, start + count):
            rng = random.Random(f"arith-train-{self.seed}-{i}")
            p = self._draw(rng)
            while p in self._eval_set:
                p = self._draw(rng)
            out.append(self._prompt(p, i))
        return out

    def eval_prompts(self) -> list[Prompt]:
        return [self._prompt(p, i) for i, p in enumerate(self._eval)]


class BadRowError(ValueError):
    """A malformed prompt row: the message names the file, the line and what was expected."""


def _read_rows(path: Path) -> list[tuple[int, object]]:
    """(line or row number, parsed row) pairs; invalid JSON rows carry the exception."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((n, e))
    return rows


class FilePromptSource:
    """Prompts from a JSONL or Parquet file, reshuffled every epoch with the seed.

    ``on_bad_row="fail"`` raises on the first malformed row; ``"skip"`` drops it and counts
    it in ``skipped`` (with the reasons in ``problems``).
    """

    def __init__(
        self,
        path: str,
        *,
        input_key: str = "prompt",
        label_key: str = "label",
        seed: int = 0,
        template: str = "{input}",
        max_prompt_tokens: int | None = None,
        tokenizer=None,
        on_bad_row: str = "fail",
        eval_path: str | None = None,
    ):
        if on_bad_row not in ("fail", "skip"):
            raise ValueError("--on-bad-row must be 'fail' or 'skip'")
        self.path = Path(path)
        self.input_key, self.label_key = input_key, label_key
        self.seed, self.template = seed, template
        self.max_prompt_tokens, self.tokenizer = max_prompt_tokens, tokenizer
        self.on_bad_row = on_bad_row
        self.problems: list[str] = []
        self.rows = self._load(self.path)
        if not self.rows:
            raise BadRowError(f"{self.path}: no usable prompt rows")
        self._eval = self._load(Path(eval_path)) if eval_path else []
        self._perms: dict[int, list[int]] = {}

    @property
    def skipped(self) -> int:
        return len(self.problems)

    def _bad(self, where: str, msg: str) -> None:
        text = f"{where}: {msg}"
        if self.on_bad_row == "fail":
            raise BadRowError(text)
        self.problems.append(text)

    def _load(self, path: Path) -> list[tuple[str, object]]:
        if not path.exists():
            raise FileNotFoundError(f"prompt data {path} does not exist")
        good = []
        unit = "row" if path.suffix == ".parquet" else "line"
        for n, row in _read_rows(path):
            where = f"{path}:{n}" if unit == "line" else f"{path} row {n}"
            if isinstance(row, Exception):
                self._bad(where, f"invalid JSON ({row.msg}); expected one JSON object per line")
                continue
            if not isinstance(row, dict):
                self._bad(where, f"expected a JSON object, got {type(row).__name__}")
                continue
            missing = [k for k in (self.input_key, self.label_key) if k not in row]
            if missing:
                self._bad(
                    where,
                    f"missing key(s) {missing}; expected --input-key {self.input_key!r} "
                    f"and --label-key {self.label_key!r}",
                )
                continue
            text = row[self.input_key]
            if not isinstance(text, str):
                self._bad(where, f"{self.input_key!r} must be a string, got {type(text).__name__}")
                continue
            if not text.strip():
                self._bad(where, f"{self.input_key!r} is empty")
                continue
            label = row[self.label_key]
            if not isinstance(label, (str, int, float)) or (isinstance(label, str) and not label.strip()):
                self._bad(where, f"{self.label_key!r} must be a non-empty string or number")
                continue
            prompt = self.template.format(input=text)
            if self.max_prompt_tokens and self.tokenizer is not None:
                n_tok = len(self.tokenizer.encode(prompt))
                if n_tok > self.max_prompt_tokens:
                    self._bad(
                        where,
                        f"prompt has {n_tok} tokens, more than the {self.max_prompt_tokens} allowed",
                    )
                    continue
            good.append((prompt, label))
        return good

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self.rows)))
            random.Random(f"prompts-{self.seed}-{epoch}").shuffle(order)
            self._perms = {epoch: order}
        return self._perms[epoch]

    def take(self, start: int, count: int) -> list[Prompt]:
        n = len(self.rows)
        out = []
        for i in range(start, start + count):
            text, label = self.rows[self._perm(i // n)[i % n]]
            out.append(Prompt(text=text, label=label, index=i))
        return out

    def eval_prompts(self) -> list[Prompt]:
        return [Prompt(text=t, label=lab, index=i) for i, (t, lab) in enumerate(self._eval)]
