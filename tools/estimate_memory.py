"""Parameter count and per-GPU memory estimate of a run configuration (the recipes' arithmetic).

    .venv/bin/python tools/estimate_memory.py --config examples/recipes/mimo_7b_rl_dapo_occ.yaml \
        --world-size 8 --vocab-size 151680

Prints the block the recipe comments quote (tests/unit/test_recipes.py checks they agree), so the
arithmetic is reproducible rather than hand-copied. What it counts, and why:

* parameters exactly as our provider builds them, per layer: attention (GQA with optional q/k/v
  bias, qk-norm and head dim, or MLA), dense MLP or routed experts + router (+ shared expert and its
  gate), norms; MTP layer = enorm + hnorm + eh_proj + one transformer layer + final norm. The formula
  is checked against ``count_parameters(build_model(...))`` in the tests (MLA only by formula: it
  cannot be built on CPU);
* model state in bytes per parameter: bf16 weight 2 + fp32 main grad 4 + fp32 master weight, Adam m
  and v 12 (fp32 runs: 4 + 4 + 8). With ``--use-distributed-optimizer`` the 12 (8) optimizer bytes are
  sharded over data-parallel ranks (ZeRO-1); dense weights are split by TP (and PP), experts by
  expert-TP (= TP) × EP (and PP);
* activations kept for backward, bf16, flash attention (no s² term), one packed row of
  ``--seq-length`` tokens per micro-batch; 1F1B keeps up to PP micro-batches in flight on the first
  stage. ``--sequence-parallel`` divides the norm/residual activations by TP too;
  ``--recompute-granularity full`` keeps only each layer's input (plus one layer being recomputed);
  ``selective`` recomputes the attention core, which flash attention already does not store, so it
  is counted as no saving;
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
    """Parameters by where they live (a TP=PP=EP=1 model); per-layer lists follow the layer order."""

    embedding: int
    output: int  # 0 when tied
    layers_dense: tuple[int, ...]  # per trunk layer: attention + norms + dense MLP / router / shared expert
    layers_expert: tuple[int, ...]  # per trunk layer: routed experts (0 for a dense layer)
    mtp_dense: int  # per MTP layer, non-expert
    mtp_expert: int  # per MTP layer, experts
    final_norm: int
    mtp_layers: int

    @property
    def num_layers(self) -> int:
        return len(self.layers_dense)

    @property
    def trunk(self) -> int:
        return self.embedding + self.output + self.final_norm + sum(self.layers_dense) + sum(self.layers_expert)

    @property
    def mtp(self) -> int:
        return self.mtp_layers * (self.mtp_dense + self.mtp_expert)

    @property
    def total(self) -> int:
        return self.trunk + self.mtp


def padded_vocab(vocab: int, multiple: int) -> int:
    return math.ceil(vocab / multiple) * multiple


def _attention_params(m) -> int:
    """One attention block with its input norm."""
    h, heads = m.hidden_size, m.num_attention_heads
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        if m.q_lora_rank:
            q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * qk  # down, norm, up
        else:
            q = h * heads * qk
        kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank  # down (+ rope part), norm
        kv += m.kv_lora_rank * heads * (m.qk_head_dim + m.v_head_dim)  # up
        return q + kv + heads * m.v_head_dim * h + h
    groups, d = m.num_query_groups or heads, m.head_dim
    qkv = h * (heads + 2 * groups) * d + (heads + 2 * groups) * d * m.add_qkv_bias
    gate = h * heads * d if m.attention_output_gate else 0
    return qkv + gate + heads * d * h + h + 2 * d * m.qk_layernorm


def _mlp_params(m, moe: bool) -> tuple[int, int]:
    """(non-expert, expert) parameters of one MLP block with its norm."""
    h = m.hidden_size
    per_ffn = (3 if m.swiglu else 2) * h
    if not moe:
        return per_ffn * m.ffn_hidden_size + h, 0
    dense = h + m.num_experts * h  # norm + router
    if m.moe_shared_expert_intermediate_size:
        dense += per_ffn * m.moe_shared_expert_intermediate_size + (h if m.moe_shared_expert_gate else 0)
    return dense, m.num_experts * per_ffn * (m.moe_ffn_hidden_size or m.ffn_hidden_size)


def count_params(m) -> Counts:
    """Parameter counts of our provider's GPTModel for ModelArgs ``m``."""
    h = m.hidden_size
    attn = _attention_params(m)
    pattern = m.moe_layer_pattern()
    dense, expert = [], []
    for moe in pattern:
        d, e = _mlp_params(m, bool(moe))
        dense.append(attn + d)
        expert.append(e)
    # megatron builds the MTP layer from the last trunk layer's spec
    mtp_d, mtp_e = _mlp_params(m, bool(pattern[-1]))
    v = padded_vocab(m.vocab_size, m.make_vocab_size_divisible_by)
    return Counts(
        embedding=v * h,
        output=v * h if m.untie_embeddings_and_output_weights else 0,
        layers_dense=tuple(dense),
        layers_expert=tuple(expert),
        mtp_dense=attn + mtp_d + 2 * h * h + 3 * h,  # + eh_proj, enorm, hnorm, final_layernorm
        mtp_expert=mtp_e,
        final_norm=h,
        mtp_layers=m.mtp_num_layers or 0,
    )


