"""Rollout dumps: what the model was asked, what it answered, and what that earned, per step.

``--rollout-dump-dir DIR`` writes ``DIR/step_000001.jsonl`` (one JSON object per sample, the
first ``--rollout-dump-n`` samples of the step) so a run can be read, not only plotted:
``tools/show_rollouts.py DIR`` prints them. The prompt is the formatted text (chat template
applied), exactly what was tokenized. Written by the logging rank only, atomically (a reader
never sees half a file), and a resumed run overwrites the steps it repeats.

Multi-turn samples (a per-token ``loss_mask``) also record ``tool_spans``, the ``[start, end)``
response-token ranges of tool / environment output (not trained), and, given the tokenizer's
``decode``, ``response_marked``: the response with each tool span wrapped in ``⟦tool⟧…⟦/tool⟧``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path


def logprob_gap(rollout: Sequence[float], trainer: Sequence[float]) -> dict[str, float] | None:
    """Rollout-engine vs trainer log-probs of the same response tokens (None when either is missing).

    ``mean`` is E[rollout − trainer], ``abs_mean`` E|rollout − trainer|, ``abs_max`` the largest
    gap: the off-policy drift importance ratios correct for (large values mean a sync or
    numerics problem between the engine and the trainer).
    """
    n = min(len(rollout), len(trainer))
    if n == 0:
        return None
    d = [float(rollout[i]) - float(trainer[i]) for i in range(n)]
    if not all(math.isfinite(x) for x in d):
        return {"mean": None, "abs_mean": None, "abs_max": None, "tokens": n}
    return {
        "mean": sum(d) / n,
        "abs_mean": sum(abs(x) for x in d) / n,
        "abs_max": max(abs(x) for x in d),
        "tokens": n,
    }


TOOL_OPEN, TOOL_CLOSE = "⟦tool⟧", "⟦/tool⟧"


def tool_spans(loss_mask: Sequence[int]) -> list[list[int]]:
    """``[start, end)`` runs of response tokens whose loss mask is 0 (tool / environment output)."""
    spans: list[list[int]] = []
    for i, m in enumerate(loss_mask):
        if m:
            continue
        if spans and spans[-1][1] == i:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return spans


def marked_response(ids: Sequence[int], loss_mask: Sequence[int], decode: Callable[[list[int]], str]) -> str:
    """The response text with every tool span wrapped in ``⟦tool⟧…⟦/tool⟧`` (each run decoded on its own)."""
    out, start = [], 0
    for a, b in tool_spans(loss_mask):
        out += [decode(list(ids[start:a])), TOOL_OPEN + decode(list(ids[a:b])) + TOOL_CLOSE]
        start = b
    out.append(decode(list(ids[start:])))
    return "".join(out)


def _finite(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None


def rollout_records(
    step: int,
    samples: Sequence,
    advantages: Sequence[float] | None = None,
    trainer_logprobs: Sequence[Sequence[float] | None] | None = None,
    limit: int | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> list[dict]:
    """One JSON-ready dict per sample (``samples`` are ``rollout.manager.Sample``; the first ``limit``)."""
    out = []
    for i, s in enumerate(samples[:limit] if limit is not None else samples):
        rec = {
            "step": step,
            "sample": i,
            "group": s.group,
            "source": getattr(s.prompt, "where", "") or None,
            "prompt": s.prompt.text,
            "response": s.response_text,
            "label": s.prompt.label if isinstance(s.prompt.label, (str, int, float)) else str(s.prompt.label),
            "prompt_tokens": len(s.prompt_ids),
            "response_tokens": len(s.response_ids),
            "finished": bool(s.finished),
            "reward": _finite(float(s.reward)),
            "advantage": _finite(float(advantages[i])) if advantages is not None and i < len(advantages) else None,
        }
        mask = getattr(s, "loss_mask", None)
        if mask is not None:
            rec["tool_spans"] = tool_spans(mask)
            rec["policy_tokens"] = int(sum(1 for m in mask if m))
            if decode is not None:
                rec["response_marked"] = marked_response(s.response_ids, mask, decode)
        tl = trainer_logprobs[i] if trainer_logprobs is not None and i < len(trainer_logprobs) else None
        rl = s.logprobs
        if mask is not None and tl is not None:  # the engine scored the policy's tokens only
            keep = [j for j, m in enumerate(mask) if m and j < len(tl) and j < len(rl)]
            rl, tl = [rl[j] for j in keep], [tl[j] for j in keep]
        gap = logprob_gap(rl, tl) if tl is not None and rl else None
        if gap is not None:
            rec["logprob_gap"] = gap
        out.append(rec)
    return out


class RolloutDumper:
    """Writes ``DIR/step_{step:06d}.jsonl``; a no-op when ``directory`` is None or not the logging rank."""

    def __init__(
        self,
        directory: str | os.PathLike | None,
        n: int = 16,
        *,
        enabled: bool = True,
        decode: Callable[[list[int]], str] | None = None,
    ):
        self.dir = Path(directory) if directory and enabled else None
        self.n = n
        self.decode = decode  # the tokenizer's: marks tool spans in the response text
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def active(self) -> bool:
        return self.dir is not None and self.n > 0

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}.jsonl"

    def dump(
        self,
        step: int,
        samples: Sequence,
        advantages: Sequence[float] | None = None,
        trainer_logprobs: Sequence[Sequence[float] | None] | None = None,
    ) -> Path | None:
        if not self.active:
            return None
        recs = rollout_records(step, samples, advantages, trainer_logprobs, limit=self.n, decode=self.decode)
        path = self.path(step)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return path


def read_dumps(directory: str | os.PathLike) -> list[dict]:
    """Every record of every ``step_*.jsonl`` in the directory, in step order."""
    out = []
    for f in sorted(Path(directory).glob("step_*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out
