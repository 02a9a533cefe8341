"""``--rollout-function examples.extensions.calculator_tool:calculator``: multi-turn tool use on the arith task.

The model writes; when its turn contains a call ``<calc>12+34</calc>`` the turn is cut right after the
call, the environment appends ``<result>46</result>`` and the model continues from there, for at most
``--max-turns`` model turns. The result tokens are the environment's: ``loss_mask`` 0, so they are
context only (no policy loss, KL, entropy or advantage); their engine log-prob slots hold 0.0. Every
continuation is a new engine request on token ids (prompt + response so far), with the local engine
and with SGLang alike, so the engine's log-probs are kept for generated tokens only. The reward
scores the text after the last result (the final answer).

``calculator_scaffolded`` is the same loop with the first call written by the environment from the
prompt's expression (a masked-out demonstration a fresh or small model would not emit on its own);
the model then answers, and may call again.

Needs a tokenizer that can spell the tags: ``--tokenizer byte`` for the arith task (its default
character vocabulary has no ``<``), and room for the tags: ``--rollout-max-response-len`` counts
response tokens of both kinds. Single round (no dynamic sampling).
"""

from __future__ import annotations

import ast
import operator
import re
import time
from dataclasses import replace

from megatron_mtp_rl.rollout.manager import RolloutBatch, RolloutManager, Sample

CALL = re.compile(r"<calc>([^<]*)</calc>")
EXPRESSION = re.compile(r"-?\d+(?:\s*[-+*]\s*-?\d+)+")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expr: str) -> str:
    """The value of an integer ``+ - *`` expression, or ``error`` (never ``eval``: a whitelisted AST walk)."""

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(expr)

    try:
        out = value(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        return "error"
    return str(out) if abs(out) < 10**18 else "error"


def call_end(ids: list[int], decode) -> tuple[int, str] | None:
    """(tokens up to and including the first complete ``<calc>…</calc>``, its expression), or None."""
    for j in range(1, len(ids) + 1):
        m = CALL.search(decode(ids[:j]))
        if m:
            return j, m.group(1)
    return None


class _Turns:
    """One sample's response under construction: tokens, engine log-probs and loss mask, kept in step."""

    def __init__(self):
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.mask: list[int] = []
        self.calls = 0
        self.done = False
        self.finished = False

    def add(self, ids: list[int], logprobs: list[float] | None, policy: bool, room: int) -> bool:
        """Append up to ``room`` tokens; False when they did not all fit."""
        kept = ids[: max(room, 0)]
        self.ids += kept
        self.logprobs += list(logprobs[: len(kept)]) if logprobs is not None else [0.0] * len(kept)
        self.mask += [int(policy)] * len(kept)
        return len(kept) == len(ids)


def _tool_result(turns: _Turns, expr: str, tok, max_len: int) -> None:
    turns.calls += 1
    result = tok.encode(f"<result>{calculate(expr)}</result>")
    if not turns.add(result, None, False, max_len - len(turns.ids)):
        turns.done = True  # no room left for the model to continue


def run_turns(manager: RolloutManager, prompt_ids: list[list[int]], seed: int, start: list[_Turns]) -> dict:
    """Model turns for every sample until it stops, runs out of room or of ``manager.max_turns``; engine stats."""
    tok, params = manager.tokenizer, manager.sampling
    max_len = params.max_new_tokens
    stats: dict = {}
    for turn in range(manager.max_turns):
        by_room: dict[int, list[int]] = {}
        for i, t in enumerate(start):
            room = max_len - len(t.ids)
            if not t.done and room > 0:
                by_room.setdefault(room, []).append(i)
            else:
                t.done = True
        if not by_room:
            break
        for room, idx in sorted(by_room.items()):
            reqs = [prompt_ids[i] + start[i].ids for i in idx]
            completions, stats = manager.engine.generate(
                reqs, replace(params, max_new_tokens=room), seed=(seed * 1009 + turn * 31 + room) % 2**62
            )
            for i, c in zip(idx, completions):
                t = start[i]
                hit = call_end(c.response_ids, tok.decode) if turn + 1 < manager.max_turns else None
                if hit is None:  # the model answered (or stopped): this sample is done
                    t.add(c.response_ids, c.logprobs, True, room)
                    t.done, t.finished = True, c.finished
                    continue
                j, expr = hit
                t.add(c.response_ids[:j], c.logprobs[:j], True, room)
                _tool_result(t, expr, tok, max_len)
    return stats


def final_answer(text: str) -> str:
    """What the reward scores: the text after the last ``</result>`` (all of it without a tool call)."""
    return text.rsplit("</result>", 1)[-1]


def _rollout(manager: RolloutManager, fetch, *, num_prompts: int, seed: int, scaffold: bool) -> RolloutBatch:
    t0 = time.perf_counter()
    tok, n = manager.tokenizer, manager.n
    errors_before = manager.scorer.stats.errors
    prompts = fetch(num_prompts)
    enc = [manager.encode_prompt(p) for p in prompts]
    prompt_ids = [ids for ids in enc for _ in range(n)]
    turns = [_Turns() for _ in prompt_ids]
    if scaffold:
        for j, t in enumerate(turns):
            found = EXPRESSION.findall(prompts[j // n].text)
            if found:
                t.add(tok.encode(f"<calc>{found[-1]}</calc>"), None, False, manager.sampling.max_new_tokens)
                _tool_result(t, found[-1], tok, manager.sampling.max_new_tokens)
    stats = run_turns(manager, prompt_ids, seed, turns)
    samples = []
    for j, t in enumerate(turns):
        ids = t.ids[:-1] if t.finished and t.ids else t.ids  # the EOS is not text
        text = tok.decode(ids)
        samples.append(
            Sample(prompts[j // n], enc[j // n], t.ids, t.logprobs, text, t.finished, group=j // n, loss_mask=t.mask)
        )
    rewards = manager.scorer.score([(s.prompt.text, final_answer(s.response_text), s.prompt.label) for s in samples])
    for s, r in zip(samples, rewards):
        s.reward = r
    total = max(len(samples), 1)
    tokens = sum(len(t.ids) for t in turns)
    metrics = {
        "rollout/reward_mean": sum(rewards) / total,
        "rollout/response_len": tokens / total,
        "rollout/truncated": sum(not s.finished for s in samples) / total,
        "rollout/generated_samples": float(len(samples)),
        "rollout/reward_errors": float(manager.scorer.stats.errors - errors_before),
        "rollout/tool_calls": sum(t.calls for t in turns) / total,
        "rollout/tool_token_frac": sum(m == 0 for t in turns for m in t.mask) / max(tokens, 1),
        "perf/rollout_time": time.perf_counter() - t0,
        **stats,
    }
    return RolloutBatch(samples, n, metrics, len(prompts))


def calculator(manager: RolloutManager, fetch, *, num_prompts: int, seed: int, **_) -> RolloutBatch:
    """The model decides when to call the calculator (``--max-turns`` model turns at most)."""
    return _rollout(manager, fetch, num_prompts=num_prompts, seed=seed, scaffold=False)


def calculator_scaffolded(manager: RolloutManager, fetch, *, num_prompts: int, seed: int, **_) -> RolloutBatch:
    """The environment makes the first call (masked out) from the prompt's expression; the model goes on."""
    return _rollout(manager, fetch, num_prompts=num_prompts, seed=seed, scaffold=True)
