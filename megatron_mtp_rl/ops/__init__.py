"""Vocab-parallel, chunked token statistics: log-probs, entropy, draft acceptance, KL."""

from megatron_mtp_rl.ops.distill import vocab_parallel_kl
from megatron_mtp_rl.ops.logprobs import (
    vocab_parallel_draft_agreement,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)

__all__ = [
    "vocab_parallel_draft_agreement",
    "vocab_parallel_entropy",
    "vocab_parallel_kl",
    "vocab_parallel_logprobs",
]
