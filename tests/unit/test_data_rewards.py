"""Prompt sources, rewards and tokenizers."""

import json

import pytest

from megatron_mtp_rl.rollout.data import ArithTask, BadRowError, FilePromptSource
from megatron_mtp_rl.rollout.rewards import exact_match, last_boxed, load_reward_fn, math_verify
from megatron_mtp_rl.rollout.tokenizer import ByteTokenizer, build_tokenizer


def always_half(prompt, response, label):
    return 0.5


def test_arith_is_deterministic_and_held_out_is_disjoint():
    a, b = ArithTask(seed=3, num_eval=50), ArithTask(seed=3, num_eval=50)
    assert a.take(10, 5) == b.take(10, 5)
    assert a.take(10, 5) != ArithTask(seed=4, num_eval=50).take(10, 5)
    evals = {p.text for p in a.eval_prompts()}
    assert len(evals) == 50
    assert not evals & {p.text for p in a.take(0, 2000)}
    p = a.take(0, 1)[0]
    x, y = p.text[:-1].split("+")
    assert p.label == str(int(x) + int(y))


def test_rewards():
    assert exact_match("1+1=", " 2 ", "2") == 1.0
    assert exact_match("1+1=", "3", "2") == 0.0
    assert last_boxed(r"so \boxed{\frac{1}{2}} or \boxed{x^{2}}") == "x^{2}"
    assert math_verify("", r"the answer is \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert math_verify("", r"\boxed{3}", "4") == 0.0
    assert math_verify("", "no box here: 4", "4") == 0.0
    assert load_reward_fn("exact_match") is exact_match
    assert load_reward_fn("tests.unit.test_data_rewards:always_half")("", "", "") == 0.5
    with pytest.raises(ValueError, match="cannot load"):
        load_reward_fn("tests.unit.test_data_rewards:nope")


def test_tokenizers_round_trip():
    t = build_tokenizer("arith")
    assert t.decode(t.encode("12+34=")) == "12+34="
    with pytest.raises(ValueError, match="not in the tokenizer alphabet"):
        t.encode("x")
    b = ByteTokenizer()
    assert b.decode(b.encode("∫x dx = ½")) == "∫x dx = ½"


def test_jsonl_source_reports_every_bad_row_with_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        json.dumps({"q": "What is 1+1?", "a": "2"}),
        "{not json",
        json.dumps({"q": "missing label"}),
        json.dumps({"q": 5, "a": "1"}),
        json.dumps({"q": "   ", "a": "1"}),
        json.dumps({"q": "x" * 200, "a": "1"}),
        json.dumps(["a", "list"]),
        json.dumps({"q": "What is 2+2?", "a": 4}),
    ]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(BadRowError, match=r"p.jsonl:2: invalid JSON"):
        FilePromptSource(str(path), input_key="q", label_key="a")
    src = FilePromptSource(
        str(path), input_key="q", label_key="a", on_bad_row="skip", tokenizer=ByteTokenizer(), max_prompt_tokens=100
    )
    assert src.skipped == 6
    lines = [int(p.split(".jsonl:")[1].split(":")[0]) for p in src.problems]
    assert lines == [2, 3, 4, 5, 6, 7]
    assert "missing key(s) ['a']" in src.problems[1]
    assert "must be a string, got int" in src.problems[2]
    assert "is empty" in src.problems[3]
    assert "200 tokens, more than the 100 allowed" in src.problems[4]
    got = src.take(0, 4)
    assert sorted({p.text for p in got}) == ["What is 1+1?", "What is 2+2?"]
    assert src.take(0, 4) == got  # deterministic


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", ""], "label": ["1", "2", "3"]}), path)
    with pytest.raises(BadRowError, match=r"p.parquet row 3: 'prompt' is empty"):
        FilePromptSource(str(path))
    assert FilePromptSource(str(path), on_bad_row="skip").skipped == 1
