"""Map a full (PP=1, TP=1) model state dict onto one pipeline stage's modules.

Used to give every parallel layout the same weights (tests, conversions). Pipeline
stages number their decoder layers locally from 0; the last stage of a model with tied
embeddings holds a copy of the word embedding as ``output_layer.weight`` or, when it runs
the MTP block, its own ``embedding`` module.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def stage_layer_offset(model: torch.nn.Module) -> int:
    """Global index of this stage's first decoder layer."""
    num_layers = model.config.num_layers
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    rank = parallel_state.get_pipeline_model_parallel_rank()
    return rank * (num_layers // pp)


def full_name(model: torch.nn.Module, local_name: str) -> str:
    """The PP=1 name of this stage's parameter/buffer ``local_name``."""
    m = _LAYER.match(local_name)
    if m:
        return f"decoder.layers.{int(m.group(1)) + stage_layer_offset(model)}." + local_name[m.end() :]
    if local_name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
        return "embedding.word_embeddings.weight"
    return local_name


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy the matching entries of a PP=1/TP=1 state dict into this stage (TP=1 only)."""
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise NotImplementedError("load_full_state_dict handles TP=1 layouts only")
    own = model.state_dict()
    missing = []
    for name, tensor in own.items():
        if name.endswith("_extra_state"):
            continue
        src = full.get(full_name(model, name))
        if src is None:
            missing.append(name)
            continue
        tensor.copy_(src)
    if missing:
        raise KeyError(f"no source for {missing}")