def _act_bytes_per_token(m, tp: int, moe: bool, sp: bool) -> float:
    """bf16 activations one transformer layer keeps for backward, per token (no recompute)."""
    h, heads = m.hidden_size, m.num_attention_heads
    rep = tp if sp else 1  # norm in/out and residuals: sharded over TP only with sequence parallelism
    if m.multi_latent_attention:
        qkv = heads * (m.qk_head_dim + m.qk_pos_emb_head_dim) * 2 + heads * m.v_head_dim
        attn = 2 * h / rep + (qkv + heads * m.v_head_dim) / tp
    else:
        d, groups = m.head_dim, m.num_query_groups or heads
        attn = 2 * h / rep + ((heads + 2 * groups) * d + heads * d) / tp  # norm in/out; q,k,v; attention out
    if not moe:
        mlp = 2 * h / rep + 3 * m.ffn_hidden_size / tp  # norm in/out; fc1 out (gate, up); fc2 in
    else:
        k, f = m.moe_router_topk, m.moe_ffn_hidden_size or m.ffn_hidden_size
        mlp = 2 * h / rep + 2 * k * h + 3 * k * f / tp  # norm in/out; permuted in/out; expert fc1/fc2
        if m.moe_shared_expert_intermediate_size:
            mlp += 3 * m.moe_shared_expert_intermediate_size / tp
    return 2 * (attn + mlp)


