"""Prompt sources: the built-in ``arith`` task and JSONL / JSON / Parquet prompt files.

A source is indexed by a global cursor: ``take(start, count)`` returns the prompts at
positions ``start .. start+count-1`` of an endless, seed-determined stream, so a resumed
run (which stores the cursor) sees exactly the prompts an uninterrupted run would.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from megatron_mtp_rl.errors import DataError
from megatron_mtp_rl.rollout.chat import ChatFormatError, PromptFormat, format_prompt


@dataclass(frozen=True)
class Prompt:
    text: str  # exactly what the model is given (chat template and BOS applied)
    label: object
    index: int
    where: str = ""  # file:line of the data row ("" for generated tasks)


class PromptSource(Protocol):
    def take(self, start: int, count: int) -> list[Prompt]: ...

    def eval_prompts(self) -> list[Prompt]: ...


class ArithTask:
    """Integer arithmetic ``a<op>b=`` → exact result, generated deterministically from the seed.

    Held-out evaluation problems come from their own seed stream and never appear in
    training (training draws are re-drawn when they hit the held-out set).
    """

    def __init__(
        self, seed: int = 0, digits: int = 2, ops: str = "+", num_eval: int = 200, max_digits: int | None = None
    ):
        if digits < 1 or not ops or any(o not in "+-*" for o in ops):
            raise ValueError("arith task needs --arith-digits ≥ 1 and --arith-ops drawn from '+-*'")
        if max_digits is not None and max_digits < digits:
            raise ValueError(f"--arith-max-digits {max_digits} is below --arith-digits {digits}")
        self.seed, self.digits, self.ops = seed, digits, ops
        # Long-tailed lengths: operand i has d_i digits, d = digits.. max_digits, each one half as
        # likely as the one below (with '*', answers of 1 to 2·max_digits digits, most of them short).
        self.max_digits = max_digits or digits
        top = self.max_digits
        self._lengths = list(range(digits, top + 1))
        self._weights = [2.0 ** -(d - digits) for d in self._lengths]
        if num_eval > self.max_eval(digits, ops, max_digits):
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

    @staticmethod
    def distinct_problems(digits: int, ops: str, max_digits: int | None = None) -> int:
        """How many different problems the task has (operands below 10^max_digits, each op)."""
        return (10 ** (max_digits or digits)) ** 2 * len(ops)

    @classmethod
    def max_eval(cls, digits: int, ops: str, max_digits: int | None = None) -> int:
        """The most held-out problems: half of them, so training keeps at least the other half."""
        return cls.distinct_problems(digits, ops, max_digits) // 2

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        if self.max_digits == self.digits:
            hi = 10**self.digits - 1
            return rng.randint(0, hi), rng.choice(self.ops), rng.randint(0, hi)
        da, db = rng.choices(self._lengths, self._weights, k=2)
        return rng.randint(0, 10**da - 1), rng.choice(self.ops), rng.randint(0, 10**db - 1)

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


class BadRowError(DataError):
    """Malformed prompt rows: the message names every file:line (the first 20) and what was expected."""


MAX_REPORTED = 20  # bad rows listed in one message; the rest are counted
_MISSING = object()
_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_.]*)\}")


def lookup(row: object, key: str) -> object:
    """``row[key]`` where ``key`` may be dotted (``reward_model.ground_truth``); a literal key wins."""
    if isinstance(row, dict) and key in row:
        return row[key]
    cur = row
    for part in key.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def template_fields(template: str) -> list[str]:
    """The ``{name}`` / ``{a.b}`` fields of a prompt template; other braces (``\\boxed{}``) are literal."""
    return [m.group(1) for m in _FIELD.finditer(template) if m.group(1)]


def render_template(template: str, values: dict[str, str]) -> str:
    """Substitute ``{field}``; ``{{``/``}}`` give literal braces, as in ``str.format``."""

    def sub(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        return values[m.group(1)]

    return _FIELD.sub(sub, template)


def read_rows(path: Path) -> list[tuple[str, int, object]]:
    """(where, position, parsed row) triples of a JSONL / JSON-array / Parquet file.

    ``where`` is ``file:line`` (``file row N`` / ``file item N``); a row that cannot be parsed
    (invalid JSON, bytes that are not UTF-8) carries the reason as a ``str`` instead of a row.
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's errors name no row; the file is unreadable as a whole
            raise DataError(f"{path}: cannot read as Parquet ({e})") from None
        return [(f"{path} row {n}", n, row) for n, row in enumerate(table.to_pylist(), start=1)]
    data = path.read_bytes()
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":  # a JSON array (DeepScaleR ships one)
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected one JSON array of objects") from None
        return [(f"{path} item {n}", n, row) for n, row in enumerate(items, start=1)]
    rows: list[tuple[str, int, object]] = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append((where, n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
            continue
        if not line.strip():
            continue
        try:
            rows.append((where, n, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((where, n, f"invalid JSON ({e.msg}); expected one JSON object per line"))
    return rows


class FilePromptSource:
    """Prompts from a JSONL, JSON-array or Parquet file, reshuffled every epoch with the seed.

    A row's prompt is ``input_key`` (dotted keys reach into nested objects): a string, or a
    list of ``{role, content}`` messages (veRL / slime layout). ``template`` builds the text
    from named row fields (``{problem}``, ``{extra_info.question}``; ``{input}`` is the
    ``input_key`` value). ``fmt`` applies the tokenizer's chat template (see ``rollout/chat.py``).
    Every row is read, formatted and (with ``max_prompt_tokens``) tokenized once here, so every
    problem is known at start-up: ``on_bad_row="fail"`` raises one :class:`BadRowError` listing
    them all (the first 20, then a count); ``"skip"`` drops them and keeps the reasons in
    ``problems``.
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
        length_rule: str = "",
        tokenizer=None,
        fmt: PromptFormat | None = None,
        on_bad_row: str = "fail",
        eval_path: str | None = None,
    ):
        if on_bad_row not in ("fail", "skip"):
            raise ValueError("--on-bad-row must be 'fail' or 'skip'")
        self.path = Path(path)
        self.input_key, self.label_key = input_key, label_key
        self.seed, self.template = seed, template
        self.fields = template_fields(template)
        self.max_prompt_tokens, self.tokenizer = max_prompt_tokens, tokenizer
        self.length_rule = length_rule
        self.fmt = fmt or PromptFormat()
        self.on_bad_row = on_bad_row
        self.problems: list[str] = []
        self.rows = self._load(self.path)
        self._eval = self._load(Path(eval_path)) if eval_path else []
        if self.problems and on_bad_row == "fail":
            raise BadRowError(self._summary())
        if not self.rows:
            what = self._summary() if self.problems else f"{self.path}: no prompt rows (the file is empty)"
            raise BadRowError(f"no usable prompt rows; {what}" if self.problems else what)
        self._perms: dict[int, list[int]] = {}

    @property
    def skipped(self) -> int:
        return len(self.problems)

    def _summary(self) -> str:
        n = len(self.problems)
        lines = self.problems[:MAX_REPORTED]
        more = [f"... and {n - MAX_REPORTED} more bad row(s)"] if n > MAX_REPORTED else []
        hint = "" if self.on_bad_row == "skip" else " (--on-bad-row skip drops them)"
        return f"{n} bad prompt row(s){hint}:\n  " + "\n  ".join(lines + more)

    def _prompt_of(self, row: dict) -> tuple[object, str | None]:
        """(prompt for ``format_prompt``, problem) of one row."""
        values: dict[str, str] = {}
        missing = []
        needs_input = "input" in self.fields
        keys = ([self.input_key] if needs_input else []) + [f for f in self.fields if f != "input"]
        keys.append(self.label_key)
        for k in keys:
            if lookup(row, k) is _MISSING:
                missing.append(k)
        if missing:
            have = ", ".join(sorted(row)[:12])
            return None, (
                f"missing key(s) {missing}; expected --input-key {self.input_key!r}, --label-key "
                f"{self.label_key!r} and the --prompt-template fields (the row has: {have})"
            )
        if needs_input:
            value = lookup(row, self.input_key)
            if isinstance(value, list):
                if self.template.strip() != "{input}":
                    return None, f"{self.input_key!r} is a message list; --prompt-template applies to text prompts"
                return value, None
            if not isinstance(value, str):
                return None, f"{self.input_key!r} must be a string or a list of messages, got {type(value).__name__}"
            if not value.strip():
                return None, f"{self.input_key!r} is empty"
            values["input"] = value
        for f in self.fields:
            if f == "input":
                continue
            v = lookup(row, f)
            if isinstance(v, (dict, list)) or v is None:
                return None, f"template field {{{f}}} must be text or a number, got {type(v).__name__}"
            values[f] = str(v)
        text = render_template(self.template, values)
        if not text.strip():
            return None, "the formatted prompt is empty"
        return text, None

    def _load(self, path: Path) -> list[tuple[str, object, str]]:
        if not path.exists():
            raise DataError(f"prompt data {path} does not exist")
        good: list[tuple[str, object, str]] = []
        bad: list[tuple[int, str]] = []
        for where, n, row in read_rows(path):
            if isinstance(row, str):
                bad.append((n, f"{where}: {row}"))
                continue
            if not isinstance(row, dict):
                bad.append((n, f"{where}: expected a JSON object, got {type(row).__name__}"))
                continue
            prompt, problem = self._prompt_of(row)
            if problem is None:
                label = lookup(row, self.label_key)
                if not isinstance(label, (str, int, float)) or isinstance(label, bool):
                    problem = f"{self.label_key!r} must be a string or a number, got {type(label).__name__}"
                elif isinstance(label, str) and not label.strip():
                    problem = f"{self.label_key!r} is empty"
            if problem is None:
                try:
                    text = format_prompt(prompt, self.tokenizer, self.fmt)
                except ChatFormatError as e:
                    problem = f"{self.input_key!r}: {e}"
            if problem is not None:
                bad.append((n, f"{where}: {problem}"))
                continue
            good.append((text, label, where, n))
        if self.max_prompt_tokens and self.tokenizer is not None and good:
            texts = [g[0] for g in good]
            batch = getattr(self.tokenizer, "encode_batch", None)
            lengths = [len(ids) for ids in batch(texts)] if batch else [len(self.tokenizer.encode(t)) for t in texts]
            rule = f" ({self.length_rule})" if self.length_rule else ""
            kept = []
            for g, k in zip(good, lengths):
                if k > self.max_prompt_tokens:
                    msg = f"prompt has {k} tokens, more than the {self.max_prompt_tokens} allowed{rule}"
                    bad.append((g[3], f"{g[2]}: {msg}"))
                else:
                    kept.append(g)
            good = kept
        self.problems.extend(msg for _, msg in sorted(bad, key=lambda b: b[0]))
        return [(t, lab, w) for t, lab, w, _ in good]

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
            text, label, where = self.rows[self._perm(i // n)[i % n]]
            out.append(Prompt(text=text, label=label, index=i, where=where))
        return out

    def eval_prompts(self) -> list[Prompt]:
        return [Prompt(text=t, label=lab, index=i, where=w) for i, (t, lab, w) in enumerate(self._eval)]
