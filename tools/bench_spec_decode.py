"""Self-speculative decoding (MTP drafts, exact verification) vs plain KV-cached decoding.

The decoding half of ``tools/bench_rollout.py`` (kept under its old name): tokens/s plain vs spec
at batch 1 / 8 / 64, greedy and T=1, ratios measured in one run. Example (after ``make demo``):

    .venv/bin/python tools/bench_spec_decode.py --load runs/demo/warmstart --config examples/tiny_cpu/demo.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_rollout import main as bench_rollout

    bench_rollout(["--skip-async", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
