"""Parameter count and per-GPU memory estimate of a run configuration (the recipes' arithmetic).

    .venv/bin/python tools/estimate_memory.py --config examples/recipes/mimo_7b_dapo_occ.yaml \
        --world-size 8 --vocab-size 151680

Prints the block the recipe comments quote (tests/unit/test_recipes.py checks they agree), so the
arithmetic is reproducible rather than hand-copied. What it counts, and why:

* parameters exactly as our provider builds them (GQA attention without biases, SwiGLU, RMSNorm,
  routed experts only, MTP layer = enorm + hnorm + eh_proj + one transformer layer + final norm);
  the formula is checked against ``count_parameters(build_model(...))`` in the tests;
* model state 18 bytes/parameter in bf16 (bf16 weight, fp32 main grad, fp32 master copy, Adam m
  and v), 16 in fp32: the trainer uses megatron-core's NON-distributed optimizer, so data
  parallelism does not divide it; dense weights are split by TP (and PP), experts by
  expert-TP (= TP) × EP (and PP);
* activations kept for backward with no recomputation and no sequence parallelism (our provider
  sets neither), flash attention (no s² term), bf16, for one packed row of ``--seq-length`` tokens per
  micro-batch; 1F1B keeps up to PP micro-batches in flight on the first stage;
* the logits of the main head and every MTP head for one row (bf16, vocab-parallel).

CUDA context, NCCL buffers and allocator fragmentation are not modelled: keep several GB spare.
It is an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Counts:
    """Parameters by where they live (a TP=PP=EP=1 model)."""

    embedding: int
    output: int  # 0 when tied
    layer_dense: int  # per trunk layer: attention + norms (+ dense MLP)
    layer_expert: int  # per trunk layer: routed experts (0 for dense)
    mtp_dense: int  # per MTP layer, non-expert
    mtp_expert: int  # per MTP layer, experts
    final_norm: int
    num_layers: int
    mtp_layers: int

    @property
    def trunk(self) -> int:
        return self.embedding + self.output + self.final_norm + self.num_layers * (self.layer_dense + self.layer_expert)

    @property
    def mtp(self) -> int:
        return self.mtp_layers * (self.mtp_dense + self.mtp_expert)

    @property
    def total(self) -> int:
        return self.trunk + self.mtp


def padded_vocab(vocab: int, multiple: int) -> int:
    return math.ceil(vocab / multiple) * multiple


def count_params(m) -> Counts:
    """Parameter counts of our provider's GPTModel for ModelArgs ``m``."""
    h, heads = m.hidden_size, m.num_attention_heads
    groups = m.num_query_groups or heads
    d = h // heads
    attn = h * heads * d + 2 * h * groups * d + heads * d * h + 2 * h  # q, k, v, o + two norms
    if m.num_experts:
        dense = attn + m.num_experts * h  # + router
        expert = m.num_experts * 3 * h * (m.moe_ffn_hidden_size or m.ffn_hidden_size)
    else:
        dense, expert = attn + 3 * h * m.ffn_hidden_size, 0
    v = padded_vocab(m.vocab_size, m.make_vocab_size_divisible_by)
    return Counts(
        embedding=v * h,
        output=v * h if m.untie_embeddings_and_output_weights else 0,
        layer_dense=dense,
        layer_expert=expert,
        mtp_dense=dense + 2 * h * h + 3 * h,  # + eh_proj, enorm, hnorm, final_layernorm
        mtp_expert=expert,
        final_norm=h,
        num_layers=m.num_layers,
        mtp_layers=m.mtp_num_layers or 0,
    )


def _act_bytes_per_token(m, tp: int, dense_mlp: bool) -> float:
    """bf16 activations one transformer layer keeps for backward, per token (no SP, no recompute)."""
    h, heads = m.hidden_size, m.num_attention_heads
    d = h // heads
    groups = m.num_query_groups or heads
    attn = 2 * h + ((heads + 2 * groups) * d + heads * d) / tp  # norm in/out; q,k,v; attention out
    if dense_mlp:
        mlp = 2 * h + 3 * m.ffn_hidden_size / tp  # norm in/out; fc1 out (gate, up); fc2 in
    else:
        k, f = m.moe_router_topk, m.moe_ffn_hidden_size or m.ffn_hidden_size
        mlp = 2 * h + 2 * k * h + 3 * k * f / tp  # norm in/out; permuted in/out; expert fc1/fc2
    return 2 * (attn + mlp)


