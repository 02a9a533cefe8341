"""Math benchmark evaluation: pass@1 (greedy), avg@k and pass@k, scored with math-verify.

Reads benchmark files the user supplies (JSONL or Parquet) in the usual layouts — AIME
2024/2025, AMC23, MATH500 (``problem``/``answer``), Minerva (``question``/``answer``),
OlympiadBench (``question``/``final_answer`` list) — generates with the local engine from a
checkpoint (or SGLang, when the bridge is configured), and writes a markdown table and JSON.

    .venv/bin/python tools/eval_math.py --data aime24.jsonl --data math500.parquet \\
        --load runs/my_ckpt --preset tiny-moe --tokenizer byte --k 4 --out runs/eval
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

INPUT_KEYS = ("problem", "question", "prompt", "input")
ANSWER_KEYS = ("answer", "final_answer", "expected_answer", "label", "solution")


@dataclass
class Problem:
    text: str
    answer: str


def load_benchmark(path: str) -> list[Problem]:
    """Problems of one benchmark file; the layout is detected from the field names."""
    from megatron_mtp_rl.rollout.data import read_rows

    p = Path(path)
    if not p.exists():
        raise SystemExit(f"{p}: no such benchmark file")
    rows = []
    for where, _, row in read_rows(p):  # JSONL, JSON array or Parquet; non-UTF-8 lines named
        if isinstance(row, str):
            raise SystemExit(f"{where}: {row}")
        rows.append((where, row))
    out = []
    for where, row in rows:
        ik = next((k for k in INPUT_KEYS if k in row), None) if isinstance(row, dict) else None
        ak = next((k for k in ANSWER_KEYS if k in row), None) if isinstance(row, dict) else None
        if ik is None or ak is None:
            raise SystemExit(f"{where}: expected a problem field {INPUT_KEYS} and an answer field {ANSWER_KEYS}")
        ans = row[ak]
        if isinstance(ans, list):  # OlympiadBench: final_answer is a list
            ans = ans[0] if ans else ""
        ans = str(ans).strip()
        if ans.startswith("$") and ans.endswith("$"):
            ans = ans.strip("$")
        out.append(Problem(str(row[ik]), ans))
    if not out:
        raise SystemExit(f"{p}: no problems")
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score(problems: list[Problem], greedy: list[str], sampled: list[list[str]]) -> dict:
    """pass@1 on greedy responses, avg@k and pass@k on the k sampled responses per problem."""
    from megatron_mtp_rl.rollout.rewards import math_verify

    g = [math_verify("", r, p.answer) for p, r in zip(problems, greedy)]
    per = [[math_verify("", r, p.answer) for r in rs] for p, rs in zip(problems, sampled)]
    k = len(sampled[0]) if sampled else 0
    res = {"n": len(problems), "pass@1": sum(g) / len(g), "correct_greedy": g}
    if k:
        res["k"] = k
        res["avg@k"] = sum(sum(c) / k for c in per) / len(per)
        res["pass@k"] = sum(pass_at_k(k, int(sum(c)), k) for c in per) / len(per)
        res["correct_sampled"] = per
    return res


def markdown(results: dict[str, dict]) -> str:
    k = next((r.get("k") for r in results.values() if r.get("k")), None)
    head = "| benchmark | problems | pass@1 (greedy) |" + (f" avg@{k} | pass@{k} |" if k else "")
    lines = [head, "|---|---|---|" + ("---|---|" if k else "")]
    for name, r in results.items():
        row = f"| {name} | {r['n']} | {r['pass@1']:.3f} |"
        if k:
            row += f" {r['avg@k']:.3f} | {r['pass@k']:.3f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def no_reward(prompt, response, label) -> float:
    return 0.0


def local_generator(train_argv: list[str]):
    """Greedy and sampled responses from a checkpoint with the local engine, and the prompt formatter.

    The tokenizer is the run's (``--tokenizer``, else the ``--load`` checkpoint's, else bytes); the
    formatter is training's ``format_prompt`` with the same flags, except that the chat template is
    on by default whenever the tokenizer has one (a benchmark question is a user turn).
    """
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    from dataclasses import replace

    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.models.generation import SamplingParams
    from megatron_mtp_rl.rollout.chat import format_prompt, prompt_format
    from megatron_mtp_rl.rollout.data import Prompt
    from megatron_mtp_rl.rollout.reward_sandbox import build_scorer
    from megatron_mtp_rl.train.loop import prepare

    cfg = parse_config(["--quiet", "--finetune", *train_argv])
    if cfg.data.tokenizer == "arith":  # no --tokenizer and no checkpoint tokenizer: bytes read any problem
        cfg = cfg.replace(data__tokenizer="byte")
    ctx, _ = prepare(cfg)  # builds the run, loads --load (weights only), local engine
    run, mgr = ctx.run, ctx.rollout.manager
    tok = run.tokenizer
    fmt = prompt_format(cfg.data)
    if fmt.apply_chat_template is None and getattr(tok, "chat_template", None):
        fmt = replace(fmt, apply_chat_template=True)

    def formatter(text: str) -> str:
        return format_prompt(text, tok, fmt)

    def generate(texts: list[str], n: int, temperature: float, max_new: int, seed: int) -> list[list[str]]:
        params = SamplingParams(
            temperature=temperature, max_new_tokens=max_new, eos_id=tok.eos_id, stop_ids=tuple(tok.stop_ids)
        )
        samples, _ = mgr.generate_groups([Prompt(t, None, i) for i, t in enumerate(texts)], seed, params, n=n)
        return [[s.response_text for s in samples[i * n : (i + 1) * n]] for i in range(len(texts))]

    mgr.scorer.close()
    mgr.scorer = build_scorer("tools.eval_math:no_reward", workers=0, timeout_s=0)  # scored below
    return generate, formatter


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", required=True, help="benchmark file (repeatable)")
    p.add_argument("--k", type=int, default=4, help="samples per problem for avg@k / pass@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument(
        "--template",
        default="{input}",
        help="text around the problem ({input}; other braces such as \\boxed{} stay literal); the chat template "
        "of the tokenizer, --system-prompt and --chat-template-kwargs then apply as in training",
    )
    p.add_argument("--out", default="runs/eval_math")
    p.add_argument("--seed", type=int, default=0)
    a, train_argv = p.parse_known_args(argv)
    from megatron_mtp_rl.rollout.data import render_template

    generate, formatter = local_generator(train_argv)
    results = {}
    for path in a.data:
        probs = load_benchmark(path)
        texts = [formatter(render_template(a.template, {"input": q.text})) for q in probs]
        greedy = [r[0] for r in generate(texts, 1, 0.0, a.max_new_tokens, a.seed)]
        sampled = generate(texts, a.k, a.temperature, a.max_new_tokens, a.seed + 1) if a.k else []
        results[Path(path).stem] = score(probs, greedy, sampled)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table, end="")
    print(out / "results.md")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
