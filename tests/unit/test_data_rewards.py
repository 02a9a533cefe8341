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


def test_one_digit_arith_holds_out_half_its_problems_with_a_note(capsys):
    """1-digit '+' has 100 distinct problems: the default 200 eval prompts cannot be held out, so half
    are (distinct, never trained on) and a note says so; a direct ask for more is refused."""
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.builders import build_data_source

    assert ArithTask.distinct_problems(1, "+") == 100 and ArithTask.max_eval(1, "+*", 2) == 10**4
    source = build_data_source(parse_config(["--arith-digits", "1"], "pretrain"), None)
    err = capsys.readouterr().err
    assert "--num-eval-prompts 200" in err and "100 distinct problems; holding out 50" in err
    evals = {p.text for p in source.eval_prompts()}
    assert len(evals) == 50
    train = {p.text for p in source.take(0, 500)}
    assert not evals & train and len(train) == 50  # the other half, every one of them drawn
    build_data_source(parse_config(["--arith-digits", "1", "--num-eval-prompts", "50"], "pretrain"), None)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="--num-eval-prompts 51 leaves too few training problems"):
        ArithTask(digits=1, num_eval=51)


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
    assert "must be a string or a list of messages, got int" in src.problems[2]
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


# --- the RLVR data path: HF tokenizers, chat templates, dataset layouts, bad rows -------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.tiny_hf import make_hf_tokenizer

    return make_hf_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return build_tokenizer(str(hf_dir), extra_stop_ids=(7,))


def _ids(encoding):
    return encoding["input_ids"] if isinstance(encoding, dict) or hasattr(encoding, "keys") else encoding


def test_chat_template_is_exactly_apply_chat_template(hf_tok):
    from megatron_mtp_rl.rollout.chat import ChatFormatError, PromptFormat, format_prompt

    hf = hf_tok.hf
    eos, endoftext = hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert hf_tok.eos_id == eos and hf_tok.stop_ids == (eos, endoftext, 7)  # config, generation_config, flag
    assert hf_tok.bos_id is None and hf_tok.vocab_size == len(hf)
    msgs = [{"role": "user", "content": "What is 1+1?"}]
    fmt = PromptFormat(system_prompt="Be brief.", chat_template_kwargs={"enable_thinking": False})
    text = format_prompt(msgs, hf_tok, fmt)
    full = [{"role": "system", "content": "Be brief."}, *msgs]
    ref = hf.apply_chat_template(full, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == ref and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ref_ids = _ids(hf.apply_chat_template(full, tokenize=True, add_generation_prompt=True, enable_thinking=False))
    assert hf_tok.encode(text) == list(ref_ids)
    assert hf_tok.encode_batch([text, "What is 1+1?"]) == [hf_tok.encode(text), hf_tok.encode("What is 1+1?")]
    # a row's own system message wins over --system-prompt
    own = [{"role": "system", "content": "Row system."}, *msgs]
    own_text = format_prompt(own, hf_tok, fmt)
    assert own_text.count("<|im_start|>system") == 1 and "Row system." in own_text
    # text prompts: as is by default, one user message with --apply-chat-template
    assert format_prompt("What is 1+1?", hf_tok) == "What is 1+1?"
    forced = format_prompt("What is 1+1?", hf_tok, PromptFormat(apply_chat_template=True))
    assert forced == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ChatFormatError, match="no chat template is applied"):
        format_prompt(msgs, hf_tok, PromptFormat(apply_chat_template=False))
    with pytest.raises(ChatFormatError, match="ByteTokenizer has none"):
        format_prompt(msgs, ByteTokenizer())
    with pytest.raises(ChatFormatError, match="--apply-chat-template needs a tokenizer with a chat template"):
        PromptFormat(apply_chat_template=True).validate(ByteTokenizer())


def test_verl_parquet_layout_with_nested_ground_truth(tmp_path, hf_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_mtp_rl.rollout.chat import PromptFormat

    path = tmp_path / "dapo.parquet"
    q = "Solve the following math problem step by step.\n\nWhat is 6*7?"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "data_source": "math_dapo",
                    "prompt": [{"content": q, "role": "user"}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": "42", "style": "rule-lighteval/MATH_v2"},
                    "extra_info": {"index": "a1"},
                },
                {
                    "data_source": "math_dapo",
                    "prompt": [{"content": "", "role": "user"}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": "1", "style": "rule"},
                    "extra_info": {"index": "a2"},
                },
            ]
        ),
        path,
    )
    src = FilePromptSource(
        str(path),
        label_key="reward_model.ground_truth",
        tokenizer=hf_tok,
        fmt=PromptFormat(),
        on_bad_row="skip",
        max_prompt_tokens=400,
    )
    assert src.skipped == 1 and "dapo.parquet row 2: 'prompt': every message is empty" in src.problems[0]
    p = src.take(0, 1)[0]
    assert p.label == "42" and p.where.endswith("dapo.parquet row 1")
    assert p.text == hf_tok.hf.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
    )


def test_prompt_template_named_and_dotted_fields(tmp_path):
    path = tmp_path / "deepscaler.json"  # DeepScaleR ships one JSON array
    rows = [
        {"problem": "What is $2^{10}$?", "answer": "1024", "solution": "...", "meta": {"src": "amc"}},
        {"problem": "Compute 3+4.", "answer": "7", "solution": "...", "meta": {"src": "aime"}},
    ]
    path.write_text(json.dumps(rows))
    tpl = "[{meta.src}] {problem} Let's think step by step and output the final answer within \\boxed{}."
    src = FilePromptSource(str(path), label_key="answer", template=tpl)
    texts = sorted(p.text for p in src.take(0, 2))
    assert texts[0] == "[aime] Compute 3+4. Let's think step by step and output the final answer within \\boxed{}."
    assert texts[1].startswith("[amc] What is $2^{10}$?")
    assert {p.where.rsplit(" ", 1)[1] for p in src.take(0, 2)} == {"1", "2"}
    # {{ }} stay the str.format escapes; a field the row lacks is a bad row naming it
    assert (
        FilePromptSource(str(path), label_key="answer", template="{problem} \\boxed{{}}")
        .take(0, 1)[0]
        .text.endswith("\\boxed{}")
    )
    with pytest.raises(BadRowError, match=r"deepscaler.json item 1: missing key\(s\) \['question'\]"):
        FilePromptSource(str(path), label_key="answer", template="{question}")


