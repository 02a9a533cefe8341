"""Checkpoints with megatron-core dist checkpointing: model, optimizer and trainer state.

Layout::

    SAVE/iter_0000012/            megatron dist checkpoint (model + optimizer shards)
    SAVE/iter_0000012/trainer_state.pt   step, data cursor, OCC state, LR scheduler, shapes
    SAVE/latest_checkpointed_iteration.txt

A checkpoint is written to ``SAVE/.tmp_iter_*`` and renamed into place once every rank
has finished, and the ``latest`` file is replaced atomically afterwards, so a crash during a
save leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.train import faults

LATEST = "latest_checkpointed_iteration.txt"
_ITER = re.compile(r"^iter_(\d{7})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sharded(model, optimizer, *, loading: bool) -> dict:
    model_sd = unwrap(model).sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading)
    return state


def save_checkpoint(save_dir: str, step: int, model, optimizer, trainer_state: dict, keep_last: int = 2) -> Path:
    """Write ``SAVE/iter_{step}`` atomically (collective: every rank calls it)."""
    root = Path(save_dir)
    name = f"iter_{step:07d}"
    tmp = root / f".tmp_{name}"
    final = root / name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(_sharded(model, optimizer, loading=False), str(tmp))
    if faults.active("crash_in_save"):
        os._exit(17)  # fault injection: die after the shards, before publishing
    _barrier()
    if _rank() == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(f"{step}\n")
        os.replace(latest_tmp, root / LATEST)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    iters = sorted(p for p in root.iterdir() if _ITER.match(p.name))
    for old in iters[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(load_dir: str) -> Path | None:
    """The directory named by ``latest_checkpointed_iteration.txt``, if any."""
    root = Path(load_dir)
    f = root / LATEST
    if not f.exists():
        return None
    step = int(f.read_text().strip())
    path = root / f"iter_{step:07d}"
    if not path.exists():
        raise FileNotFoundError(f"{f} names step {step} but {path} does not exist")
    return path


def read_trainer_state(path: Path) -> dict:
    return torch.load(path / "trainer_state.pt", weights_only=False)


def load_checkpoint(load_dir: str, model, optimizer=None) -> tuple[Path, dict]:
    """Load model (and optimizer, unless None) from the latest checkpoint in ``load_dir``."""
    path = latest_checkpoint(load_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {load_dir} (missing {LATEST})")
    state = dist_checkpointing.load(_sharded(model, optimizer, loading=True), str(path))
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return path, read_trainer_state(path)
