import os
import sys
import time

import pytest

# CPU by default: tests see no CUDA device even on a GPU machine, so CPU results (and the CPU
# shims) are what they check. `make test-gpu` sets MTP_RL_TEST_GPU=1 to run tests/gpu on CUDA.
if os.environ.get("MTP_RL_TEST_GPU") != "1":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

_SHUFFLE_SEED = pytest.StashKey[int | None]()
_GROUPS_BEFORE = pytest.StashKey[dict]()
_GLOO_BEFORE = pytest.StashKey[int]()
_LEAKS = pytest.StashKey[list]()
# torch keeps the worker threads of two gloo groups (6 threads) once a default group has existed,
# however many are made and destroyed after it (measured on torch 2.14, CPU): not a leak, a floor.
_GLOO_FLOOR = 6


def pytest_addoption(parser):
    parser.addoption(
        "--shuffle-seed",
        default=os.environ.get("MTP_RL_TEST_SHUFFLE_SEED"),
        help="run the test files in a shuffled order, and each file's tests shuffled, from this seed "
        "('random': a new one, printed; 'off': file order; env MTP_RL_TEST_SHUFFLE_SEED). `make test` "
        "shuffles; rerun a failing order with the printed seed",
    )


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
    raw = (config.getoption("--shuffle-seed") or "off").strip().lower()
    if raw in ("off", "none", "no", ""):
        seed = None
    elif raw == "random":
        seed = int.from_bytes(os.urandom(4), "little") % 1_000_000
    else:
        try:
            seed = int(raw)
        except ValueError:
            raise pytest.UsageError(f"--shuffle-seed must be an integer, 'random' or 'off', not {raw!r}") from None
    config.stash[_SHUFFLE_SEED] = seed


def _shuffle_line(config) -> str | None:
    seed = config.stash.get(_SHUFFLE_SEED, None)
    return None if seed is None else f"shuffled order: --shuffle-seed {seed} (rerun this order with it)"


