"""``python -m megatron_mtp_rl.train [flags]`` = ``mtp-rl train [flags]`` (torchrun-friendly)."""

import sys

from megatron_mtp_rl.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
