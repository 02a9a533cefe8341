"""MTP-head objectives beside any regime (``--mtp-head-loss``, ``--mtp-head-coef``).

The regime decides what the MTP path sends to the trunk (nothing, CE, the policy surrogate,
λ-weighted under OCC). Independently, the MTP layers can be kept a good speculative-decoding
draft by a head-only objective computed on a *detached* MTP pass (trunk states, embeddings
and the output head detached, as ``detach`` does), so it changes the MTP layers and nothing
else:

* ``ce``: cross-entropy on the rollout tokens (``detach`` ≡ ``none`` + ``ce``);
* ``distill``: KL(p_main ‖ q_k) at the aligned positions, p_main detached (self-distillation:
  the draft learns the policy's distribution, not one sampled token per position).

Both are aggregated like the other MTP terms (same ``--loss-agg-mode``, same global
per-depth denominators), so a step's gradient does not depend on its micro-batch split.
"""

from __future__ import annotations

import torch

from megatron_mtp_rl.rl.metric_values import masked_mean, summed
from megatron_mtp_rl.rl.policy_loss import Denominators, aggregate
from megatron_mtp_rl.rl.regimes import HEAD_LOSSES


def check_head_loss(name: str) -> str:
    if name not in HEAD_LOSSES:
        raise ValueError(f"unknown --mtp-head-loss {name!r}; choose one of {HEAD_LOSSES}")
    return name


def per_token_head_loss(out, kind: str) -> torch.Tensor:
    """``[D, B, S]`` per-token head loss in the label frame (mask: ``out.mtp_mask``)."""
    if kind == "ce":
        if out.head_logprobs is None:
            raise ValueError("--mtp-head-loss ce needs the forward's detached-pass log-probs (mtp_head='ce')")
        return -out.head_logprobs
    if kind == "distill":
        if out.head_kl is None:
            raise ValueError("--mtp-head-loss distill needs the forward's KL (mtp_head='distill')")
        return out.head_kl
    raise ValueError(f"unknown --mtp-head-loss {kind!r}; choose one of {HEAD_LOSSES[1:]}")


def head_loss_terms(
    out,
    kind: str,
    coef: float,
    seq_index: torch.Tensor,
    agg_mode: str,
    denominators: list[Denominators],
    metrics: dict,
) -> torch.Tensor:
    """Σ_k coef · L_head_k of one micro-batch; adds ``mtp/head_loss_k`` to ``metrics``.

    Summed exactly as the regime's CE term is (same order, same aggregation), which is what
    makes ``none`` + ``ce`` reproduce ``detach`` bit for bit.
    """
    per_token = per_token_head_loss(out, kind)
    total = out.logprobs.new_zeros(())
    for k in range(out.num_depths):
        term = aggregate(per_token[k], out.mtp_mask[k], seq_index, agg_mode, denominators[k])
        total = total + coef * term
        metrics[f"mtp/head_loss_{k + 1}"] = summed(term.detach())
    return total


class HeadOnlyLoss:
    """``(batch, HeadLogProbs) -> (loss, metrics)`` with the head objective alone (``mtp-rl heal``).

    No policy term: the only loss is computed on the detached MTP pass, so the trunk,
    embeddings and output head receive no gradient at all (frozen by construction).
    """

    def __init__(self, kind: str, coef: float, denominators: list[Denominators], agg_mode: str = "token-mean"):
        if check_head_loss(kind) == "none":
            raise ValueError("the head-only loss needs --mtp-head-loss ce or distill")
        self.kind, self.coef, self.den, self.agg_mode = kind, coef, denominators, agg_mode

    def forward_kwargs(self) -> dict:
        return {"with_mtp": True, "detach_mtp": True, "with_draft_stats": True, "mtp_head": self.kind}

    def __call__(self, batch, out):
        from megatron_mtp_rl.rl.policy_loss import sequence_index

        metrics: dict[str, torch.Tensor] = {}
        seq_index = sequence_index(batch.segment_ids)
        loss = head_loss_terms(out, self.kind, self.coef, seq_index, self.agg_mode, self.den, metrics)
        for k in range(out.num_depths):
            m = out.mtp_mask[k].bool()
            metrics[f"mtp/accept_{k + 1}"] = masked_mean(out.mtp_accept[k], m)
            metrics[f"mtp/top1_agree_{k + 1}"] = masked_mean(out.mtp_top1[k], m)
        metrics["train/loss"] = summed(loss.detach())
        return loss, metrics