def test_math_layout_scores_against_the_boxed_solution():
    # MATH rows carry no separate answer: --label-key solution, math-verify reads the gold's \boxed{}
    solution = r"We have $x^2=9$ and $x>0$, so $x = \boxed{3}$."
    assert math_verify("", r"so \boxed{3}", solution) == 1.0
    assert math_verify("", r"so \boxed{-3}", solution) == 0.0
    # DAPO-Math-17k asks for "Answer: $Answer" on the last line instead of \boxed{}
    assert math_verify("", "6*7 = 42.\nAnswer: 42", "42") == 1.0
    assert math_verify("", "Answer: $\\frac{1}{2}$\n", "0.5") == 1.0
    assert math_verify("", "Answer: 41", "42") == 0.0


def test_every_bad_row_in_one_message_first_20_then_a_count(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": "ok", "label": "1"})] + [json.dumps({"prompt": "x"})] * 30
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRowError) as e:
        FilePromptSource(str(path))
    msg = str(e.value)
    assert msg.startswith("30 bad prompt row(s) (--on-bad-row skip drops them):")
    listed = [ln for ln in msg.splitlines() if "bad.jsonl:" in ln]
    assert [int(ln.split("bad.jsonl:")[1].split(":")[0]) for ln in listed] == list(range(2, 22))
    assert msg.splitlines()[-1].strip() == "... and 10 more bad row(s)"
    assert FilePromptSource(str(path), on_bad_row="skip").skipped == 30
    everything_bad = tmp_path / "allbad.jsonl"
    everything_bad.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(
        BadRowError, match=r"no usable prompt rows; 30 bad prompt row\(s\):\n  .*allbad.jsonl:1: missing"
    ):
        FilePromptSource(str(everything_bad), on_bad_row="skip")


def test_non_utf8_bytes_name_the_line_and_skip_honours_them(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "What is 1+1?", "label": "2"}).encode()
    path.write_bytes(good + b"\n" + '{"prompt": "caf\u00e9", "label": "1"}'.encode("latin-1") + b"\n" + good + b"\n")
    with pytest.raises(BadRowError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        FilePromptSource(str(path))
    src = FilePromptSource(str(path), on_bad_row="skip")
    assert src.skipped == 1 and len(src.rows) == 2


def test_too_long_prompts_are_found_at_start_up_with_the_rule(tmp_path, hf_tok):
    from megatron_mtp_rl.rollout.chat import PromptFormat

    path = tmp_path / "long.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "What is 1+1? " * n}], "label": "2"} for n in (1, 200, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rule = "--seq-length 128 - --rollout-max-response-len 64 - 1"
    with pytest.raises(BadRowError, match=rf"long.jsonl:2: prompt has \d+ tokens, more than the 63 allowed \({rule}\)"):
        FilePromptSource(str(path), tokenizer=hf_tok, fmt=PromptFormat(), max_prompt_tokens=63, length_rule=rule)


def test_tokenizer_files_travel_with_the_checkpoint(tmp_path, hf_dir, hf_tok):
    from megatron_mtp_rl.rollout.tokenizer import (
        TokenizerError,
        check_vocab,
        checkpoint_tokenizer_dir,
        copy_tokenizer_files,
    )

    ckpt = tmp_path / "ckpt"
    assert checkpoint_tokenizer_dir(ckpt) is None
    copied = copy_tokenizer_files(hf_dir, ckpt / "tokenizer")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(copied)
    found = checkpoint_tokenizer_dir(ckpt)
    assert found == ckpt / "tokenizer"
    again = build_tokenizer(str(found))
    assert again.encode("What is 1+1?") == hf_tok.encode("What is 1+1?") and again.chat_template
    assert copy_tokenizer_files(tmp_path / "no_tokenizer_here", tmp_path / "x") == []
    check_vocab(hf_tok, hf_tok.vocab_size)
    with pytest.raises(TokenizerError, match=r"has 300 tokens but the model has a vocabulary of 259"):
        check_vocab(hf_tok, 259)
    with pytest.raises(TokenizerError, match="expected 'arith', 'byte' or a local HF tokenizer directory"):
        build_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty holds no tokenizer files \(expected one of tokenizer.json"):
        build_tokenizer(str(tmp_path / "empty"))


def test_long_tailed_arith_has_mostly_short_and_some_long_answers():
    task = ArithTask(seed=0, digits=1, ops="+*", num_eval=20, max_digits=3)
    prompts = task.take(0, 2000)
    lengths = [len(p.label) for p in prompts]
    assert min(lengths) == 1 and max(lengths) == 6  # answers of 1 to 6 digits
    short = sum(n <= 2 for n in lengths)
    assert short > len(lengths) // 2 > sum(n >= 4 for n in lengths) > 20  # a long tail: rare, present
    for p in prompts[:200]:
        a, op, b = p.text[:-1].partition("*") if "*" in p.text else p.text[:-1].partition("+")
        assert p.label == str(int(a) * int(b) if op == "*" else int(a) + int(b))
    assert task.take(5, 3) == ArithTask(seed=0, digits=1, ops="+*", num_eval=20, max_digits=3).take(5, 3)
