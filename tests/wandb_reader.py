"""Read the records of an offline W&B run file (``run-*.wandb``) without the network.

The file is a LevelDB-style log (a 7-byte ``:W&B`` header, 32 KiB blocks of
``crc32 | length | type | data`` chunks) of ``wandb_internal_pb2.Record`` protobufs; wandb ships
the protobuf classes but no public reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7


def _chunks(data: bytes):
    pos, buf = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            pos += left - 7
            continue
        buf += data[pos : pos + n]
        pos += n
        if kind in (1, 4):  # FULL or LAST
            yield buf
            buf = b""


def read_run(run_dir: str | Path) -> tuple[list[dict], dict]:
    """(history rows, config) of the offline run in ``run_dir`` (``.../wandb/offline-run-*``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (f,) = Path(run_dir).glob("run-*.wandb")
    data = f.read_bytes()
    assert data[:4] == b":W&B", f"{f} is not a W&B run file"
    history, config = [], {}
    for chunk in _chunks(data):
        rec = pb.Record()
        rec.ParseFromString(chunk)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return history, config
