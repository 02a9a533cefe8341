"""The calculator-tool example: multi-turn rollouts whose tool output is masked out, on the local engine
and through the fake SGLang server (continuation from token ids, engine log-probs of generated tokens only)."""

import json
import math
import sys
import urllib.request
from dataclasses import dataclass, field

import pytest

from examples.extensions import calculator_tool as calc
from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.rollout.data import Prompt
from megatron_mtp_rl.rollout.dump import read_dumps, tool_spans
from megatron_mtp_rl.rollout.engine import Completion
from megatron_mtp_rl.rollout.manager import RolloutManager
from megatron_mtp_rl.rollout.tokenizer import ByteTokenizer
from megatron_mtp_rl.train.loop import close, prepare
from megatron_mtp_rl.train.step import rl_step
from tests.dist_utils import free_port
from tests.e2e.test_sglang_rollout import FAKE

ARGS = [
    "--preset", "tiny-dense", "--tokenizer", "byte", "--max-turns", "2",
    "--rollout-function", "examples.extensions.calculator_tool:calculator_scaffolded",
    "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "44",
    "--seq-length", "56", "--global-batch-size", "2", "--micro-batch-size", "2", "--num-eval-prompts", "4",
    "--eval-interval", "100", "--reward-workers", "0", "--num-steps", "2", "--quiet",
]  # fmt: skip
TOK = ByteTokenizer()


def test_calculate_and_call_parsing():
    assert [calc.calculate(e) for e in ("12+34", " 7*6-2 ", "-3*-4", "2**8", "x+1", "1/2")] == [
        "46", "40", "12", "error", "error", "error",
    ]  # fmt: skip
    ids = TOK.encode("ok <calc>12+34</calc> and more")
    assert calc.call_end(ids, TOK.decode) == (len(TOK.encode("ok <calc>12+34</calc>")), "12+34")
    assert calc.call_end(TOK.encode("<calc>12+34</cal"), TOK.decode) is None
    assert calc.final_answer("<calc>1+1</calc><result>2</result>2") == "2"


@dataclass
class ScriptedEngine:
    """Answers each request with the next scripted text; log-prob −(k+1)/10 for the k-th token it generated."""

    script: list[str]
    requests: list = field(default_factory=list)

    def generate(self, prompts, params, *, seed):
        self.requests += prompts
        out = []
        for _ in prompts:
            ids = TOK.encode(self.script.pop(0))[: params.max_new_tokens]
            out.append(Completion(ids, [-(k + 1) / 10 for k in range(len(ids))], False))
        return out, {}


class _Scorer:
    stats = type("S", (), {"errors": 0})()

    def score(self, items):
        return [float(r == label) for _, r, label in items]


def test_a_model_call_is_cut_answered_masked_and_continued_from_token_ids():
    engine = ScriptedEngine(["a<calc>6*7</calc>IGNORED", "42"])
    params = SamplingParams(max_new_tokens=64, eos_id=TOK.eos_id)
    m = RolloutManager(engine, TOK, _Scorer(), n_samples=1, sampling=params, max_turns=2)
    batch = calc.calculator(m, lambda k: [Prompt("6*7=", "42", 0)], num_prompts=1, seed=0)
    (s,) = batch.samples
    call, result = "a<calc>6*7</calc>", "<result>42</result>"
    assert s.response_text == call + result + "42" and s.reward == 1.0
    assert s.loss_mask == [1] * len(call) + [0] * len(result) + [1, 1]
    assert s.logprobs == [-(k + 1) / 10 for k in range(len(call))] + [0.0] * len(result) + [-0.1, -0.2]
    assert engine.requests[1] == m.encode_prompt(Prompt("6*7=", "42", 0)) + TOK.encode(call + result)
    assert batch.metrics["rollout/tool_calls"] == 1.0


def _two_steps(argv):
    """Two RL steps; the rollout batches they trained on, their metrics and the rollout dumps."""
    ctx, state = prepare(parse_config(argv))
    batches, fn = [], ctx.rollout.rollout_fn
    ctx.rollout.rollout_fn = lambda *a, **k: batches.append(fn(*a, **k)) or batches[-1]
    try:
        hist = []
        for step in (1, 2):
            m, state.cursor = rl_step(ctx, step, state.cursor)
            hist.append(m)
        urls = list(getattr(getattr(ctx.engine, "client", None), "engine_urls", None) or [])
        log = []
        for u in urls:
            with urllib.request.urlopen(u + "/_fake/state", timeout=5) as r:
                log += [e for e in json.loads(r.read())["log"] if e["route"] == "/generate"]
    finally:
        close(ctx)
    return hist, batches, log


def _check(hist, batches, dumps):
    assert len(batches) == 2 and all(math.isfinite(h["train/policy_loss"]) for h in hist)
    assert all(h["rollout/tool_calls"] >= 1.0 and h["rollout/tool_token_frac"] > 0 for h in hist)
    for s in (s for b in batches for s in b.samples):
        spans = tool_spans(s.loss_mask)
        assert spans and spans[0][0] == 0  # the scaffolded call and its result come first, masked out
        tool_text = TOK.decode(s.response_ids[spans[0][0] : spans[0][1]])
        assert tool_text.startswith("<calc>") and tool_text.endswith(f"<result>{s.prompt.label}</result>")
        assert all(s.logprobs[i] == 0.0 for a, b in spans for i in range(a, b))
    recs = read_dumps(dumps)
    assert {r["step"] for r in recs} == {1, 2}
    for r in recs:
        assert r["tool_spans"] and r["response_marked"].startswith("⟦tool⟧<calc>")
        assert r["policy_tokens"] == r["response_tokens"] - sum(b - a for a, b in r["tool_spans"])


def test_two_steps_with_the_local_engine(tmp_path):
    hist, batches, _ = _two_steps([*ARGS, "--rollout-dump-dir", str(tmp_path / "dumps")])
    _check(hist, batches, tmp_path / "dumps")


def test_two_steps_through_fake_sglang(tmp_path):
    argv = [
        *ARGS, "--rollout-dump-dir", str(tmp_path / "dumps"), "--rollout-engine", "sglang",
        "--rollout-server-cmd", f"{sys.executable} {FAKE}", "--rollout-base-port", str(free_port()),
        "--rollout-hf-dir", str(tmp_path / "hf"),
    ]  # fmt: skip
    hist, batches, log = _two_steps(argv)
    _check(hist, batches, tmp_path / "dumps")
    # Every model turn was a request on token ids: the prompt plus the response so far (here: after the
    # masked-out call and result); the engine's log-probs are kept for the tokens it generated (the fake's
    # are -0.01·(id + 1)), and the tool tokens' slots are 0.
    sent = [e["body"]["input_ids"] for e in log]
    for s in (s for b in batches for s in b.samples):
        first_policy = s.loss_mask.index(1)
        assert s.prompt_ids + s.response_ids[:first_policy] in sent
        for i, (t, m) in enumerate(zip(s.response_ids, s.loss_mask)):
            assert s.logprobs[i] == (pytest.approx(-0.01 * (t + 1)) if m else 0.0)
