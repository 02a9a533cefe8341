"""Model providers (dense / MoE GPT with an MTP block) and the RL forward."""

from megatron_mtp_rl.models.batch import TokenBatch, aligned_mtp_mask, mtp_targets, pack_sequences
from megatron_mtp_rl.models.mtp_forward import HeadLogProbs, forward_logprobs, unwrap
from megatron_mtp_rl.models.presets import PRESETS, ModelArgs, get_preset
from megatron_mtp_rl.models.provider import build_config, build_model, is_mtp_parameter

__all__ = [
    "PRESETS",
    "HeadLogProbs",
    "ModelArgs",
    "TokenBatch",
    "aligned_mtp_mask",
    "build_config",
    "build_model",
    "forward_logprobs",
    "get_preset",
    "is_mtp_parameter",
    "mtp_targets",
    "pack_sequences",
    "unwrap",
]
