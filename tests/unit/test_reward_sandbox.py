"""Reward calls that hang, raise or crash score 0, are counted, and never stop scoring."""

import time

from megatron_mtp_rl.rollout.reward_sandbox import RewardSandbox, build_scorer


def test_sandbox_survives_hang_raise_and_abort():
    items = [("p", "r", "l")] * 3
    for spec, kind in [("tests.reward_faults:hang", "timeouts"), ("tests.reward_faults:abort", "crashes")]:
        sb = RewardSandbox(spec, workers=1, timeout_s=0.5)
        try:
            t0 = time.monotonic()
            assert sb.score(items) == [0.0, 0.0, 0.0]
            assert sb.stats.errors == 3 and getattr(sb.stats, kind) == 3
            assert time.monotonic() - t0 < 30
        finally:
            sb.close()
    sb = RewardSandbox("tests.reward_faults:boom", workers=2, timeout_s=5)
    try:
        assert sb.score(items) == [0.0, 0.0, 0.0]
        assert sb.stats.errors == 3 and "boom" in sb.stats.last_errors[-1]
    finally:
        sb.close()


def test_every_item_scored_exactly_once_after_a_crash_mid_chunk():
    from megatron_mtp_rl.rollout.data import ArithTask
    from tests.reward_faults import kind_of

    prompts = [p.text for p in ArithTask(seed=0, num_eval=10).take(0, 40)]
    items = [(p, "x", "x") for p in prompts]
    # Only raises/aborts here (hangs would just be slow): replace hangs by ok.
    items = [it if kind_of(it[0]) != "hang" else (it[0] + " ", "x", "x") for it in items]
    sb = RewardSandbox("tests.reward_faults:flaky", workers=2, timeout_s=5)
    try:
        scores = sb.score(items)
    finally:
        sb.close()
    expected = [1.0 if kind_of(p) == "ok" else 0.0 for p, _, _ in items]
    assert scores == expected
    bad = sum(kind_of(p) in ("raise", "abort") for p, _, _ in items)
    assert bad > 0 and sb.stats.errors == bad


def test_in_process_scorer_counts_exceptions():
    s = build_scorer("tests.reward_faults:boom", workers=0, timeout_s=1)
    assert s.score([("p", "r", "l")]) == [0.0] and s.stats.errors == 1


def test_non_numbers_and_non_finite_rewards_are_errors_not_scores():
    import pytest

    from megatron_mtp_rl.rollout.rewards import check_reward

    assert check_reward(1) == 1.0 and check_reward(True) == 1.0
    for bad, msg in [(float("nan"), "returned nan"), (float("inf"), "returned inf"), ("0.75", "returned str '0.75'"),
                     (None, "returned NoneType None")]:  # fmt: skip
        with pytest.raises((TypeError, ValueError), match=msg):
            check_reward(bad)
    sb = RewardSandbox("tests.reward_faults:nan", workers=1, timeout_s=5)
    try:
        assert sb.score([("p", "r", "l")] * 2) == [0.0, 0.0] and sb.stats.errors == 2
        assert "returned nan" in sb.stats.first_error
    finally:
        sb.close()
    s = build_scorer("tests.reward_faults:string", workers=0, timeout_s=1)
    assert s.score([("p", "r", "l")]) == [0.0] and "returned str '0.75'" in s.stats.last_errors[-1]


def test_a_step_where_every_reward_fails_stops_with_the_worker_traceback():
    import pytest

    from megatron_mtp_rl.rollout.reward_sandbox import RewardError, check_step_rewards

    s = build_scorer("tests.reward_faults:boom", workers=0, timeout_s=1)
    s.score([("p", "r", "l")] * 3)
    with pytest.raises(RewardError, match=r"(?s)every reward call of step 7 failed \(3 of 3\).*Traceback.*"
                                          r"reward_faults.py.*ValueError: boom"):  # fmt: skip
        check_step_rewards(s.stats, errors=3, scored=3, step=7)
    check_step_rewards(s.stats, errors=2, scored=3, step=8)  # some succeeded: the run goes on


def test_reward_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    import sys

    (tmp_path / "my_local_reward.py").write_text("def score(p, r, l):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sb = RewardSandbox("my_local_reward:score", workers=1, timeout_s=5)
    try:
        assert sb.score([("p", "r", "l")]) == [0.5] and sb.stats.errors == 0
    finally:
        sb.close()
