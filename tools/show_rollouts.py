"""Print rollout dumps (``--rollout-dump-dir``) readably: prompt, response, reward, advantage.

    python tools/show_rollouts.py runs/dumps                 # every dumped step
    python tools/show_rollouts.py runs/dumps --step 3 -n 4   # four samples of step 3
    python tools/show_rollouts.py runs/dumps --min-reward 1  # only the rewarded ones
    python tools/show_rollouts.py runs/dumps/step_000003.jsonl --max-chars 0   # no truncation

Special tokens of the chat template stay visible in the prompt: it is the exact text the
model was given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RULE = "─" * 78


def load(path: Path, step: int | None) -> list[dict]:
    files = [path] if path.is_file() else sorted(path.glob("step_*.jsonl"))
    if not files:
        raise SystemExit(f"error: no step_*.jsonl rollout dumps in {path}")
    out = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {f}:{n}: not a rollout record ({e.msg})") from None
            if step is None or rec.get("step") == step:
                out.append(rec)
    return out


def _clip(text: str, limit: int) -> str:
    if limit <= 0 or len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n  … [{len(text) - limit} chars omitted] …\n{text[-half:]}"


def _num(x, fmt: str = "{:+.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render(rec: dict, max_chars: int = 2000) -> str:
    head = (
        f"step {rec.get('step')} · sample {rec.get('sample')} · group {rec.get('group')}"
        f" · reward {_num(rec.get('reward'), '{:.3f}')} · advantage {_num(rec.get('advantage'))}"
        f" · tokens {rec.get('prompt_tokens')}+{rec.get('response_tokens')}"
        + ("" if rec.get("finished", True) else " (truncated)")
    )
    lines = [RULE, head]
    if rec.get("source"):
        lines.append(f"source: {rec['source']}")
    gap = rec.get("logprob_gap")
    if gap:
        lines.append(
            f"log-prob gap rollout−trainer: mean {_num(gap.get('mean'), '{:+.4f}')}"
            f" |mean| {_num(gap.get('abs_mean'), '{:.4f}')} max {_num(gap.get('abs_max'), '{:.4f}')}"
        )
    lines.append(f"label: {rec.get('label')}")
    lines.append("── prompt ──")
    lines.append(_clip(str(rec.get("prompt", "")), max_chars))
    spans = rec.get("tool_spans")
    if spans:
        lines.append(f"── response ({rec.get('policy_tokens')} policy tokens; tool spans {spans}: not trained) ──")
    else:
        lines.append("── response ──")
    lines.append(_clip(str(rec.get("response_marked") or rec.get("response", "")), max_chars))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a --rollout-dump-dir directory or one step_*.jsonl file")
    p.add_argument("--step", type=int, help="only this step")
    p.add_argument("-n", type=int, default=0, help="at most N samples per step (0: all)")
    p.add_argument("--min-reward", type=float, help="only samples with reward ≥ this")
    p.add_argument("--max-chars", type=int, default=2000, help="clip prompt/response to this many chars (0: never)")
    a = p.parse_args(argv)
    recs = load(Path(a.path), a.step)
    if a.min_reward is not None:
        recs = [r for r in recs if r.get("reward") is not None and r["reward"] >= a.min_reward]
    shown: dict[int, int] = {}
    for r in recs:
        k = r.get("step")
        if a.n and shown.get(k, 0) >= a.n:
            continue
        shown[k] = shown.get(k, 0) + 1
        print(render(r, a.max_chars))
    total = sum(shown.values())
    rewards = [r["reward"] for r in recs if r.get("reward") is not None]
    mean = f", mean reward {sum(rewards) / len(rewards):.3f}" if rewards else ""
    print(f"{RULE}\n{total} sample(s) from {len(shown)} step(s){mean}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
