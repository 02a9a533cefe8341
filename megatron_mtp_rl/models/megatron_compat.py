"""Every call into megatron-core's private API, in one place, with the version it was checked on.

megatron-core keeps no stable API below ``GPTModel.forward``; our forward needs to run the model's
parts one by one (``GPTModel.forward`` never returns MTP logits and cannot take explicit next
tokens for a drafting MTP step). Each function below wraps one private call and names it, so an
upgrade of megatron-core is checked here and nowhere else. CPU shims live in ``platform/cpu.py``.

Checked against megatron-core **0.19.2** (``megatron/core/models/gpt/gpt_model.py``,
``megatron/core/transformer/multi_token_prediction.py``).
"""

from __future__ import annotations

import torch

CHECKED_MEGATRON_CORE_VERSION = "0.19.2"


def apply() -> None:
    """Patches megatron-core still needs on this version: none on 0.19.2 (CPU shims are in platform/)."""


def drop_unused_output_weight(gpt) -> None:
    """Free the output layer's own weight on a tied last stage that runs the MTP block (PP > 1).

    ``GPTModel`` (0.19.2, ``gpt_model.py``) allocates ``output_layer.weight`` unless the stage
    is the first one, but a tied stage with the MTP block keeps its own ``embedding`` and
    passes that weight to the output layer (``shared_embedding_or_output_weight``), so the
    output layer's weight is never used — and ``LanguageModule.sharded_state_dict`` asserts it
    is absent there (``tie_embeddings_and_output_weights_state_dict``), so saving or loading
    any checkpoint on that stage fails. Megatron's own layout (``skip_weight_param_allocation``)
    is a weightless output layer; this makes it so before DDP and the optimizer see it.
    """
    layer = getattr(gpt, "output_layer", None)
    if (
        layer is not None
        and getattr(gpt, "share_embeddings_and_output_weights", False)
        and getattr(gpt, "mtp_process", False)
        and not gpt.pre_process
        and getattr(layer, "weight", None) is not None
    ):
        layer.weight = None


def stage_input(gpt) -> torch.Tensor | None:
    """The activation this pipeline stage received (``TransformerBlock.input_tensor``, set by the
    schedule through ``GPTModel.set_input_tensor``); None on the first stage."""
    if gpt.pre_process:
        return None
    return getattr(gpt.decoder, "input_tensor", None)


def preprocess(
    gpt, input_ids: torch.Tensor, position_ids: torch.Tensor, inference_context=None, packed_seq_params=None
):
    """``GPTModel._preprocess``: token embedding and rotary tables.

    Returns ``(decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset)``;
    0.19.2 returns a longer tuple (``padding_mask`` ...), of which the first five are these.
    """
    pre = gpt._preprocess(
        input_ids=input_ids,
        position_ids=position_ids,
        decoder_input=None,
        inference_context=inference_context,
        packed_seq_params=packed_seq_params,
    )
    return pre[:5]


def mtp_layer_step(
    layer,
    hidden_states: torch.Tensor,
    decoder_input: torch.Tensor,
    attention_mask: torch.Tensor,
    rotary_pos_emb,
    inference_context=None,
) -> torch.Tensor:
    """One MTP depth with its *next-token embeddings given*, writing its KV cache.

    ``MultiTokenPredictionLayer.forward`` rolls ``input_ids`` by one column to find each
    position's next token, which is wrong once a row's positions are not contiguous columns
    (per-row acceptance leaves gaps); ``forward_single_position`` takes the next tokens but
    drops the inference context. Both end in ``_proj_and_transformer_layer`` (enorm/hnorm,
    ``eh_proj``, the transformer layer, the final norm), which takes both.
    """
    return layer._proj_and_transformer_layer(
        hidden_states=hidden_states,
        decoder_input=decoder_input,
        attention_mask=attention_mask,
        rotary_pos_emb=rotary_pos_emb,
        inference_params=inference_context,
    )


def replace_output_layer(gpt, head: torch.nn.Module) -> None:
    """Make ``head`` the GPTModel's (untied) output layer: the critic's scalar value head.

    ``GPTModel`` (0.19.2) builds a vocabulary-sized ``output_layer``; built tied on a single stage it
    allocates no weight (``skip_weight_param_allocation``). Swapping in ``head`` and clearing
    ``share_embeddings_and_output_weights`` makes ``LanguageModule.sharded_state_dict`` save it as an
    ordinary ``output_layer.weight`` instead of tying it to the word embeddings. Call before DDP.
    """
    gpt.output_layer = head
    gpt.share_embeddings_and_output_weights = False