def estimate(cfg, m, world: int, gpu_gb: float = 80.0) -> list[str]:
    """The report lines (no trailing spaces) for a RunConfig and its resolved ModelArgs."""
    c = count_params(m)
    par = cfg.parallel
    tp, pp, ep = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size
    cp = par.context_parallel_size
    dp = world // (tp * pp * cp)
    per_stage = m.num_layers // pp
    v = padded_vocab(m.vocab_size, m.make_vocab_size_divisible_by)
    h = m.hidden_size
    bytes_per = 18 if m.params_dtype == "bf16" else 16
    # first stage: embedding + its layers; last stage: layers + norm + output + MTP (+ an embedding
    # copy for the MTP block and, tied, an unused output_layer when PP > 1)
    stages = []
    for first, last in ((True, pp == 1), (False, True)) if pp > 1 else ((True, True),):
        dense = per_stage * c.layer_dense + (c.embedding if first else 0)
        expert = per_stage * c.layer_expert
        if last:
            dense += c.final_norm + c.mtp_layers * c.mtp_dense
            dense += c.output if c.output else (v * h if pp > 1 else 0)
            dense += v * h if (pp > 1 and c.mtp_layers) else 0
            expert += c.mtp_layers * c.mtp_expert
        stages.append((dense, expert, first, last))
    tokens = cfg.data.seq_length * 1  # one packed row per micro-batch
    samples = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    gbs = cfg.optim.global_batch_size
    micro_per_step = max(1, gbs // max(dp, 1) // max(cfg.optim.micro_batch_size, 1))
    in_flight = min(pp, micro_per_step)
    layer_act = _act_bytes_per_token(m, tp, dense_mlp=not m.is_moe) * tokens
    heads_out = 1 + (m.mtp_num_layers or 0)
    unused = (1 - m.moe_router_topk / m.num_experts) if m.is_moe else 0.0
    active = c.trunk - c.num_layers * c.layer_expert * unused
    lines = [
        f"params: {c.total / 1e9:.2f}B total = trunk {c.trunk / 1e9:.2f}B + MTP {c.mtp / 1e9:.2f}B"
        + (f"; trunk active per token {active / 1e9:.2f}B" if m.is_moe else ""),
        f"layout: {world} GPUs = TP {tp} x PP {pp} x CP {cp} x DP {dp}"
        + (f"; experts: EP {ep} x expert-TP {tp} (= TP)" if m.is_moe else "")
        + f"; {samples} samples/step, {samples // gbs} optimizer steps/step",
    ]
    for dense, expert, first, last in stages:
        local = dense / tp + expert / (tp * ep)
        state = local * bytes_per
        n_layers = per_stage + (c.mtp_layers if last else 0)
        flight = in_flight if first else 1
        act = layer_act * n_layers * flight
        logits = 2 * tokens * v / tp * heads_out if last else 0.0
        total = state + act + logits
        where = "per GPU" if pp == 1 else ("per GPU, first stage" if first else "per GPU, last stage")
        lines += [
            f"{where}: {local / 1e9:.2f}B params",
            f"  model state ({bytes_per} B/param, non-distributed optimizer): {state / GB:.1f} GB",
            f"  activations ({n_layers} layers x {tokens} tokens x {flight} micro-batch in flight): {act / GB:.1f} GB",
            f"  logits ({heads_out} heads x {tokens} tokens x {v // tp} vocab/TP, bf16): {logits / GB:.1f} GB",
            f"  trainer total {total / GB:.1f} GB of {gpu_gb:.0f} GB, {gpu_gb - total / GB:.1f} GB left",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a recipe YAML (our flag names)")
    p.add_argument("--world-size", type=int, required=True, help="GPUs of the training job")
    p.add_argument("--vocab-size", type=int, required=True, help="the tokenizer's vocabulary size")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory (H100: 80)")
    a = p.parse_args(argv)
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    from megatron_mtp_rl.config import parse_config, resolve_model_args

    cfg = parse_config(["--config", a.config])
    m = resolve_model_args(cfg, a.vocab_size)
    print("\n".join(estimate(cfg, m, a.world_size, a.gpu_gb)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
