"""Model shapes: the tiny presets that train on 2 CPU cores, and Megatron-style overrides."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class ModelArgs:
    """The model flags we accept, named as Megatron-LM names them (``--num-layers`` ...)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    ffn_hidden_size: int = 256
    vocab_size: int = 64
    seq_length: int = 128
    mtp_num_layers: int = 0
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_aux_loss_coeff: float = 0.0
    moe_token_dispatcher_type: str = "allgather"
    untie_embeddings_and_output_weights: bool = False
    normalization: str = "RMSNorm"
    swiglu: bool = True
    rotary_base: int = 10000
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 64
    params_dtype: str = "fp32"

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


PRESETS: dict[str, ModelArgs] = {
    # ~0.2M parameters: fast enough for the whole test suite on 2 cores.
    "tiny-dense": ModelArgs(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=192, mtp_num_layers=2),
    # 4 experts, top-2 routing; the MTP layers use the same (MoE) layer spec as the trunk.
    "tiny-moe": ModelArgs(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=192,
        mtp_num_layers=2,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=96,
    ),
}


def get_preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
