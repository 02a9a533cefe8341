"""The one GPT forward: embedding → decoder → MTP block → output layer.

Training log-probs (:mod:`~megatron_mtp_rl.models.mtp_forward`), generation
(:mod:`~megatron_mtp_rl.models.generation`) and the tests all run the model through these
functions. megatron's ``GPTModel.forward`` is not enough: it never returns MTP hidden states or
logits (it trains the heads with its own CE), and it cannot run one MTP depth with explicit next
tokens and a KV cache, which self-speculative drafting needs. Private megatron calls go through
:mod:`~megatron_mtp_rl.models.megatron_compat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_mtp_rl.models import megatron_compat as compat


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@dataclass
class ForwardOutput:
    """This pipeline stage's outputs, in megatron's ``[S, B, H]`` layout."""

    hidden: torch.Tensor  # decoder output (a non-last stage sends it on)
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # depth k at index k-1
    rotary_pos_emb: torch.Tensor | None = None  # the rotary table the layers used
    # MTP block run on detached inputs (``head_mtp_pass``), for MTP-head-only objectives beside
    # an attached regime (rl/head_loss.py); the same list as ``mtp_hidden`` when that is detached.
    head_mtp_hidden: list[torch.Tensor] = field(default_factory=list)


def gpt_forward(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    with_mtp: bool = True,
    detach_mtp: bool = False,
    inference_context=None,
    rotary_pos_emb: torch.Tensor | None = None,
    head_mtp_pass: bool = False,
    packed_seq_params=None,
) -> ForwardOutput:
    """Run the decoder and (when this stage has it and ``with_mtp``) megatron's MTP block.

    ``attention_mask`` is ``[B, 1, S_q, S_k]``, True = masked. ``detach_mtp`` cuts the MTP path
    off the trunk: the hidden states handed to the MTP block and the token embeddings it looks
    up are detached, so MTP losses reach the MTP layers only. ``inference_context`` (a
    megatron ``StaticInferenceContext``) makes the decoder read and extend its KV cache;
    ``rotary_pos_emb`` overrides the rotary table (generation passes per-row tables indexed
    by cache slot, ``[L, B, 1, d]``). ``head_mtp_pass`` also runs the MTP block on detached
    inputs (``out.head_mtp_hidden``): values equal the attached pass, gradients stop at the MTP
    layers — the exact way to add a head-only loss beside a loss that reaches the trunk.
    """
    gpt = unwrap(model)
    if rotary_pos_emb is None:
        decoder_input, rotary_pos_emb, rotary_cos, rotary_sin, seq_len_offset = compat.preprocess(
            gpt, tokens, position_ids, inference_context, packed_seq_params
        )
    else:
        decoder_input = gpt.embedding(input_ids=tokens, position_ids=position_ids) if gpt.pre_process else None
        rotary_cos = rotary_sin = seq_len_offset = None
    hidden = gpt.decoder(
        hidden_states=decoder_input,
        attention_mask=attention_mask,
        inference_context=inference_context,
        rotary_pos_emb=rotary_pos_emb,
        rotary_pos_cos=rotary_cos,
        rotary_pos_sin=rotary_sin,
        sequence_len_offset=seq_len_offset,
        packed_seq_params=packed_seq_params,
    )
    out = ForwardOutput(hidden=hidden, rotary_pos_emb=rotary_pos_emb)
    if not (with_mtp and gpt.mtp_process):
        return out

    first = first_position_mask(gpt, position_ids)

    def run_mtp(detach: bool) -> list[torch.Tensor]:
        trunk = hidden.detach() if detach else hidden

        def embedding(input_ids, position_ids, _emb=gpt.embedding):
            out = _emb(input_ids=input_ids, position_ids=position_ids)
            out = out.detach() if detach else out
            return out if first is None else zero_rows(out, first)

        stacked = gpt.mtp(
            input_ids=tokens,
            position_ids=position_ids,
            hidden_states=trunk,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_cos,
            rotary_pos_sin=rotary_sin,
            sequence_len_offset=seq_len_offset,
            embedding=embedding,
            packed_seq_params=packed_seq_params,
        )
        return list(torch.chunk(stacked, 1 + gpt.config.mtp_num_layers, dim=0))[1:]

    out.mtp_hidden = run_mtp(detach_mtp)
    if head_mtp_pass:
        out.head_mtp_hidden = out.mtp_hidden if detach_mtp else run_mtp(True)
    return out


def mtp_depth_forward(
    model: torch.nn.Module,
    depth: int,
    hidden: torch.Tensor,
    next_ids: torch.Tensor,
    next_position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rotary_pos_emb: torch.Tensor | None,
    inference_context=None,
    query_position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """MTP depth ``depth`` (1-based) at given positions, with each position's next token given.

    Computes what megatron's MTP block computes for that depth (``hidden`` is the previous
    depth's output, the trunk's for depth 1; ``next_ids[b, j]`` is the token ``depth``
    positions after query ``j``), without rolling ``input_ids`` by a column, so rows may
    have gaps; with ``inference_context`` (one per MTP block: its layers number 1..D) each
    call extends that depth's KV cache instead of re-running the prefix. ``query_position_ids``
    (the queries' own positions) let a model with ``mtp_zero_first_embedding`` zero position 0's input.
    """
    gpt = unwrap(model)
    block = gpt.mtp
    layer = block.layers[0 if getattr(block, "mtp_use_repeated_layer", False) else depth - 1]
    decoder_input = gpt.embedding(input_ids=next_ids, position_ids=next_position_ids)
    first = None if query_position_ids is None else first_position_mask(gpt, query_position_ids)
    if first is not None:
        decoder_input = zero_rows(decoder_input, first)
    return compat.mtp_layer_step(layer, hidden, decoder_input, attention_mask, rotary_pos_emb, inference_context)


def first_position_mask(gpt, position_ids: torch.Tensor) -> torch.Tensor | None:
    """``[S, B]`` True where a sequence starts (position 0), for models whose MTP layers read a zero
    token embedding there (``gpt.mtp_zero_first_embedding``, set by the provider); None otherwise.

    MiMo's MTP does this (SGLang's ``MiMoMTP``: ``hidden_states[positions == 0] = 0``), so the heads
    we train compute what SGLang drafts with. Megatron rolls ``position_ids`` along with the tokens
    before each depth's embedding lookup, so the mask is taken here, from the unrolled positions.
    """
    if not getattr(gpt, "mtp_zero_first_embedding", False):
        return None
    return (position_ids == 0).t()


def zero_rows(embedded: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``embedded [S, B, H]`` with the rows ``first [S, B]`` set to 0 (this rank's part under sequence parallel)."""
    if embedded.shape[0] != first.shape[0]:  # sequence parallel: the embedding is scattered along S
        from megatron.core import parallel_state

        rows = embedded.shape[0]
        rank = parallel_state.get_tensor_model_parallel_rank()
        first = first[rank * rows : (rank + 1) * rows]
    return embedded.masked_fill(first[..., None], 0.0)


def output_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The shared embedding weight the output layer uses when tied (None when untied)."""
    gpt = unwrap(model)
    return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None


def output_logits(
    model: torch.nn.Module, hidden: torch.Tensor, *, weight: torch.Tensor | None = None, gather: bool = False
) -> torch.Tensor:
    """Logits ``[S, B, V(/TP)]`` of the shared output layer; ``gather`` collects the TP shards."""
    gpt = unwrap(model)
    if weight is None:
        weight = output_weight(gpt)
    logits, _ = gpt.output_layer(hidden, weight=weight, runtime_gather_output=gather or None)
    return logits
