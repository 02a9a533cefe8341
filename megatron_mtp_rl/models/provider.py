"""Model provider: megatron-core GPTModel (dense or MoE) with an MTP block, built from specs.

Transformer Engine specs when TE and CUDA are present, megatron-core local specs otherwise.
Pipeline stages, MTP placement (last stage) and expert sharding follow megatron-core.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer import TransformerConfig

from megatron_mtp_rl.models import megatron_compat as compat
from megatron_mtp_rl.models.presets import ModelArgs
from megatron_mtp_rl.platform.device import cuda_available
from megatron_mtp_rl.platform.distributed import device as platform_device

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_engine_available() -> bool:
    """TE layer specs need both the package and a CUDA device."""
    if not cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def padded_vocab_size(args: ModelArgs, tp_size: int) -> int:
    """Pad the vocabulary to a multiple of ``make_vocab_size_divisible_by``.

    Unlike Megatron-LM we do not multiply the multiple by TP: the padded size (and so the
    checkpoint) is the same for every TP size; TP must divide it.
    """
    m = args.make_vocab_size_divisible_by
    padded = ((args.vocab_size + m - 1) // m) * m
    if padded % tp_size != 0:
        raise ValueError(
            f"--tensor-model-parallel-size {tp_size} does not divide the padded vocabulary "
            f"{padded} (vocab {args.vocab_size}, --make-vocab-size-divisible-by {m})"
        )
    return padded


@dataclass(frozen=True)
class RuntimeOptions:
    """How the model runs, as opposed to what it is (ModelArgs): megatron's kernel and memory flags.

    Not stored with the checkpoint's shape: a run may resume with recompute or sequence
    parallelism switched on or off.
    """

    transformer_impl: str | None = None  # "transformer_engine" | "local" | None = TE when usable
    sequence_parallel: bool = False
    recompute_granularity: str | None = None  # "full" | "selective"
    recompute_method: str | None = None  # "uniform" | "block"
    recompute_num_layers: int | None = None
    # megatron's RouterReplay on every MoE router (models/routing_replay.py: R3 / R2, the engine's routes)
    routing_replay: bool = False
    # False: parameters are allocated, not initialised (every one is about to be loaded: no fp32
    # master copy per tensor, no RNG work) — the converter and direct HF loading
    perform_initialization: bool = True

    def use_te(self) -> bool:
        if self.transformer_impl is None:
            return transformer_engine_available()
        return self.transformer_impl == "transformer_engine"


def build_config(
    args: ModelArgs, *, use_te: bool | None = None, runtime: RuntimeOptions | None = None
) -> TransformerConfig:
    """TransformerConfig from ModelArgs, the run's RuntimeOptions and the current parallel_state sizes."""
    runtime = runtime or RuntimeOptions()
    if use_te is None:
        use_te = runtime.use_te()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    if args.num_attention_heads % tp != 0:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads {args.num_attention_heads}"
        )
    if args.num_experts and args.num_experts % ep != 0:
        raise ValueError(f"--expert-model-parallel-size {ep} does not divide --num-experts {args.num_experts}")
    if ep > 1 and not args.num_experts:
        raise ValueError("--expert-model-parallel-size > 1 needs --num-experts")
    if args.num_layers % pp != 0:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {args.num_layers}")
    dtype = _DTYPES[args.params_dtype]
    cuda = cuda_available()
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.head_dim,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        context_parallel_size=cp,
        sequence_parallel=runtime.sequence_parallel and tp > 1,
        recompute_granularity=runtime.recompute_granularity,
        recompute_method=runtime.recompute_method,
        recompute_num_layers=runtime.recompute_num_layers,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        attention_output_gate=args.attention_output_gate,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=False,
        init_method_std=args.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        use_cpu_initialization=not cuda,
        perform_initialization=runtime.perform_initialization,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=use_te,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        mtp_num_layers=args.mtp_num_layers or None,
        mtp_loss_scaling_factor=0.0,
    )
    if args.num_experts:
        kwargs.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
            moe_token_dispatcher_type=args.moe_token_dispatcher_type if cuda else "allgather",
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss" if args.moe_aux_loss_coeff > 0 else "none",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_layer_freq=args.moe_layer_pattern(),
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size or None,
            moe_shared_expert_gate=args.moe_shared_expert_gate,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_pre_softmax=args.moe_router_pre_softmax,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_router_num_groups=args.moe_router_num_groups,
            moe_router_group_topk=args.moe_router_group_topk,
            moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
            moe_enable_routing_replay=runtime.routing_replay,
        )
    if args.multi_latent_attention:
        if not use_te:
            raise ValueError(MLA_NEEDS_TE)
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        kwargs.pop("kv_channels")
        kwargs.update(
            rotary_base=args.rotary_base,
            rotary_percent=args.rotary_percent,
            q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank,
            qk_head_dim=args.qk_head_dim,
            qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
            v_head_dim=args.v_head_dim,
            rope_type=args.rope_type,
            rotary_scaling_factor=args.rotary_scaling_factor,
            original_max_position_embeddings=args.original_max_position_embeddings,
            beta_fast=args.beta_fast,
            beta_slow=args.beta_slow,
            mscale=args.mscale,
            mscale_all_dim=args.mscale_all_dim,
        )
        return MLATransformerConfig(**kwargs)
    return TransformerConfig(**kwargs)


