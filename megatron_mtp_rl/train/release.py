"""Let a finished in-process run's model be freed, and with it its process groups' threads.

megatron-core's MoE token dispatcher keeps the last forward's routing probabilities
(``local_probs``) with their autograd node. That graph reaches the parameters' gradient
accumulators, whose hooks (megatron DDP's gradient-ready hooks) hold the DDP module: a cycle
through C++ autograd nodes that Python's garbage collector cannot see into. The model then
outlives the run, and every gloo group it references keeps its worker threads.
"""

from __future__ import annotations

import torch


def release_graphs(*models) -> int:
    """Drop the autograd graphs that modules keep as attributes (tensors with a ``grad_fn``); returns how many.

    ``models``: modules, lists of model chunks, or holders of one as ``.model`` (the reference, the
    critic); None is skipped. Call after the last step.
    """
    dropped = 0
    for model in models:
        if model is not None and not isinstance(model, (list, tuple, torch.nn.Module)):
            model = getattr(model, "model", None)
        if model is None:
            continue
        for chunk in model if isinstance(model, (list, tuple)) else [model]:
            if not isinstance(chunk, torch.nn.Module):
                continue
            for module in chunk.modules():
                holders = [module] + [v for v in vars(module).values() if _plain_object(v)]  # a token dispatcher
                for holder in holders:
                    for name, value in list(vars(holder).items()):
                        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                            setattr(holder, name, None)
                            dropped += 1
    return dropped


def _plain_object(value) -> bool:
    """A helper object a module keeps (not a module, tensor or container): its attributes are swept too."""
    return hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, torch.Tensor, type))
