"""Moved: the run is built by ``train/builders.py`` and validated by ``config.py``.

Kept so ``from megatron_mtp_rl.train.setup import ConfigError`` keeps working.
"""

from megatron_mtp_rl.errors import ConfigError, DataError

__all__ = ["ConfigError", "DataError"]