#: The one-line refusal for multi-latent attention without Transformer Engine.
MLA_NEEDS_TE = (
    "multi-latent attention (--multi-latent-attention, DeepSeek-V3 family) needs Transformer Engine and a CUDA "
    "GPU: megatron-core's local (CPU) spec cannot build MLA"
)


def _uses_block_spec(args: ModelArgs) -> bool:
    """Per-layer specs are needed for dense-first MoE models and MLA; the single layer spec otherwise."""
    return args.multi_latent_attention or (args.is_moe and 0 in args.moe_layer_pattern())


def layer_specs(args: ModelArgs, config: TransformerConfig, use_te: bool):
    """This stage's decoder spec (a layer spec or megatron's block spec) — the MTP spec follows its last layer."""
    if _uses_block_spec(args):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=args.normalization)
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=args.num_experts, qk_layernorm=args.qk_layernorm)
    return get_gpt_layer_local_spec(
        num_experts=args.num_experts, normalization=args.normalization, qk_layernorm=args.qk_layernorm
    )


def build_model(
    args: ModelArgs,
    *,
    use_te: bool | None = None,
    device: torch.device | str | None = None,
    runtime: RuntimeOptions | None = None,
) -> GPTModel:
    """Build this pipeline stage's GPTModel (MTP block only on the stage megatron places it)."""
    runtime = runtime or RuntimeOptions()
    if use_te is None:
        use_te = runtime.use_te()
    compat.apply()
    config = build_config(args, use_te=use_te, runtime=runtime)
    layer_spec = layer_specs(args, config, use_te)
    mtp_spec = None
    if args.mtp_num_layers:
        mtp_spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=use_te)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(args, tp),
        max_sequence_length=args.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent,
        mtp_block_spec=mtp_spec,
    )
    compat.drop_unused_output_weight(model)  # PP > 1, tied, MTP on the last stage: checkpointable
    # The tokenizer's vocabulary: log-probs leave megatron's padding ids out, as samplers do.
    model.real_vocab_size = args.vocab_size
    # Transformer Engine's attention reads packed rows as THD (cu_seqlens), not through a mask.
    model.thd_packing = use_te
    # MiMo's MTP layers read a zero token embedding at each sequence's position 0 (models/forward.py).
    model.mtp_zero_first_embedding = args.mtp_zero_first_embedding
    if runtime.routing_replay:
        from megatron_mtp_rl.models.routing_replay import install

        install(model)
    model = model.to(device if device is not None else platform_device())
    return model


def is_mtp_parameter(name: str) -> bool:
    """True for parameters that belong to the MTP block (``mtp.layers.*``)."""
    return name.startswith("mtp.") or ".mtp." in name


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
