"""Model shapes: the tiny presets that train on 2 CPU cores, and Megatron-style overrides."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from megatron_mtp_rl.flags import flag


@dataclass(frozen=True)
class ModelArgs:
    """The model flags we accept, named as Megatron-LM names them (``--num-layers`` ...)."""

    num_layers: int = flag(2, "transformer layers of the trunk", min=1)
    hidden_size: int = flag(64, "model width", min=1)
    num_attention_heads: int = flag(4, "attention heads", min=1)
    num_query_groups: int | None = flag(None, "GQA groups (default: heads)", min=1)
    ffn_hidden_size: int = flag(256, "MLP width", min=1)
    vocab_size: int = flag(64, "vocabulary size (from the tokenizer)", cli=False)
    seq_length: int = flag(128, "tokens per packed row (the --seq-length data flag)", cli=False)
    mtp_num_layers: int = flag(0, "MTP depths D", min=0)
    mtp_zero_first_embedding: bool = flag(
        False, "MTP layers read a zero token embedding at each sequence's position 0 (MiMo's MTP, as SGLang drafts)"
    )
    num_experts: int | None = flag(None, "MoE experts per layer (0 = dense)", min=0)
    moe_router_topk: int = flag(2, "experts per token", min=1)
    moe_ffn_hidden_size: int | None = flag(None, "expert MLP width", min=1)
    moe_aux_loss_coeff: float = flag(0.0, "load-balancing loss coefficient (0 = off)", min=0)
    moe_token_dispatcher_type: str = flag(
        "allgather", "megatron MoE token dispatcher", choices=["allgather", "alltoall", "flex"]
    )
    untie_embeddings_and_output_weights: bool = flag(False, "separate output head")
    normalization: str = flag("RMSNorm", "layer norm kind", choices=["RMSNorm", "LayerNorm"])
    swiglu: bool = flag(True, "SwiGLU MLP")
    rotary_base: float = flag(10000, "RoPE base (HF rope_theta)", min=1)
    init_method_std: float = flag(0.02, "weight init std", min=0)
    make_vocab_size_divisible_by: int = flag(64, "vocabulary padding multiple (TP must divide the padded size)", min=1)
    params_dtype: str = flag("fp32", "parameter dtype (set by --bf16)", cli=False)
    # -- architecture features of real families (megatron-core TransformerConfig options) --
    norm_epsilon: float = flag(1e-5, "RMSNorm/LayerNorm epsilon (HF rms_norm_eps)", min=0, min_exclusive=True)
    kv_channels: int | None = flag(None, "attention head dim (HF head_dim; default hidden/heads)", min=1)
    add_qkv_bias: bool = flag(False, "bias on the q/k/v projections only (Qwen2/MiMo, GLM-4.5)")
    qk_layernorm: bool = flag(False, "RMSNorm on each query/key head (Qwen3, GLM-4.5 use_qk_norm)")
    rotary_percent: float = flag(1.0, "fraction of the head dim RoPE rotates (HF partial_rotary_factor)", min=0)
    attention_output_gate: bool = flag(False, "sigmoid gate on the attention output (no HF family mapped)")
    moe_layer_freq: int | str = flag(
        1, "MoE layer pattern: N = every Nth layer, or a list like '([0]*1+[1]*45)' (0 = dense layer)"
    )
    moe_shared_expert_intermediate_size: int | None = flag(None, "shared expert MLP width (0/None = none)", min=1)
    moe_shared_expert_gate: bool = flag(False, "sigmoid gate on the shared expert (Qwen2-MoE)")
    moe_router_score_function: str = flag("softmax", "router score function", choices=["softmax", "sigmoid"])
    moe_router_pre_softmax: bool = flag(False, "softmax before top-k (HF norm_topk_prob=false)")
    moe_router_enable_expert_bias: bool = flag(False, "aux-loss-free routing bias (HF e_score_correction_bias)")
    moe_router_num_groups: int | None = flag(None, "expert groups for group-limited routing (HF n_group)", min=1)
    moe_router_group_topk: int | None = flag(None, "groups each token may use (HF topk_group)", min=1)
    moe_router_topk_scaling_factor: float | None = flag(
        None, "scale of the routed experts' weights (HF routed_scaling_factor)", min=0
    )
    multi_latent_attention: bool = flag(False, "DeepSeek multi-latent attention (needs Transformer Engine + CUDA)")
    q_lora_rank: int | None = flag(None, "MLA query low-rank dim (None: no query compression)", min=1)
    kv_lora_rank: int = flag(512, "MLA key/value low-rank dim", min=1)
    qk_head_dim: int = flag(128, "MLA query/key head dim without RoPE (HF qk_nope_head_dim)", min=1)
    qk_pos_emb_head_dim: int = flag(64, "MLA RoPE head dim (HF qk_rope_head_dim)", min=1)
    v_head_dim: int = flag(128, "MLA value head dim", min=1)
    rope_type: str = flag("rope", "MLA RoPE kind (yarn: DeepSeek-V3's rope_scaling)", choices=["rope", "yarn"])
    rotary_scaling_factor: float = flag(1.0, "yarn scaling factor", min=0)
    original_max_position_embeddings: int = flag(4096, "yarn original context length", min=1)
    beta_fast: float = flag(32.0, "yarn beta_fast")
    beta_slow: float = flag(1.0, "yarn beta_slow")
    mscale: float = flag(1.0, "yarn mscale")
    mscale_all_dim: float = flag(0.0, "yarn mscale_all_dim")

    def with_overrides(self, **overrides) -> ModelArgs:
        """Return a copy with the non-None overrides applied (unknown keys raise)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown model argument(s): {sorted(unknown)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def moe_layer_pattern(self) -> list[int]:
        """1 = MoE layer, 0 = dense layer, per trunk layer (megatron's ``moe_layer_freq``)."""
        return parse_moe_layer_freq(self.moe_layer_freq, self.num_layers) if self.is_moe else [0] * self.num_layers


def parse_moe_layer_freq(freq: int | str | list, num_layers: int) -> list[int]:
    """Megatron's ``--moe-layer-freq``: an int N (MoE every N-th layer from 0) or a list expression."""
    if isinstance(freq, str):
        text = freq.strip()
        if text.lstrip("-").isdigit():
            freq = int(text)
        else:
            import re

            if not re.fullmatch(r"[\[\]()0-9*+, ]+", text):
                raise ValueError(f"--moe-layer-freq {freq!r}: expected N or a list like '([0]*1+[1]*45)'")
            freq = eval(text, {"__builtins__": {}}, {})  # digits, brackets, * and + only (checked above)
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"--moe-layer-freq {freq}: must be ≥ 1")
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    pattern = [int(x) for x in freq]
    if len(pattern) != num_layers or set(pattern) - {0, 1}:
        raise ValueError(f"--moe-layer-freq {freq!r}: needs {num_layers} entries of 0 (dense) or 1 (MoE)")
    return pattern


