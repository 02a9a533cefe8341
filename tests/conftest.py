import os

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


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
