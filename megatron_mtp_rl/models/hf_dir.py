"""Is a path an HF checkpoint directory? (No torch import: config resolution asks before anything is built.)"""

from __future__ import annotations

import os
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"


def is_hf_dir(path: str | os.PathLike | None) -> bool:
    """config.json + safetensors (one file or shards with an index), and not one of our dist checkpoints."""
    if not path:
        return False
    p = Path(path)
    if not (p / "config.json").is_file() or (p / "latest_checkpointed_iteration.txt").exists():
        return False
    return (p / INDEX_FILE).is_file() or any(p.glob("*.safetensors"))