PRESETS: dict[str, ModelArgs] = {
    # ~0.2M parameters: fast enough for the whole test suite on 2 cores.
    # Exports as MiMo, whose SGLang draft zeroes position 0's token embedding: trained the same way.
    "tiny-dense": ModelArgs(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=192,
        mtp_num_layers=2,
        mtp_zero_first_embedding=True,
    ),
    # 4 experts, top-2 sigmoid routing (GLM-4.5's router, so the preset exports as a GLM-4.5
    # checkpoint SGLang loads); the MTP layers use the same (MoE) layer spec as the trunk.
    "tiny-moe": ModelArgs(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=192,
        mtp_num_layers=2,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=96,
        moe_router_score_function="sigmoid",
    ),
}


def get_preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


#: ModelArgs fields that are training choices, not the model's shape: a flag may change them on --load.
TRAINING_CHOICES = ("moe_aux_loss_coeff", "moe_token_dispatcher_type", "init_method_std")


def from_checkpoint(saved: dict, given: dict, *, vocab_size: int, seq_length: int, bf16: bool, where: str) -> ModelArgs:
    """The checkpoint's ModelArgs (like Megatron's ``--use-checkpoint-args``): no shape flag needed.

    A shape flag that was given and disagrees with the checkpoint is an error naming both values.
    The vocabulary and the sequence length are the run's (tokenizer, ``--seq-length``).
    """
    from megatron_mtp_rl.errors import ConfigError

    known = {f.name for f in fields(ModelArgs)}
    base = ModelArgs(**{k: v for k, v in saved.items() if k in known})
    conflicts = []
    training = {k: v for k, v in given.items() if k in TRAINING_CHOICES and v is not None}
    for key, value in given.items():
        if value is None or key in ("vocab_size", "seq_length", "params_dtype") or key in TRAINING_CHOICES:
            continue
        have = getattr(base, key)
        if key == "num_experts" and value == 0:
            value = None
        if key == "moe_layer_freq":  # '2', 2 and '[1,0]' spell the same pattern in several ways
            n = base.num_layers
            have, value = parse_moe_layer_freq(have, n), parse_moe_layer_freq(value, n)
        if have != value:
            conflicts.append(f"--{key.replace('_', '-')} {value} (the checkpoint has {have})")
    if bf16 and base.params_dtype != "bf16":
        conflicts.append(f"--bf16 (the checkpoint's parameters are {base.params_dtype})")
    if conflicts:
        raise ConfigError(f"model flags disagree with the checkpoint in --load {where}: " + "; ".join(conflicts))
    return replace(base, vocab_size=vocab_size, seq_length=seq_length, **training)
