"""Model providers (dense / MoE GPT with an MTP block) and the RL forward.

Names are imported on first use (PEP 562) so that ``megatron_mtp_rl.models.presets`` can be
read without importing megatron (``mtp-rl train --help`` stays fast).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "TokenBatch": "batch",
    "aligned_mtp_mask": "batch",
    "mtp_targets": "batch",
    "pack_sequences": "batch",
    "HeadLogProbs": "mtp_forward",
    "forward_logprobs": "mtp_forward",
    "unwrap": "mtp_forward",
    "PRESETS": "presets",
    "ModelArgs": "presets",
    "get_preset": "presets",
    "build_config": "provider",
    "build_model": "provider",
    "is_mtp_parameter": "provider",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
