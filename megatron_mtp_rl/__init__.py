"""megatron-mtp-rl: RL post-training with jointly trained Multi-Token Prediction layers."""

__version__ = "0.1.0"
