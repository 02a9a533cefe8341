"""Checkpoints with megatron-core dist checkpointing: model, optimizer and trainer state.

Layout::

    SAVE/iter_0000012/            megatron dist checkpoint (model + optimizer shards)
    SAVE/iter_0000012/trainer_state.pt   step, data cursor, OCC state, LR scheduler, shapes
    SAVE/iter_0000012/manifest.json      size + sha256 of every file above
    SAVE/latest_checkpointed_iteration.txt

A checkpoint is written to ``SAVE/.tmp_iter_*`` and renamed into place once every rank
has finished, and the ``latest`` file is replaced atomically afterwards, so a crash during a
save leaves the previous checkpoint as the latest loadable one (its leftover ``.tmp_iter_*``
is removed by the next save). The manifest is checked before a load, so a flipped or
truncated shard is an error naming the file instead of silently wrong weights; parameters
that are not finite after the load are refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_mtp_rl.errors import ConfigError, DataError
from megatron_mtp_rl.models.forward import unwrap
from megatron_mtp_rl.train import faults
from megatron_mtp_rl.train.jsonl_log import next_free_name

LATEST = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
_ITER = re.compile(r"^iter_(\d{7})$")
_TMP = re.compile(r"^\.tmp_iter_\d{7}$")
_CHUNK = 8 << 20  # hash in 8 MiB reads: constant memory for shards of any size


class CheckpointError(DataError):
    """A checkpoint that cannot be loaded as written (corrupt, truncated, non-finite); names the file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    """Every rank's ``obj`` (a small picklable value), on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _sharded(model, optimizer, *, loading: bool) -> dict:
    model_sd = unwrap(model).sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading)
    return state


def file_digest(path: Path) -> str:
    """sha256 of a file, read in chunks (xxhash is not installed here; sha256 runs at ~1-2 GB/s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_my_share(root: Path, names: list[str]) -> dict:
    """Size and digest of this rank's share of ``names`` (ranks split the files round-robin)."""
    return {n: {"size": (root / n).stat().st_size, "sha256": file_digest(root / n)} for n in names[_rank() :: _world()]}


def write_manifest(root: Path) -> None:
    """Collective: hash every file of ``root`` (split over ranks) and write ``root/manifest.json`` on rank 0."""
    names = _files(root) if _rank() == 0 else None
    if dist.is_initialized() and _world() > 1:
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    entries: dict = {}
    for part in _gather(_hash_my_share(root, names)):
        entries.update(part)
    if _rank() == 0:
        tmp = root / f".{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            json.dump({"algorithm": "sha256", "files": dict(sorted(entries.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST)


def _read_manifest(path: Path) -> dict | None:
    f = path / MANIFEST
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: unreadable checkpoint manifest ({e})") from None


def _check_file(path: Path, name: str, want: dict) -> str | None:
    f = path / name
    if not f.exists():
        return f"checkpoint file {f} is missing (listed in {MANIFEST})"
    size = f.stat().st_size
    if size != want["size"]:
        return f"checkpoint file {f} is truncated or overwritten: {size} bytes, {want['size']} when it was saved"
    got = file_digest(f)
    if got != want["sha256"]:
        return f"checkpoint file {f} is corrupt: sha256 {got[:16]}… differs from the one recorded at save"
    return None


_warned_unverified: set[str] = set()


def verify_checkpoint(path: Path) -> bool:
    """Collective: check every file against the manifest (ranks split the files); False when there is none.

    Raises ``CheckpointError`` on every rank when any rank finds a mismatch, so no rank is
    left waiting in a later collective.
    """
    manifest = _read_manifest(path)
    if manifest is None:
        if _rank() == 0 and str(path) not in _warned_unverified:
            _warned_unverified.add(str(path))
            print(f"warning: {path} has no {MANIFEST} (saved before checksums): loading it unverified", file=sys.stderr)
        return False
    names = sorted(manifest)
    mine = [_check_file(path, n, manifest[n]) for n in names[_rank() :: _world()]]
    errors = [e for part in _gather([e for e in mine if e]) for e in part]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CheckpointError(errors[0] + more)
    return True


def check_finite(model) -> None:
    """Collective: refuse parameters holding NaN/inf (named), on every rank when any rank has one."""
    bad = None
    for name, p in unwrap(model).named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            bad = f"parameter {name} holds NaN/inf after the load"
            break
    found = [b for b in _gather(bad) if b]
    if found:
        raise CheckpointError(found[0])


def _remove_leftovers(root: Path) -> None:
    """``.tmp_iter_*`` left by a crashed save (the run lock guarantees no other run is writing them)."""
    for p in root.iterdir():
        if _TMP.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    save_dir: str,
    step: int,
    model,
    optimizer,
    trainer_state: dict,
    keep_last: int = 2,
    parts: dict | None = None,
) -> Path:
    """Write ``SAVE/iter_{step}`` atomically with its manifest (collective: every rank calls it).

    ``parts`` (``{name: (model, optimizer)}``, e.g. the critic) are saved as dist checkpoints in
    ``SAVE/iter_{step}/name/``, inside the same atomic rename and manifest.
    """
    from megatron_mtp_rl.platform.distributed import in_process_checkpoint_writes

    in_process_checkpoint_writes()
    root = Path(save_dir)
    name = f"iter_{step:07d}"
    tmp = root / f".tmp_{name}"
    final = root / name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(_sharded(model, optimizer, loading=False), str(tmp))
    for part, (part_model, part_optimizer) in (parts or {}).items():
        if _rank() == 0:
            (tmp / part).mkdir()
        _barrier()
        dist_checkpointing.save(_sharded(part_model, part_optimizer, loading=False), str(tmp / part))
    if faults.active("crash_in_save"):
        os._exit(17)  # fault injection: die after the shards, before publishing
    _barrier()
    if _rank() == 0:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    _barrier()
    write_manifest(tmp)
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(f"{step}\n")
        os.replace(latest_tmp, root / LATEST)
        _prune(root, step, keep_last)
    _barrier()
    return final


