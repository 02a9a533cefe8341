"""Tiny RANDOM Hugging Face checkpoints laid out the way real releases are (for tests and tools/bench_scale.py).

A release here is what the hub serves: ``config.json``, N shards ``model-0000k-of-0000N.safetensors``
and ``model.safetensors.index.json``; bf16 tensors except the sigmoid router's
``e_score_correction_bias`` (fp32, as GLM-4.5 / DeepSeek-V3 publish it); the MTP layers' tensors in
the family's published naming. ``fp8=True`` stores the 2-D linear weights as ``float8_e4m3fn`` with a
``<name>_scale_inv`` per 128x128 block and writes ``quantization_config`` (DeepSeek-V3's layout).

The trunk and the MTP layers' decoder layers are a transformers model of the family's class (so the
names are transformers' own): the model is built with ``layers + mtp_layers`` layers and the last
``mtp_layers`` are renamed to the family's MTP prefix; the MTP-only tensors (norms, projection) are
named from the published layouts (:func:`mtp_only_tensors`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("glm4_moe", "qwen3_moe", "mimo")
FP8_BLOCK = (128, 128)
QUANTIZATION_CONFIG = {  # DeepSeek-V3's config.json
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(FP8_BLOCK),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Norms ≠ 1 and biases / routing biases ≠ 0, so a wrong mapping of either shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def mtp_only_tensors(family: str, num_layers: int, k: int, h: int, g: torch.Generator) -> tuple[str, dict]:
    """(MTP layer ``k``'s decoder-layer prefix, its own tensors: two norms, the projection, the final norm).

    MiMo ``model.mtp_layers.k.{token_layernorm, hidden_layernorm, input_proj, final_layernorm}``; Qwen3(-MoE)
    ``mtp.{pre_fc_norm_embedding, pre_fc_norm_hidden, fc, norm}`` + ``mtp.layers.0.``; GLM-4.5 / DeepSeek-V3
    ``model.layers.{L+k}.{enorm, hnorm, eh_proj, shared_head.norm}``. fp32; the caller casts.
    """

    def norm():
        return 1.0 + 0.2 * torch.randn(h, generator=g)

    proj = 0.05 * torch.randn(h, 2 * h, generator=g)
    if family == "mimo":
        layer = own = f"model.mtp_layers.{k}."
        names = ("token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm")
    elif family in ("qwen3", "qwen3_moe"):
        layer, own = "mtp.layers.0.", "mtp."
        names = ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm")
    else:
        layer = own = f"model.layers.{num_layers + k}."
        names = ("enorm", "hnorm", "eh_proj", "shared_head.norm")
    tensors = {own + names[0] + ".weight": norm(), own + names[1] + ".weight": norm()}
    tensors |= {own + names[2] + ".weight": proj, own + names[3] + ".weight": norm()}
    return layer, tensors


def family_config(family: str, *, hidden: int, layers: int, experts: int, mtp_layers: int, **extra: Any):
    """(transformers CausalLM class, its config) for a release of ``family``; ``extra`` overrides any key.

    GLM-4.5's traits: one dense layer first, a shared expert, sigmoid routing with expert bias and
    scaling, q/k/v bias, half-rotary heads of 128 (64 below hidden 512).
    """
    import transformers

    heads = max(4, hidden // 128)
    common = dict(
        vocab_size=128,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=max(2, heads // 4),
        head_dim=hidden // heads,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if family == "glm4_moe":
        cls, cfg_cls = transformers.Glm4MoeForCausalLM, transformers.Glm4MoeConfig
        kw = dict(n_routed_experts=experts, num_experts_per_tok=min(experts, 2), moe_intermediate_size=hidden // 2,
                  n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, n_group=1, topk_group=1,
                  norm_topk_prob=True, attention_bias=True, partial_rotary_factor=0.5, use_qk_norm=False)  # fmt: skip
    elif family == "qwen3_moe":
        cls, cfg_cls = transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
        kw = dict(num_experts=experts, num_experts_per_tok=min(experts, 2), moe_intermediate_size=hidden // 2,
                  norm_topk_prob=True)  # fmt: skip
    elif family == "mimo":
        if experts:
            raise ValueError("mimo is dense: experts=0")
        cls, cfg_cls = transformers.Qwen2ForCausalLM, transformers.Qwen2Config
        kw = dict(rope_parameters={"rope_type": "default", "rope_theta": 640000.0})
        common.pop("head_dim")  # Qwen2: hidden / heads
    else:
        raise ValueError(f"family {family!r}: choose one of {FAMILIES}")
    return cls, cfg_cls(**(common | kw | extra))


def _checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under its checkpoint names (transformers ≥ 5 fuses experts in memory, not on disk)."""
    from safetensors.torch import load_file
    from transformers.utils import logging

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size="1000GB")
        return {n: t.clone() for n, t in load_file(str(Path(tmp) / "model.safetensors")).items()}


