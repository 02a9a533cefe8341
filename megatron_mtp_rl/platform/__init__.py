"""Backend and device selection: torch.distributed, parallel_state, RNG seeding."""

from megatron_mtp_rl.platform.device import collective_device, cuda_available, generator_for, peak_memory_gb
from megatron_mtp_rl.platform.distributed import (
    ParallelSizes,
    destroy,
    destroy_all_groups,
    device,
    initialize,
    seed_everything,
    use_cuda,
)

__all__ = [
    "ParallelSizes",
    "collective_device",
    "cuda_available",
    "destroy",
    "destroy_all_groups",
    "device",
    "generator_for",
    "initialize",
    "peak_memory_gb",
    "seed_everything",
    "use_cuda",
]
