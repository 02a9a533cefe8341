"""``mtp-rl``: the command-line entry point (``train``, ``pretrain``)."""

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
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": _train, "pretrain": _pretrain}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: mtp-rl {train,pretrain} [flags]   (mtp-rl train --help lists every flag)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    quiet_known_noise()
    return commands[argv[0]](argv[1:])


def _run(job, args) -> int:
    """Run a job; configuration errors print one message and exit 2 instead of a traceback."""
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.train.setup import ConfigError

    try:
        job(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        platform.destroy()
    return 0


def _train(argv) -> int:
    from megatron_mtp_rl.train.arguments import parse_args
    from megatron_mtp_rl.train.trainer import run_training

    args = parse_args(argv)
    if args.ray:
        from megatron_mtp_rl.train.ray_launch import launch

        return _run(launch, args)
    return _run(run_training, args)


def _pretrain(argv) -> int:
    from megatron_mtp_rl.train.pretrain import parse_pretrain_args, run_pretrain

    return _run(run_pretrain, parse_pretrain_args(argv))


if __name__ == "__main__":
    sys.exit(main())
