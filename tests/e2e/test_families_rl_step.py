"""One RL step from a converted checkpoint of each HF family with ``--load`` alone (no shape flags).

The checkpoint is a tiny random transformers model of the family (tests/unit/test_families_parity.py),
converted with tools/convert_checkpoint.py; the run takes every model argument from the checkpoint
(the arith task's 18-token tokenizer fits in its 64-row vocabulary).
"""

from __future__ import annotations

import json

import pytest

from tests.unit.test_families_parity import FAMILIES, make_family_checkpoint, tool

FAST = [
    "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "4",
    "--global-batch-size", "4", "--micro-batch-size", "4", "--seq-length", "16", "--num-eval-prompts", "4",
    "--eval-interval", "10", "--quiet", "--num-steps", "1", "--reward-workers", "0",
]  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_rl_step_from_converted_checkpoint_with_load_alone(tmp_path, family):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.loop import run_training

    make_family_checkpoint(tmp_path / "hf", family)
    _, margs = tool().hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    platform.destroy()
    cfg = parse_config([*FAST, "--load", str(tmp_path / "mcore"), "--finetune", "--metrics-jsonl",
                        str(tmp_path / "m.jsonl")])  # fmt: skip
    run_training(cfg)
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines() if x.strip()]
    step = [r for r in rows if r.get("step") == 1]
    assert step and all(v == v for v in step[-1].values() if isinstance(v, float))  # finite (no NaN)
    if margs.mtp_num_layers:
        assert "mtp/logprob_1" in step[-1]  # the converted MTP head was trained and scored


def test_one_rl_step_straight_from_an_hf_directory(tmp_path):
    """``--load HF_DIR``: shape, dtype and tokenizer from the release, each rank reading its slices;
    the KL reference is read from the same directory."""
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.loop import run_training
    from tests.hf_release import make_release

    hf = make_release(tmp_path / "hf", "glm4_moe", hidden=64, layers=2, experts=4, mtp_layers=1, shards=3,
                      tokenizer=True, vocab_size=320)  # fmt: skip
    platform.destroy()
    cfg = parse_config([*FAST, "--load", str(hf), "--kl-coef", "0.01", "--metrics-jsonl", str(tmp_path / "m.jsonl")])
    assert cfg.data.tokenizer == str(hf)
    run_training(cfg)
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines() if x.strip()]
    step = [r for r in rows if r.get("step") == 1][-1]
    assert all(v == v for v in step.values() if isinstance(v, float))
    assert "mtp/logprob_1" in step and step["train/kl"] == 0.0  # reference == the loaded release on update 1
