import os

import pytest

_EXIT_STATUS = pytest.StashKey[int]()

# CPU by default: tests see no CUDA device even on a GPU machine, so CPU results (and the CPU
# shims) are what they check. `make test-gpu` sets MTP_RL_TEST_GPU=1 to run tests/gpu on CUDA.
if os.environ.get("MTP_RL_TEST_GPU") != "1":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (make test-gpu); skipped with the reason elsewhere")
    config.addinivalue_line(
        "markers",
        "slow: a second variant of a covered layout, a minute-long timeout or a tool smoke run; "
        "`make test` deselects it, `make test-all` runs it",
    )
    config.addinivalue_line(
        "markers", "sglang: talks to the real SGLang engine (`make sglang`; fixture real_sglang, tests/real_sglang.py)"
    )


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process once everything is reported, without tearing the interpreter down.

    The in-process tests leave threads behind that nothing can join (gloo's per-group workers,
    Ray's core-worker threads after ``ray.shutdown``, hundreds of them by the end); the
    interpreter's teardown under them has segfaulted after a green summary, turning a passing
    run into exit code 139. The trainer's own processes are not affected: each command exits normally.
    """
    import sys

    if _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip, saying why, wherever CUDA is absent or hidden."""
    import torch

    if torch.cuda.is_available():
        return
    why = (
        "needs a CUDA device: run `make test-gpu` on a GPU machine"
        if os.environ.get("MTP_RL_TEST_GPU") == "1"
        else "CPU run: CUDA is hidden from tests unless MTP_RL_TEST_GPU=1 (make test-gpu)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def real_sglang_server(tmp_path_factory):
    """The session's one real SGLang engine (tests/real_sglang.py), started by the first ``serve``."""
    from tests.real_sglang import session_fixture

    yield from session_fixture(tmp_path_factory)


@pytest.fixture
def real_sglang(real_sglang_server):
    """The session's real SGLang engine, alive (restarted on its model if a previous test killed it)."""
    real_sglang_server.ensure_alive()
    return real_sglang_server


@pytest.fixture(scope="module")
def single_process():
    """A 1-process gloo group with parallel_state initialised (TP=PP=EP=1).

    Module-scoped and idempotent: in-process runs of the trainer or the tools (which tear
    parallel_state down when they finish) may run between modules.
    """
    from megatron.core import parallel_state

    from megatron_mtp_rl import platform

    if not parallel_state.model_parallel_is_initialized():
        platform.initialize(seed=1234)
    yield
