"""Backend and device selection: torch.distributed, parallel_state, RNG seeding."""

from megatron_mtp_rl.platform.distributed import (
    ParallelSizes,
    destroy,
    device,
    initialize,
    seed_everything,
    use_cuda,
)

__all__ = ["ParallelSizes", "destroy", "device", "initialize", "seed_everything", "use_cuda"]
