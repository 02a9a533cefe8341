"""Moved: flags are generated from the RunConfig fields in ``megatron_mtp_rl/config.py``.

``parse_args(argv)`` is kept as an alias of :func:`megatron_mtp_rl.config.parse_config`; it
returns a :class:`~megatron_mtp_rl.config.RunConfig` (read values as ``cfg.section.name``).
"""

from megatron_mtp_rl.config import ALGORITHMS, build_parser, parse_config

parse_args = parse_config

__all__ = ["ALGORITHMS", "build_parser", "parse_args", "parse_config"]