def pytest_report_header(config):
    return _shuffle_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for leak in config.stash.get(_LEAKS, []):
        terminalreporter.write_line(f"warning: {leak}: a destroyed process group is still referenced")
    line = _shuffle_line(config)
    if line:
        terminalreporter.write_line(line)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Shuffle (``--shuffle-seed``): the files' order, then each file's tests; `gpu` tests skip,
    saying why, wherever CUDA is absent or hidden.

    A file's tests stay together, so its module-scoped fixtures are built once, as in file order.
    """
    seed = config.stash.get(_SHUFFLE_SEED, None)
    if seed is not None:
        import random

        rng = random.Random(seed)
        files: dict[str, list] = {}
        for item in items:
            files.setdefault(item.nodeid.split("::")[0], []).append(item)
        order = list(files.values())
        rng.shuffle(order)
        for group in order:
            rng.shuffle(group)
        items[:] = [item for group in order for item in group]
        sys.stdout.write(f"\n{_shuffle_line(config)}\n")  # before any test runs, also under -q

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


# -- process groups: what a test makes, it destroys ---------------------------------------------
def _own_groups() -> dict:
    """Groups beside the shared in-process state (the default group, megatron-core's): named by a test.

    The weight sync's update group, a fake engine's end of it, a ``new_group`` of a test's own.
    """
    if "torch.distributed" not in sys.modules:
        return {}
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    ps = sys.modules.get("megatron.core.parallel_state")
    shared = {id(g) for g in (getattr(ps, "_global_process_group_list", None) or []) if g is not None}
    world = dist.group.WORLD if dist.is_initialized() else None
    return {id(pg): (pg, name) for pg, name in _world.pg_names.items() if pg is not world and id(pg) not in shared}


def _gloo_threads() -> int:
    """This process's gloo worker threads (each gloo group runs two ``pt_gloo_runloop`` and a ``gloo_tcp_loop``)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().strip() in ("pt_gloo_runloop", "gloo_tcp_loop")
        except OSError:
            pass
    return n


_LAST_FILE = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """A file's first test: the file before it must have left no gloo threads (see ``_check_gloo_threads``)."""
    item.stash[_GROUPS_BEFORE] = _own_groups()
    file = item.nodeid.split("::")[0]
    if item.session.stash.get(_LAST_FILE, None) != file:
        before = item.session.stash.get(_LAST_FILE, None)
        item.session.stash[_LAST_FILE] = file
        if before is not None:
            _check_gloo_threads(item.session, before)
        item.session.stash[_GLOO_BEFORE] = _gloo_threads()
    return (yield)


def _check_gloo_threads(session, file: str) -> None:
    """``file`` ended with its groups destroyed (``_in_process_state``): the gloo worker threads must be
    back where they were. A destroyed group still referenced keeps its threads (hundreds of them made the
    interpreter's exit crash). Checked once pytest has let go of the file's last test's fixtures."""
    was, now = session.stash.get(_GLOO_BEFORE, 0), _gloo_threads()
    if now > max(was, _GLOO_FLOOR):  # a collection (seconds with torch loaded) only when it may matter
        import gc

        gc.collect()
        now = _gloo_threads()
        if now > max(was, _GLOO_FLOOR) and "torch" in sys.modules:  # models kept only by their autograd graphs
            import torch

            from megatron_mtp_rl.train.release import release_graphs

            release_graphs(*[o for o in gc.get_objects() if isinstance(o, torch.nn.Module)])
            gc.collect()
            now = _gloo_threads()
        # A destroyed group's worker threads end on their own schedule (seconds on a loaded machine):
        # what is still there after a short wait is a leak.
        deadline = time.monotonic() + 10.0
        while now > max(was, _GLOO_FLOOR) and time.monotonic() < deadline:
            time.sleep(0.25)
            now = _gloo_threads()
    session.stash[_GLOO_BEFORE] = now
    if now > max(was, _GLOO_FLOOR):
        # Reported, not failed: in a few shuffled orders a file still leaves one group's threads (a test
        # that failed keeps its model in the traceback, too). Named groups left behind fail the test.
        leak = f"{file} left {now - was} gloo worker threads ({was} → {now})"
        session.config.stash.setdefault(_LEAKS, []).append(leak)


def pytest_sessionfinish(session, exitstatus):
    file = session.stash.get(_LAST_FILE, None)
    if file is None:
        return
    _check_gloo_threads(session, file)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Fail loudly where a test leaves a process group of its own behind.

    A test's own groups (not the default group, not megatron-core's, which each file's end destroys)
    must be gone after its teardown.
    """
    result = yield
    before = item.stash.get(_GROUPS_BEFORE, {})
    left = {k: v for k, v in _own_groups().items() if k not in before}
    if left:
        from megatron_mtp_rl.platform.distributed import _destroy_group

        names = sorted(name for _, name in left.values())
        for pg, _ in left.values():
            _destroy_group(pg)  # the next test must not inherit them
        raise AssertionError(f"{item.nodeid} left process groups behind: {names}; a test destroys the groups it makes")
    return result


@pytest.fixture(scope="module", autouse=True)
def _in_process_state():
    """In-process runs (the trainer's ``prepare``, the tools, ``single_process``) share this process's
    default group and megatron-core's groups; each file ends with all of them destroyed."""
    yield
    if "torch.distributed" in sys.modules:
        from megatron_mtp_rl.platform.distributed import destroy_all_groups

        destroy_all_groups()


@pytest.fixture(scope="module")
def single_process():
    """A 1-process gloo group with parallel_state initialised (TP=PP=EP=1), destroyed at the file's end.

    Idempotent: in-process runs of the trainer or the tools (which tear every group down
    when they finish) may run before a test that asks for it again.
    """
    from megatron.core import parallel_state

    from megatron_mtp_rl import platform

    if not parallel_state.model_parallel_is_initialized():
        platform.initialize(seed=1234)
    yield
    platform.destroy_all_groups()