def estimate(cfg, m, world: int, gpu_gb: float = 80.0) -> list[str]:
    """The report lines (no trailing spaces). ``cfg``: the run's RunConfig; ``m``: its ModelArgs."""
    c = count_params(m)
    par = cfg.parallel
    tp, pp, ep = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size
    cp = par.context_parallel_size
    dp = world // (tp * pp * cp)
    per_stage = c.num_layers // pp
    v = padded_vocab(m.vocab_size, m.make_vocab_size_divisible_by)
    h = m.hidden_size
    bf16 = m.params_dtype == "bf16"
    weight_grad = 6 if bf16 else 8  # bf16 weight + fp32 main grad (fp32: weight + grad)
    optim_bytes = 12 if bf16 else 8  # fp32 master + Adam m, v (fp32: m, v)
    zero = dp if par.use_distributed_optimizer else 1
    bytes_per = weight_grad + optim_bytes / zero
    opt_name = f"distributed optimizer over DP {dp}" if par.use_distributed_optimizer else "non-distributed optimizer"
    stages = []
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        lo, hi = s * per_stage, (s + 1) * per_stage
        dense = sum(c.layers_dense[lo:hi]) + (c.embedding if first else 0)
        expert = sum(c.layers_expert[lo:hi])
        if last:
            dense += c.final_norm + c.mtp_layers * c.mtp_dense
            dense += c.output if c.output else (v * h if pp > 1 else 0)
            dense += v * h if (pp > 1 and c.mtp_layers) else 0
            expert += c.mtp_layers * c.mtp_expert
        if first or last:
            stages.append((dense, expert, first, last, lo, hi))
    tokens = cfg.data.seq_length  # one packed row per micro-batch
    ro, op = cfg.rollout, cfg.optim
    samples = ro.rollout_batch_size * ro.n_samples_per_prompt
    gbs = op.global_batch_size or max(1, samples // 2)
    micro_per_step = max(1, gbs // max(dp, 1) // max(op.micro_batch_size, 1))
    in_flight = min(pp, micro_per_step)
    pattern = m.moe_layer_pattern()
    sp = par.sequence_parallel
    layer_act = [_act_bytes_per_token(m, tp, bool(x), sp) * tokens for x in pattern]
    mtp_act = _act_bytes_per_token(m, tp, bool(pattern[-1]), sp) * tokens
    heads_out = 1 + (m.mtp_num_layers or 0)
    unused = (1 - m.moe_router_topk / m.num_experts) if m.is_moe else 0.0
    active = c.trunk - sum(c.layers_expert) * unused
    recompute = par.recompute_granularity
    lines = [
        f"params: {c.total / 1e9:.2f}B total = trunk {c.trunk / 1e9:.2f}B + MTP {c.mtp / 1e9:.2f}B"
        + (f"; trunk active per token {active / 1e9:.2f}B" if m.is_moe else ""),
        f"layout: {world} GPUs = TP {tp} x PP {pp} x CP {cp} x DP {dp}"
        + (f"; experts: EP {ep} x expert-TP {tp} (= TP)" if m.is_moe else "")
        + f"; {samples} samples/step, {samples // gbs} optimizer steps/step",
    ]
    if sp or recompute:
        lines.append(
            "memory features: "
            + ", ".join(
                x
                for x in (
                    "sequence parallel" if sp else "",
                    f"{recompute} recompute" + (f" ({par.recompute_method})" if par.recompute_method else "")
                    if recompute
                    else "",
                )
                if x
            )
        )
    for dense, expert, first, last, lo, hi in stages:
        local = dense / tp + expert / (tp * ep)
        state = local * bytes_per
        acts = layer_act[lo:hi] + ([mtp_act] * c.mtp_layers if last else [])
        n_layers = len(acts)
        flight = in_flight if first else 1
        if recompute == "full":
            per_mb = n_layers * 2 * h * tokens / (tp if sp else 1) + max(acts)  # layer inputs + one layer live
        else:
            per_mb = sum(acts)
        act = per_mb * flight
        logits = 2 * tokens * v / tp * heads_out if last else 0.0
        total = state + act + logits
        where = "per GPU" if pp == 1 else ("per GPU, first stage" if first else "per GPU, last stage")
        lines += [
            f"{where}: {local / 1e9:.2f}B params",
            f"  model state ({bytes_per:.2f} B/param, {opt_name}): {state / GB:.1f} GB",
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
    p.add_argument("--update", action="store_true", help="rewrite the recipe's '# --- estimate:' block in place")
    a = p.parse_args(argv)
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    from megatron_mtp_rl.config import parse_config, resolve_model_args

    cfg = parse_config(["--config", a.config])
    m = resolve_model_args(cfg, a.vocab_size)
    lines = estimate(cfg, m, a.world_size, a.gpu_gb)
    print("\n".join(lines))
    if a.update:
        update_block(a.config, a.world_size, a.vocab_size, lines)
    return 0


def update_block(path: str, world: int, vocab: int, lines: list[str]) -> None:
    """Replace (or append) the recipe's ``# --- estimate:`` ... ``# --- end estimate`` comment block."""
    import re
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    block = "\n".join(
        [f"# --- estimate: tools/estimate_memory.py --config {path} --world-size {world} --vocab-size {vocab}"]
        + [f"#   {x}" for x in lines]
        + ["# --- end estimate"]
    )
    pattern = re.compile(r"^# --- estimate: .*?^# --- end estimate$", re.M | re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n" + block + "\n"
    Path(path).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
