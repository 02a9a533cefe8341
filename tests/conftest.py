import os

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def single_process():
    """A 1-process gloo group with parallel_state initialised (TP=PP=EP=1)."""
    from megatron_mtp_rl import platform

    platform.initialize(seed=1234)
    yield
    platform.destroy()
