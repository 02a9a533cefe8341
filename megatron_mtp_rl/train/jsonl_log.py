"""The metrics JSONL: appended to, never truncated; a resume tolerates a torn last line.

A resumed run repeats the steps after its checkpoint, so rows past the resumed step must
leave the live file (or each such step would appear twice), and a run killed mid-write
leaves a torn last line that a naive reader dies on. Neither loses data here: the original
file is kept whole under a new name (``m.jsonl.1``, ``m.jsonl.2``, ...) and the live file
is replaced atomically by the rows that still hold. A fresh run given a non-empty file
moves it aside the same way instead of truncating it. The run lock (``run_lock.py``)
guarantees no other run appends meanwhile.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO


def next_free_name(path: Path | str) -> Path:
    """``PATH.1``, ``PATH.2``, ...: the first that does not exist (where an earlier file or run is kept)."""
    n = 1
    while Path(f"{path}.{n}").exists():
        n += 1
    return Path(f"{path}.{n}")


def _set_aside(path: Path) -> Path:
    kept = next_free_name(path)
    os.replace(path, kept)
    return kept


def read_rows(path: str | Path) -> tuple[list[dict], int]:
    """The rows of a metrics JSONL and how many lines were unreadable (a torn line is one)."""
    rows, bad = [], 0
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def open_metrics_jsonl(jsonl: str, resume_step: int = 0) -> IO[str]:
    """Open ``jsonl`` for appending this run's rows; see the module docstring for what moves aside."""
    path = Path(jsonl)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size == 0:
        return open(path, "a", encoding="utf-8")
    if resume_step <= 0:
        kept = _set_aside(path)
        _say(f"--metrics-jsonl {path} held an earlier run's rows: moved to {kept.name}, this run starts a new file")
        return open(path, "a", encoding="utf-8")
    rows, bad = read_rows(path)
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        torn_end = f.read(1) != b"\n"
    later = [r for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] > resume_step]
    if not later and not bad and not torn_end:
        return open(path, "a", encoding="utf-8")
    keep = [r for r in rows if r not in later]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
        f.flush()
        os.fsync(f.fileno())
    kept = _set_aside(path)
    os.replace(tmp, path)
    what = []
    if later:
        what.append(f"{len(later)} row(s) after step {resume_step}")
    if bad:
        what.append(f"{bad} unreadable (torn) line(s)")
    _say(f"--metrics-jsonl {path}: resuming at step {resume_step}; {' and '.join(what) or 'its torn end'} "
         f"left out of it (the original is kept as {kept.name})")  # fmt: skip
    return open(path, "a", encoding="utf-8")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