def is_fp8_weight(name: str, t: torch.Tensor) -> bool:
    """What DeepSeek-V3's release stores in fp8: 2-D linear weights, not embeddings / router / lm_head /
    norms / the MTP layers' own projection (SGLang's NextN builds that one as a plain bf16 ``nn.Linear``)."""
    own_proj = (".eh_proj.", ".input_proj.", "mtp.fc.")
    skip = ("embed_tokens", "lm_head", "shared_head.head", ".mlp.gate.weight", *own_proj)
    return t.dim() == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def release_tensors(
    family: str,
    *,
    hidden: int,
    layers: int,
    experts: int,
    mtp_layers: int,
    dtype: str = "bf16",
    fp8: bool = False,
    seed: int = 0,
    **extra: Any,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json dict, name → tensor) of a random release; see :func:`make_release`."""
    from megatron_mtp_rl.hf.fp8 import quantize_fp8_blocks

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    shape = dict(hidden=hidden, experts=experts, mtp_layers=mtp_layers, **extra)
    cls, cfg = family_config(family, layers=layers, **shape)
    _, with_mtp = family_config(family, layers=layers + mtp_layers, **shape)  # MTP decoder layers at the end
    torch.manual_seed(seed)
    model = cls._from_config(with_mtp, dtype=torch_dtype).eval()
    randomise(model, seed + 1)
    tensors = _checkpoint_tensors(model)
    del model
    g = torch.Generator().manual_seed(seed + 2)
    for k in range(mtp_layers):
        prefix, own = mtp_only_tensors(family, layers, k, hidden, g)
        src = f"model.layers.{layers + k}."
        for name in [n for n in tensors if n.startswith(src)]:
            tensors[prefix + name.removeprefix(src)] = tensors.pop(name)
        tensors |= own
        if family == "glm4_moe":  # GLM-4.5 / DeepSeek-V3 ship per-MTP-layer copies of the embedding and head
            tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
            tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    for name, t in tensors.items():  # bf16 except the router's expert bias (fp32 in the published releases)
        tensors[name] = t.float() if name.endswith("e_score_correction_bias") else t.to(torch_dtype)
    config = cfg.to_dict() | {"num_nextn_predict_layers": mtp_layers}
    config["torch_dtype"] = config["dtype"] = "bfloat16" if dtype == "bf16" else "float32"
    if family == "mimo":  # MiMo's release: Qwen2 + MTP under its own model type
        config |= {"architectures": ["MiMoForCausalLM"], "model_type": "mimo"}
    if fp8:
        for name in [n for n, t in tensors.items() if is_fp8_weight(n, t)]:
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(tensors[name], FP8_BLOCK)
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return config, tensors


def write_release(out_dir: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], shards: int) -> Path:
    """Write ``tensors`` as ``shards`` safetensors files of about equal bytes (in name order, so each layer
    stays together as in releases) + ``model.safetensors.index.json`` + ``config.json``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards < 1 or shards > len(names):
        raise ValueError(f"shards={shards}: between 1 and the {len(names)} tensors")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    done, k = 0, 0
    for i, name in enumerate(names):
        if groups[k]:  # move on by at most one shard, and early enough that none stays empty
            k = max(min(max(int(done * shards / total), k), k + 1, shards - 1), shards - (len(names) - i))
        groups[k].append(name)
        done += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(out / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in group}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def make_release(out_dir: str | Path, family: str, *, hidden: int, layers: int, experts: int, mtp_layers: int,
                 shards: int, dtype: str = "bf16", fp8: bool = False, seed: int = 0, tokenizer: bool = False,
                 **extra: Any) -> Path:  # fmt: skip
    """A random ``family`` release in ``out_dir``; returns the directory.

    ``family``: glm4_moe, qwen3_moe or mimo; ``experts`` routed experts (0 for mimo); ``extra``
    overrides config keys (``vocab_size``, ``num_attention_heads`` ...). ``tokenizer`` also writes
    tests/tiny_hf.py's tokenizer (then ``vocab_size`` must hold it: pass 320).
    """
    config, tensors = release_tensors(
        family, hidden=hidden, layers=layers, experts=experts, mtp_layers=mtp_layers, dtype=dtype, fp8=fp8,
        seed=seed, **extra,
    )  # fmt: skip
    out = write_release(out_dir, config, tensors, shards)
    if tokenizer:
        from tests.tiny_hf import make_hf_tokenizer

        make_hf_tokenizer(out)
    return out
