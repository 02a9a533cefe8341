"""The *out* stream: this pipeline stage's parameters as HF tensors, one parameter at a time (DESIGN §10).

:func:`iter_hf_tensors` gathers ONE parameter over its own TP / EP group, maps it to HF names and yields
it. Weight sync fills buckets from it; ``hf/shards.py`` writes HF shards from it. No process holds the
whole model and no stage's tensors travel to another stage.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.hf.mapping import (
    iter_full_tensors,
    megatron_tensor_to_hf,
)
from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.platform.memory import freed_tensors_return_to_os

# --------------------------------------------------------------------------------------------
# out: this stage → HF tensors, one parameter at a time


def is_stage_sender() -> bool:
    """The one rank per pipeline stage that consumes the stream (first DP and TP rank of its stage)."""
    if not dist.is_initialized():
        return True
    return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0


_MTP_LAYER = re.compile(r"mtp\.layers\.(\d+)\.")


def iter_hf_tensors(
    model: torch.nn.Module,
    model_args: Any,
    family: Any,
    *,
    depth: int | None = None,
    with_copies: bool = False,
    complete: bool = True,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """This pipeline stage's weights as HF ``(name, tensor)`` pairs, gathered one parameter at a time.

    A collective over each parameter's TP / EP group: every rank of the stage runs it to the end
    (ranks that are not :func:`is_stage_sender` just drop what they get). Tensors may alias the
    parameters: copy what must outlive the next optimizer step. The first stage owns the word
    embedding; a later stage's tied copy is skipped. ``depth``: MTP layers to include (default: what
    the family's SGLang draft takes). ``complete``: add the zero tensors the HF architecture always
    has and our model may leave out (the family's rule), at the end of the stage. ``tensors``: the
    stage's tensors from elsewhere than the model (``mapping.iter_full_tensors``).
    """
    from dataclasses import replace

    from megatron_mtp_rl.hf.families import family_for

    gpt = unwrap(model)
    fam = family_for(model_args, family)
    depth = fam.export_depth(model_args) if depth is None else depth
    flavour = fam.flavour
    if flavour.mtp_embed_head_copies and not with_copies:
        flavour = replace(flavour, mtp_embed_head_copies=False)
    tied = not model_args.untie_embeddings_and_output_weights
    first_stage = not dist.is_initialized() or parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    seen: dict[str, torch.Tensor] = {}
    with freed_tensors_return_to_os():  # else the gathered tensors it frees stay in the heap
        for name, t in iter_full_tensors(gpt, tensors):
            if name.startswith("embedding.") and not first_stage:
                continue
            m = _MTP_LAYER.match(name)
            if m is not None and int(m.group(1)) >= depth:
                continue
            if name == "output_layer.weight" and tied:
                continue
            for hf_name, x in megatron_tensor_to_hf(
                name, t, gpt.config, flavour, tied=tied, hf_vocab_size=model_args.vocab_size
            ):
                seen[hf_name] = torch.empty(x.shape, dtype=x.dtype, device="meta")
                yield hf_name, x
                if hf_name == "model.embed_tokens.weight" and fam.writes_explicit_head(model_args):
                    seen["lm_head.weight"] = seen[hf_name]  # SGLang's class reads its head: the tied one, explicitly
                    yield "lm_head.weight", x
    if complete:
        for hf_name, meta in fam.complete(dict(seen), model_args, depth).items():
            if hf_name not in seen:
                yield hf_name, torch.zeros(meta.shape, dtype=meta.dtype)