def _iterations(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _ITER.match(p.name)) and p.is_dir())


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Keep the ``keep_last`` newest iterations up to ``step``; never touch iterations after it."""
    if keep_last <= 0:
        return
    older = [p for s, p in _iterations(root) if s <= step]
    for old in older[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(load_dir: str) -> Path | None:
    """The directory named by ``latest_checkpointed_iteration.txt``, if any."""
    root = Path(load_dir)
    f = root / LATEST
    if not f.exists():
        return None
    text = f.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{f}: expected an iteration number, found {text[:40]!r}")
    step = int(text)
    path = root / f"iter_{step:07d}"
    if not path.exists():
        raise CheckpointError(f"{f} names step {step} but {path} does not exist")
    return path


def newest_checkpoint(save_dir: str) -> Path | None:
    """The newest complete checkpoint of a directory: ``latest`` when valid, else the newest published iteration."""
    root = Path(save_dir)
    try:
        path = latest_checkpoint(save_dir)
    except CheckpointError:
        path = None
    if path is not None:
        return path
    done = [p for _, p in _iterations(root) if (p / TRAINER_STATE).exists()]
    return done[-1] if done else None


def is_used(save_dir: str) -> bool:
    """True when ``save_dir`` holds a checkpoint of an earlier run (a ``latest`` file or an ``iter_*``)."""
    root = Path(save_dir)
    return (root / LATEST).exists() or bool(_iterations(root))


def resolve_auto_resume(save: str | None, load: str | None, *, auto_resume: bool = True) -> tuple[str | None, str]:
    """What ``--load`` a run gets: a used ``--save`` without ``--load`` resumes from it (or is refused).

    Returns ``(load_dir, message)``; the message (one line, empty when nothing changed) says so.
    A used ``--save`` is never pruned or overwritten by a fresh run: it is resumed, or refused.
    """
    if load or not save or not is_used(save):
        return load, ""
    path = newest_checkpoint(save)
    if not auto_resume:
        raise ConfigError(
            f"--save {save} already holds checkpoints (newest: {path.name if path else 'none complete'}) and "
            "--no-auto-resume is set: pass --load to resume it, or choose an empty --save"
        )
    if path is None:
        raise ConfigError(f"--save {save} holds iterations but no complete checkpoint: pass --load or an empty --save")
    return save, f"--save {save} holds a run: resuming from {path.name} (add --no-auto-resume to refuse instead)"


def set_aside_earlier_run(save: str | None, load: str | None, *, keep: tuple[str, ...] = ()) -> str:
    """A run that starts from another ``--load`` into a used ``--save`` moves the earlier run aside.

    Its checkpoints would otherwise be overwritten (same iteration numbers) or pruned
    (``--keep-last``). Everything in ``save`` except the names in ``keep`` (the run lock held
    on it) moves into a new sibling ``SAVE.N`` (renames: no copy). Returns the one-line
    message ("" when nothing moved). Call with the ``--save`` lock held, on one rank.
    """
    if not (save and load and is_used(save)):
        return ""
    root = Path(save).resolve()
    src = Path(load).resolve()
    if src == root or root in src.parents:  # resuming (or fine-tuning) from this very directory
        return ""
    newest = newest_checkpoint(save)
    kept = next_free_name(save)
    kept.mkdir(parents=True)
    for entry in sorted(root.iterdir()):
        if entry.name not in keep:
            os.replace(entry, kept / entry.name)
    what = f"newest {newest.name}" if newest else "no complete checkpoint"
    return f"--save {save} held an earlier run ({what}): moved it to {kept}; this run starts from --load {load}"


def read_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` of a checkpoint, checked against the manifest first (rank-local)."""
    f = path / TRAINER_STATE
    manifest = _read_manifest(path)
    if manifest is not None and TRAINER_STATE in manifest:
        err = _check_file(path, TRAINER_STATE, manifest[TRAINER_STATE])
        if err:
            raise CheckpointError(err)
    if not f.exists():
        raise CheckpointError(f"checkpoint file {f} is missing")
    try:
        return torch.load(f, weights_only=False)
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {f} is unreadable ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _find_damaged(path: Path) -> Path | None:
    """Which file of a torch_dist checkpoint is unreadable or shorter than its metadata says (no manifest case)."""
    meta_file = path / ".metadata"
    try:
        with open(meta_file, "rb") as f:
            meta = pickle.load(f)
    except Exception:
        return meta_file
    need: dict[str, int] = {}
    for info in getattr(meta, "storage_data", {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.exists() or f.stat().st_size < size:
            return f
    common = path / "common.pt"
    if common.exists():
        try:
            torch.load(common, weights_only=False)
        except Exception:
            return common
    return None


def load_checkpoint(load_dir: str, model, optimizer=None, *, part: str | None = None) -> tuple[Path, dict]:
    """Load model (and optimizer, unless None) from the latest checkpoint in ``load_dir``, verified.

    ``part``: the named part saved beside the policy (``save_checkpoint(parts=...)``) instead.
    """
    path = latest_checkpoint(load_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {load_dir} (missing {LATEST})")
    verify_checkpoint(path)
    trainer_state = read_trainer_state(path)
    if part is not None:
        path = path / part
    try:
        state = dist_checkpointing.load(_sharded(model, optimizer, loading=True), str(path))
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, CheckpointException) as e:
        # torch's reader wraps each rank's error (an unpickler EOFError on a truncated shard) in a
        # CheckpointException naming no file; name the damaged one when it can be found.
        cause = e
        if isinstance(e, CheckpointException):
            failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
            cause = failures[0] if failures and isinstance(failures[0], BaseException) else e
        bad = _find_damaged(path)
        if bad is None and not isinstance(cause, (EOFError, pickle.UnpicklingError, zipfile.BadZipFile)):
            raise
        raise CheckpointError(f"checkpoint file {bad or path} is unreadable ({_first_line(cause)})") from None
    unwrap(model).load_state_dict(state["model"])
    check_finite(model)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return path, trainer_state
