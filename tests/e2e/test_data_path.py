"""The RLVR data path end to end: a converted checkpoint's tokenizer, a veRL-layout Parquet file with
message-list prompts and nested ground truth, math-verify rewards, the rollout dump and W&B offline."""

import json
import sys
import time

import pytest

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train.loop import run_training

DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{q}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


def _dapo_parquet(path, problems):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": DAPO_PROMPT.format(q=q), "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": str(i)},
        }
        for i, (q, a) in enumerate(problems)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_converted_checkpoint_tokenizer_verl_parquet_dump_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the 'wandb' extra is not installed")
    import tests.unit.test_families_parity as fp
    from megatron_mtp_rl import platform
    from tests.tiny_hf import make_hf_tokenizer
    from tests.wandb_reader import read_run
    from tools.show_rollouts import main as show

    monkeypatch.setenv("WANDB_SILENT", "true")
    # a MiMo-layout HF checkpoint (Qwen2 + MTP layers) whose directory holds a chat tokenizer
    monkeypatch.setitem(fp.TINY, "vocab_size", 320)  # 300 tokenizer ids + 20 padding rows, as real releases have
    hf = tmp_path / "hf"
    fp.make_family_checkpoint(hf, "mimo")
    make_hf_tokenizer(hf)
    try:
        fp.tool().hf_to_mcore(hf, tmp_path / "mcore")
    finally:
        platform.destroy()
    assert (tmp_path / "mcore" / "tokenizer" / "tokenizer.json").exists()

    data = tmp_path / "dapo.parquet"
    _dapo_parquet(data, [("What is 6*7?", "42"), ("Compute 1+1.", "2"), ("What is 2^3?", "8"), ("What is 9-2?", "7")])
    cfg_argv = [
        "--load", str(tmp_path / "mcore"), "--finetune",  # no --tokenizer, no shape flags: the checkpoint's
        "--prompt-data", str(data), "--label-key", "reward_model.ground_truth", "--reward-fn", "math_verify",
        "--system-prompt", "Be brief.",
        "--num-steps", "2", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
        "--rollout-max-response-len", "6", "--seq-length", "224", "--global-batch-size", "4",
        "--micro-batch-size", "2", "--eval-interval", "100", "--reward-workers", "0", "--quiet",
        "--metrics-jsonl", str(tmp_path / "m.jsonl"), "--rollout-dump-dir", str(tmp_path / "dumps"),
        "--rollout-dump-n", "3",
        "--wandb-project", "data-path", "--wandb-run-name", "e2e", "--wandb-mode", "offline",
        "--wandb-save-dir", str(tmp_path / "wb"),
    ]  # fmt: skip
    cfg = parse_config(cfg_argv)
    assert cfg.data.tokenizer == str(tmp_path / "mcore" / "tokenizer")
    hist = run_training(cfg)
    assert [h["step"] for h in hist] == [0, 1, 2]
    assert all(h["rollout/reward_errors"] == 0 for h in hist[1:]) and hist[2]["data/skipped_rows"] == 0

    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(hf))
    recs = [json.loads(ln) for ln in (tmp_path / "dumps" / "step_000002.jsonl").read_text().splitlines()]
    assert len(recs) == 3
    r = recs[0]
    q = next(m for m in ["What is 6*7?", "Compute 1+1.", "What is 2^3?", "What is 9-2?"] if m in r["prompt"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": DAPO_PROMPT.format(q=q)}]
    assert r["prompt"] == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert r["prompt_tokens"] == len(hf_tok(r["prompt"], add_special_tokens=False)["input_ids"])
    assert 1 <= r["response_tokens"] <= 6 and r["reward"] in (0.0, 1.0) and r["advantage"] is not None
    assert r["source"].startswith(str(data) + " row ") and r["label"] in ("42", "2", "8", "7")
    # the local sampler normalises over the model's 320 rows as the trainer does: no systematic gap
    assert abs(r["logprob_gap"]["mean"]) < 1e-3
    assert show([str(tmp_path / "dumps"), "--step", "2", "-n", "1"]) == 0

    # tools/eval_math.py formats benchmark questions as training does (chat template on, same system prompt)
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_math_dp", "tools/eval_math.py")
    em = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "eval_math_dp", em)
    spec.loader.exec_module(em)
    generate, formatter = em.local_generator(
        ["--load", str(tmp_path / "mcore"), "--system-prompt", "Be brief.", "--seq-length", "224"]
    )
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+1?"}]
    assert formatter("What is 1+1?") == hf_tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert len(generate([formatter("What is 1+1?")], 1, 0.0, 3, 0)[0]) == 1
    platform.destroy()

    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    for _ in range(100):
        history, config = read_run(run_dir)
        if [h.get("_step") for h in history] == [0, 1, 2]:
            break
        time.sleep(0.1)
    assert [h["_step"] for h in history] == [0, 1, 2]
    assert history[2]["rollout/reward_mean"] == pytest.approx(hist[2]["rollout/reward_mean"])
    assert config["data"]["label_key"] == "reward_model.ground_truth"
