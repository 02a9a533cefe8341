"""FLOPs of the trainer's passes over a step's packed sequences, for ``perf/tflops_per_gpu`` and ``perf/mfu``.

Counted from the model actually run, matrix multiplies only (2 FLOPs per multiply-add), real tokens
only (padding is ``perf/padding_fraction``'s business): per token, the attention projections
(GQA or MLA), the dense or routed MLP (top-k experts + shared expert + router), the output layer;
per packed sequence of length ``L``, the attention scores and values over its ``L(L+1)/2`` causal
pairs; each MTP depth adds its ``eh_proj``, its transformer layer and its own output layer. A
backward pass costs twice its forward; recomputation adds one more forward of what it recomputes.
"""

from __future__ import annotations

from megatron_mtp_rl.models.presets import ModelArgs

# Dense bf16 tensor-core peak (TFLOP/s) by CUDA device name; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
               "B200": 2250.0, "GB200": 2500.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}  # fmt: skip


def default_peak_tflops(device_name: str | None) -> float | None:
    """The table's peak for a CUDA device name (``torch.cuda.get_device_name()``), else None."""
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "GB200" before "B200"
        if key in device_name:
            return PEAK_TFLOPS[key]
    return None


def _attention_per_token(m: ModelArgs) -> tuple[float, float]:
    """(projection FLOPs per token, score+value FLOPs per causal pair) of one attention layer."""
    h, a = m.hidden_size, m.num_attention_heads
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        q = 2 * h * m.q_lora_rank + 2 * m.q_lora_rank * a * qk if m.q_lora_rank else 2 * h * a * qk
        kv = 2 * h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + 2 * m.kv_lora_rank * a * (m.qk_head_dim + m.v_head_dim)
        return q + kv + 2 * a * m.v_head_dim * h, 2 * a * qk + 2 * a * m.v_head_dim
    d = m.kv_channels or h // a
    g = m.num_query_groups or a
    proj = 2 * h * (a * d + 2 * g * d) + 2 * a * d * h + (2 * h * a * d if m.attention_output_gate else 0)
    return proj, 4 * a * d


def _mlp_per_token(m: ModelArgs, moe: bool) -> float:
    h, mats = m.hidden_size, 3 if m.swiglu else 2
    if not moe:
        return 2 * h * m.ffn_hidden_size * mats
    expert = m.moe_ffn_hidden_size or m.ffn_hidden_size
    shared = m.moe_shared_expert_intermediate_size or 0
    return 2 * h * m.num_experts + m.moe_router_topk * 2 * h * expert * mats + 2 * h * shared * mats


def forward_flops(m: ModelArgs, lengths: list[int], *, with_mtp: bool, recompute: str | None = None) -> dict:
    """Forward FLOPs over sequences of ``lengths`` tokens: ``{"trunk", "mtp", "recompute"}``.

    ``recompute``: ``"full"`` re-runs every trunk and MTP layer in the backward, ``"selective"``
    their attention core; ``"recompute"`` is that extra forward (counted once, with the backward).
    """
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    proj, per_pair = _attention_per_token(m)
    pattern = m.moe_layer_pattern()
    layers = [proj * tokens + per_pair * pairs + _mlp_per_token(m, bool(moe)) * tokens for moe in pattern]
    output = 2 * m.hidden_size * m.vocab_size * tokens
    trunk = sum(layers) + output
    depths = m.mtp_num_layers if with_mtp else 0
    mtp_layer = proj * tokens + per_pair * pairs + _mlp_per_token(m, bool(pattern[-1])) * tokens
    mtp = depths * (2 * (2 * m.hidden_size) * m.hidden_size * tokens + mtp_layer + output)
    extra = 0.0
    if recompute == "full":
        extra = sum(layers) + depths * mtp_layer
    elif recompute == "selective":
        extra = (len(pattern) + depths) * per_pair * pairs
    return {"trunk": float(trunk), "mtp": float(mtp), "recompute": float(extra)}


def step_flops(m: ModelArgs, lengths: list[int], *, with_mtp: bool, recompute: str | None, reference: bool) -> float:
    """One RL step's trainer FLOPs on these sequences: the θ_old pass (forward), the reference
    pass (trunk forward, with ``--kl-coef``) and the update (forward, backward = 2× forward, recompute)."""
    f = forward_flops(m, lengths, with_mtp=with_mtp, recompute=recompute)
    fwd = f["trunk"] + f["mtp"]
    return fwd + (f["trunk"] if reference else 0.0) + 3 * fwd + f["recompute"]
