"""Rollout side: engines (local, SGLang), manager, data sources, rewards. No Megatron imports."""
