"""``mtp-rl``: the command-line entry point (``train``, ``pretrain``, ``heal``)."""

from __future__ import annotations

import os
import sys


def quiet_known_noise() -> None:
    """Silence start-up chatter that says nothing actionable (CPU runs, optional extras).

    megatron-core warns at import about missing Transformer Engine / apex / absl, torch about
    the absent CUDA runtime, GPTModel about its deprecation, dist-checkpointing about its
    async API. Set MTP_RL_VERBOSE=1 to see them.
    """
    if os.environ.get("MTP_RL_VERBOSE") == "1":
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("torch.utils.cpp_extension", "megatron.core"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from megatron_mtp_rl.errors import ConfigError, DataError, print_user_error

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": _train, "pretrain": _pretrain, "heal": _heal}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: mtp-rl {train,pretrain,heal} [flags]   (mtp-rl train --help lists every flag)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    quiet_known_noise()
    try:
        return commands[argv[0]](argv[1:])
    except (ConfigError, DataError) as e:
        # A user mistake (flag, config file, data): one message (rank 0's under torchrun), no traceback.
        print_user_error(f"error: {e}")
        return 2


def _run(job, cfg) -> int:
    """Run a job; the parallel state is torn down whatever happens.

    Exit 1 with our message (no trainer traceback) when the reward function failed on every
    sample of a step (the message carries the worker's traceback), a rollout engine could not
    start (its command, exit code and log) or a collective timed out (which collective, which
    ranks: a hung peer).
    """
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.errors import EngineFailed, EngineStartError, TrainerFailed
    from megatron_mtp_rl.platform.distributed import describe_timeout
    from megatron_mtp_rl.rollout.reward_sandbox import RewardError

    try:
        job(cfg)
    except RewardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (EngineStartError, EngineFailed, TrainerFailed) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if _peers_waiting():
            sys.stdout.flush()
            os._exit(1)  # the other ranks wait in a collective for the engines' addresses
        return 1
    except RuntimeError as e:
        msg = describe_timeout(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # tearing the group down could wait on the hung peer again
    finally:
        platform.destroy()
    return 0


def _peers_waiting() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def _train(argv) -> int:
    from megatron_mtp_rl.config import parse_config

    cfg = parse_config(argv, "train")  # argparse only: --help never imports torch or megatron
    if cfg.ray.ray:
        from megatron_mtp_rl.cluster.ray_launch import launch

        return _run(launch, cfg)
    from megatron_mtp_rl.train.loop import run_training

    return _run(run_training, cfg)


def _pretrain(argv) -> int:
    from megatron_mtp_rl.config import parse_config

    cfg = parse_config(argv, "pretrain")
    from megatron_mtp_rl.train.pretrain import run_pretrain

    return _run(run_pretrain, cfg)


def _heal(argv) -> int:
    """Re-train the MTP layers of --load on the policy's own rollouts; trunk frozen (train/heal.py)."""
    from megatron_mtp_rl.config import parse_config

    cfg = parse_config(argv, "heal")
    from megatron_mtp_rl.train.heal import run_heal

    return _run(run_heal, cfg)


if __name__ == "__main__":
    sys.exit(main())
