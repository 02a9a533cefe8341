"""print_user_error: rank 0 prints at once; another rank stays quiet until the launcher ends it (exit 2),
and prints only when it outlives the grace (an error rank 0 did not see)."""

import signal

import pytest

from megatron_mtp_rl import errors


@pytest.fixture()
def handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _as_rank(monkeypatch, rank: int, on_sleep) -> list[float]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    slept: list[float] = []

    def sleep(seconds):
        slept.append(seconds)
        on_sleep()

    monkeypatch.setattr(errors.time, "sleep", sleep)
    monkeypatch.setattr(errors.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    return slept


def test_rank_0_prints_at_once(monkeypatch, capsys, handlers):
    slept = _as_rank(monkeypatch, 0, lambda: None)
    errors.print_user_error("error: bad flag")
    assert slept == [] and capsys.readouterr().err == "error: bad flag\n"


def test_another_rank_is_quiet_and_exits_2_when_the_launcher_ends_it(monkeypatch, capsys, handlers):
    slept = _as_rank(monkeypatch, 1, lambda: signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None))
    with pytest.raises(SystemExit) as e:
        errors.print_user_error("error: bad flag")
    assert e.value.code == 2 and slept == [errors.PEER_GRACE_S] and capsys.readouterr().err == ""


def test_another_rank_prints_an_error_rank_0_did_not_see_after_the_grace(monkeypatch, capsys, handlers):
    slept = _as_rank(monkeypatch, 1, lambda: None)
    errors.print_user_error("error: only here")
    assert slept == [errors.PEER_GRACE_S] and capsys.readouterr().err == "error: only here\n"
