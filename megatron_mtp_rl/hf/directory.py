"""An HF checkpoint directory: is a path one, and its config.json.

The bottom of the HF side. No torch import: config resolution asks before anything is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_mtp_rl.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"


def is_hf_dir(path: str | os.PathLike | None) -> bool:
    """config.json + safetensors (one file or shards with an index), and not one of our dist checkpoints."""
    if not path:
        return False
    p = Path(path)
    if not (p / "config.json").is_file() or (p / "latest_checkpointed_iteration.txt").exists():
        return False
    return (p / INDEX_FILE).is_file() or any(p.glob("*.safetensors"))


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of an HF directory; a missing or malformed file is a one-line ConfigError (file, line)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: an HF checkpoint directory needs its config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
