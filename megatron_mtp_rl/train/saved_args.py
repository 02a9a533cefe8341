"""The model shapes a ``--load DIR`` holds, read before anything is built (no megatron import).

Lives above ``models/presets.py`` and ``hf/``: it asks an HF directory's family or our checkpoint's
trainer state, so neither of those has to know the other.
"""

from __future__ import annotations


def saved_model_args(load_dir: str | None) -> dict | None:
    """The ``model_args`` stored in the latest checkpoint under ``load_dir`` (None: no checkpoint there).

    An HF checkpoint directory (config.json + safetensors) gives its family's reading of config.json.
    """
    from dataclasses import asdict
    from pathlib import Path

    from megatron_mtp_rl.hf.directory import is_hf_dir

    if is_hf_dir(load_dir):
        from megatron_mtp_rl.hf.families import model_args_for_hf_dir

        return asdict(model_args_for_hf_dir(load_dir))
    if not load_dir or not (Path(load_dir) / "latest_checkpointed_iteration.txt").exists():
        return None
    from megatron_mtp_rl.train.checkpoint import latest_checkpoint, read_trainer_state

    return read_trainer_state(latest_checkpoint(load_dir)).get("model_args")
