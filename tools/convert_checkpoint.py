"""Convert between a Hugging Face safetensors directory and our megatron-core dist checkpoint.

Both directions go through the one Megatron↔HF mapping (``megatron_mtp_rl/models/hf_mapping.py``),
the same code weight sync uses, so MTP layers, GQA, SwiGLU and MoE experts are laid out once::

    # HF → Megatron: SAVE/iter_0000000/ + trainer_state.pt (model_args) + latest_checkpointed_iteration.txt
    python tools/convert_checkpoint.py hf-to-mcore --hf-dir HF_DIR --save ckpt/mcore
    # then: mtp-rl train --load ckpt/mcore --finetune <the flags this command prints> ...

    # Megatron → HF (model_args from trainer_state.pt): model.safetensors + config.json
    python tools/convert_checkpoint.py mcore-to-hf --load ckpt/mcore --out HF_OUT

Runs in ONE process at TP=PP=EP=1 (CPU unless a GPU is present), so the whole model must fit in
host memory. The HF config may be our own export's (``weight_sync.hf_config``) or a MiMo /
DeepSeek-V3 / Qwen2-MoE / Llama-style ``config.json``; whatever our provider cannot represent
(MLA, shared experts, dense-first MoE layers, qkv biases, rope scaling, another head_dim) is
refused with the reason rather than converted into a different model.

Two things to get right for a real run:

* Convert on the kind of machine that trains. With Transformer Engine (and a GPU) the model and so
  the checkpoint use TE's layer names (norms fused into ``linear_qkv``/``linear_fc1``); without it,
  megatron's local names. A checkpoint of one kind is not expected to load into the other.
* Megatron pads the vocabulary to a multiple of ``--make-vocab-size-divisible-by`` with zero rows
  whose logits (0) enter the trainer's log-softmax but not HF's; pick a multiple the HF
  ``vocab_size`` already is (128 for Qwen/MiMo/DeepSeek/Moonlight) so both compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

MEGATRON_NORM_EPS = 1e-5  # TransformerConfig.layernorm_epsilon default; our provider does not change it
MEGATRON_ROPE_BASE = 10000  # ModelArgs.rotary_base default; `mtp-rl train` has no flag to change it
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
    """The checkpoint cannot be represented by our model provider; the message says why."""


class ConversionWarning(UserWarning):
    """Exact weights, but something the user must know (numerics differ, a flag is missing)."""


# ---------------------------------------------------------------------------------------------
# HF side: config and tensors


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{path} not found: an HF checkpoint directory needs its config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def load_hf_tensors(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in the directory (sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise ConversionError(f"no *.safetensors file in {hf_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            if name in out:
                raise ConversionError(f"{name} appears in more than one safetensors file of {hf_dir}")
            out[name] = t
    return out


def _rope(cfg: dict) -> tuple[float, str | None]:
    """(rope base, rope type): transformers ≥ 5 nests them in ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", MEGATRON_ROPE_BASE))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return float(theta), kind


def _first(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def model_args_from_hf_config(
    cfg: dict[str, Any],
    *,
    params_dtype: str = "fp32",
    vocab_size: int | None = None,
    make_vocab_size_divisible_by: int = 64,
    mtp_num_layers: int | None = None,
):
    """Our ModelArgs for an HF config; raises :class:`ConversionError` for what we cannot build.

    Warns (does not refuse) where the conversion is exact but the numerics of our provider differ
    from the source model: RMSNorm epsilon (megatron's 1e-5) and top-k probability normalisation.
    """
    from megatron_mtp_rl.models.presets import ModelArgs

    problems = []
    if cfg.get("q_lora_rank") is not None or cfg.get("kv_lora_rank") is not None:
        problems.append("multi-latent attention (q_lora_rank/kv_lora_rank): our provider has GQA attention only")
    if cfg.get("attention_bias") or cfg.get("qkv_bias") or cfg.get("mlp_bias"):
        problems.append("linear biases (attention_bias/qkv_bias/mlp_bias): our provider builds bias-free linears")
    if _first(cfg, "hidden_act", default="silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r}: our MLP is SwiGLU (silu)")
    theta, rope_type = _rope(cfg)
    if rope_type not in (None, "default"):
        problems.append(f"rope type {rope_type!r}: only plain RoPE is built")
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        problems.append(f"head_dim {head_dim} ≠ hidden_size/num_attention_heads = {hidden // heads}")
    experts = _first(cfg, "n_routed_experts", "num_experts", "num_local_experts", default=0) or 0
    if experts:
        if (cfg.get("n_shared_experts") or 0) > 0 or (cfg.get("shared_expert_intermediate_size") or 0) > 0:
            problems.append("shared experts: our MoE layers have routed experts only")
        if (cfg.get("first_k_dense_replace") or 0) > 0 or cfg.get("mlp_only_layers"):
            problems.append("dense layers inside a MoE model (first_k_dense_replace/mlp_only_layers)")
        if (cfg.get("decoder_sparse_step") or 1) != 1 or (cfg.get("moe_layer_freq") or 1) != 1:
            problems.append("MoE on only some layers (decoder_sparse_step/moe_layer_freq)")
        if cfg.get("scoring_func", "softmax") != "softmax":
            problems.append(f"router scoring_func {cfg['scoring_func']!r}: megatron's router here is softmax")
        if (cfg.get("n_group") or 1) > 1:
            problems.append("group-limited routing (n_group > 1)")
    if problems:
        raise ConversionError("cannot convert this model:\n  - " + "\n  - ".join(problems))

    eps = _first(cfg, "rms_norm_eps", "layer_norm_eps", "norm_epsilon", default=MEGATRON_NORM_EPS)
    if eps != MEGATRON_NORM_EPS:
        warnings.warn(
            f"rms_norm_eps {eps} ≠ megatron's layernorm_epsilon {MEGATRON_NORM_EPS} (our provider's value): the "
            "weights convert exactly, the forward differs slightly",
            ConversionWarning,
            stacklevel=2,
        )
    if theta != MEGATRON_ROPE_BASE:
        warnings.warn(
            f"rope base {theta:g}: the checkpoint records rotary_base {theta:g}, but `mtp-rl train` has no "
            f"--rotary-base flag (its runs use {MEGATRON_ROPE_BASE}) and will refuse to --load it",
            ConversionWarning,
            stacklevel=2,
        )
    topk = int(_first(cfg, "num_experts_per_tok", "moe_router_topk", default=2))
    if experts and topk > 1 and cfg.get("norm_topk_prob") is False:
        warnings.warn(
            "norm_topk_prob is false, but megatron's router normalises the top-k probabilities (softmax over the "
            "top-k logits)",
            ConversionWarning,
            stacklevel=2,
        )
    kv_heads = cfg.get("num_key_value_heads") or heads
    moe_ffn = _first(cfg, "moe_intermediate_size") if experts else None
    ffn = _first(cfg, "intermediate_size", default=moe_ffn)
    hf_vocab = cfg["vocab_size"]
    if mtp_num_layers is None:
        mtp_num_layers = int(_first(cfg, "num_nextn_predict_layers", "mtp_num_layers", default=0) or 0)
    return ModelArgs(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        ffn_hidden_size=ffn,
        vocab_size=vocab_size or hf_vocab,
        seq_length=int(cfg.get("max_position_embeddings") or 4096),
        mtp_num_layers=mtp_num_layers,
        num_experts=int(experts) or None,
        moe_router_topk=topk,
        moe_ffn_hidden_size=moe_ffn,
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        params_dtype=params_dtype,
    )


def detect_flavour(cfg: dict[str, Any], names: list[str] | None, model_args) -> str:
    """``mimo`` or ``deepseek_v3`` naming: from model_type, then the tensor names, then dense/MoE."""
    from megatron_mtp_rl.train.weight_sync import default_flavour

    mt = cfg.get("model_type", "")
    if mt == "mimo" or "MiMo" in "".join(cfg.get("architectures") or []):
        return "mimo"
    if mt.startswith("deepseek"):
        return "deepseek_v3"
    if names and any(".mtp_layers." in n for n in names):
        return "mimo"
    if names and any(n.endswith(".eh_proj.weight") for n in names):
        return "deepseek_v3"
    return default_flavour(model_args)


def _auto_dtype(tensors: dict[str, torch.Tensor]) -> str:
    kinds = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if kinds == {torch.bfloat16}:
        return "bf16"
    if kinds <= {torch.float32}:
        return "fp32"
    raise ConversionError(f"tensor dtypes {sorted(map(str, kinds))}: pass --dtype fp32 or --dtype bf16")


# ---------------------------------------------------------------------------------------------
# Process set-up and the model


def _init_single_process() -> None:
    """Our single-process gloo/NCCL group with TP=PP=EP=1 (kept if the caller made one)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_mtp_rl import platform

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        sizes = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if dist.get_world_size() != 1 or sizes != (1, 1, 1):
            raise ConversionError("the converter runs in one process with TP=PP=EP=1 (no torchrun)")
        return
    platform.initialize(seed=1234)


def _build(model_args, use_te: bool | None):
    from megatron_mtp_rl.models import build_model

    device = None if torch.cuda.is_available() else "cpu"
    return build_model(model_args, use_te=use_te, device=device)


def _load_full(gpt, tensors: dict[str, torch.Tensor], allow_missing_mtp: bool) -> list[str]:
    """Copy full megatron tensors into the model; every parameter must be covered."""
    own = gpt.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(n for n in set(own) - set(tensors) if not n.endswith("_extra_state"))
    kept = [n for n in missing if allow_missing_mtp and n.startswith("mtp.")]
    missing = [n for n in missing if n not in kept]
    if unexpected or missing:
        lines = ["the HF tensors do not cover our model exactly"]
        if missing:
            lines.append(f"  model tensors with no HF source ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  HF tensors our model has no place for ({len(unexpected)}): " + ", ".join(unexpected))
        raise ConversionError("\n".join(lines))
    with torch.no_grad():
        for name, t in tensors.items():
            if own[name].shape != t.shape:
                raise ConversionError(f"{name}: HF gives {tuple(t.shape)}, our model has {tuple(own[name].shape)}")
            own[name].copy_(t)
    return kept


# ---------------------------------------------------------------------------------------------
# The two directions


def hf_to_mcore(
    hf_dir: str | Path,
    save_dir: str | Path,
    *,
    flavour: str | None = None,
    dtype: str = "auto",
    vocab_size: int | None = None,
    make_vocab_size_divisible_by: int = 64,
    mtp_num_layers: int | None = None,
    allow_missing_mtp: bool = False,
    use_te: bool | None = None,
):
    """HF safetensors + config.json → ``SAVE/iter_0000000`` that ``mtp-rl train --load SAVE --finetune`` reads.

    Returns ``(checkpoint path, ModelArgs)``. ``allow_missing_mtp`` keeps megatron's initialisation
    for MTP layers the HF checkpoint does not have (a model released without MTP weights).
    """
    from megatron_mtp_rl.models.hf_mapping import hf_to_megatron
    from megatron_mtp_rl.models.provider import padded_vocab_size, transformer_engine_available
    from megatron_mtp_rl.train.checkpoint import save_checkpoint

    cfg = read_hf_config(hf_dir)
    tensors = load_hf_tensors(hf_dir)
    params_dtype = _auto_dtype(tensors) if dtype == "auto" else dtype
    margs = model_args_from_hf_config(
        cfg,
        params_dtype=params_dtype,
        vocab_size=vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        mtp_num_layers=mtp_num_layers,
    )
    flavour = flavour or detect_flavour(cfg, list(tensors), margs)
    if use_te is None:
        use_te = transformer_engine_available()
    _init_single_process()
    gpt = _build(margs, use_te)
    try:
        full = hf_to_megatron(
            tensors, gpt.config, flavour, padded_vocab_size=padded_vocab_size(margs, 1), fused_layernorm=use_te
        )
    except (KeyError, ValueError) as e:  # the mapping names every tensor it could not place
        raise ConversionError(f"{hf_dir}: {e.args[0] if e.args else e}") from None
    if margs.untie_embeddings_and_output_weights and "output_layer.weight" not in full:
        raise ConversionError("config says tie_word_embeddings=false but there is no lm_head.weight")
    kept = _load_full(gpt, full, allow_missing_mtp)
    if kept:
        warnings.warn(
            f"{len(kept)} MTP tensors keep megatron's initialisation (not in the HF checkpoint)",
            ConversionWarning,
            stacklevel=2,
        )
    state = {
        "step": 0,
        "cursor": 0,
        "model_args": asdict(margs),
        "mtp_regime": None,
        "converted_from": str(Path(hf_dir).resolve()),
        "hf_flavour": flavour,
    }
    path = save_checkpoint(str(save_dir), 0, gpt, None, state, keep_last=0)
    return path, margs


def mcore_to_hf(
    load_dir: str | Path,
    out_dir: str | Path,
    *,
    flavour: str | None = None,
    mtp_embed_head_copies: bool = False,
    dtype: str = "model",
    use_te: bool | None = None,
) -> Path:
    """Our dist checkpoint (latest iteration in ``load_dir``) → HF directory (model.safetensors + config.json).

    The tensors and config are weight sync's (``weight_sync.hf_tensors`` / ``hf_config``, i.e.
    ``export_hf`` plus two choices): ``mtp_embed_head_copies`` (DeepSeek-V3 naming) also writes the
    per-MTP-layer embedding and head copies DeepSeek's checkpoints carry, and ``dtype="model"``
    writes every tensor in the run's parameter dtype. That matters for bf16: megatron's local-spec
    norms stay fp32 in a bf16 model, and a bf16 HF checkpoint should come back as bf16 throughout.
    """
    from safetensors.torch import save_file

    from megatron_mtp_rl.models.presets import ModelArgs
    from megatron_mtp_rl.models.provider import transformer_engine_available
    from megatron_mtp_rl.train.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state
    from megatron_mtp_rl.train.weight_sync import check_payload, default_flavour, hf_config, hf_tensors

    path = latest_checkpoint(str(load_dir))
    if path is None:
        raise ConversionError(f"no checkpoint in {load_dir} (missing latest_checkpointed_iteration.txt)")
    saved = read_trainer_state(path)
    known = {f.name for f in fields(ModelArgs)}
    margs = ModelArgs(**{k: v for k, v in saved["model_args"].items() if k in known})
    flavour = flavour or saved.get("hf_flavour") or default_flavour(margs)
    if use_te is None:
        use_te = transformer_engine_available()
    _init_single_process()
    gpt = _build(margs, use_te)
    load_checkpoint(str(load_dir), gpt, None)
    tensors = hf_tensors(gpt, margs, flavour, with_copies=mtp_embed_head_copies)
    check_payload(tensors, margs, flavour)
    target = {"model": _TORCH_DTYPES[margs.params_dtype], "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    # clone: per-layer copies alias their source and safetensors refuses shared storage
    owned = {k: v.detach().to("cpu", target if v.is_floating_point() else v.dtype).clone() for k, v in tensors.items()}
    cfg = hf_config(margs, flavour)
    cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[target]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(owned, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def train_flags(model_args) -> list[str]:
    """``mtp-rl train`` flags whose model shape equals ``model_args`` (so ``--load`` accepts it).

    The vocabulary is the tokenizer's (``--tokenizer hf:PATH``); its size must equal
    ``model_args.vocab_size``. ``rotary_base`` has no flag: runs use 10000.
    """
    m = model_args
    flags = ["--preset", "tiny-moe" if m.is_moe else "tiny-dense"]
    flags += ["--num-layers", str(m.num_layers), "--hidden-size", str(m.hidden_size)]
    flags += ["--num-attention-heads", str(m.num_attention_heads)]
    if m.num_query_groups is not None:
        flags += ["--num-query-groups", str(m.num_query_groups)]
    flags += ["--ffn-hidden-size", str(m.ffn_hidden_size), "--mtp-num-layers", str(m.mtp_num_layers)]
    if m.is_moe:
        flags += ["--num-experts", str(m.num_experts), "--moe-router-topk", str(m.moe_router_topk)]
        flags += ["--moe-ffn-hidden-size", str(m.moe_ffn_hidden_size or m.ffn_hidden_size)]
        flags += ["--moe-aux-loss-coeff", repr(m.moe_aux_loss_coeff)]
    if m.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    flags += ["--make-vocab-size-divisible-by", str(m.make_vocab_size_divisible_by)]
    flags += ["--init-method-std", repr(m.init_method_std)]
    if m.params_dtype == "bf16":
        flags.append("--bf16")
    return flags


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors directory → megatron dist checkpoint")
    a.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    a.add_argument("--save", required=True, help="checkpoint root (iter_0000000 is written inside)")
    a.add_argument("--hf-flavour", choices=["deepseek_v3", "mimo"], help="HF naming (default: detected)")
    a.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="parameter dtype")
    a.add_argument("--vocab-size", type=int, help="the run's tokenizer size (default: config vocab_size)")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=64, help="as the train flag")
    a.add_argument("--mtp-num-layers", type=int, help="MTP depths (default: num_nextn_predict_layers)")
    a.add_argument(
        "--allow-missing-mtp", action="store_true", help="initialise MTP layers the checkpoint lacks (warns)"
    )
    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint → HF safetensors directory")
    b.add_argument("--load", required=True, help="checkpoint root (reads latest_checkpointed_iteration.txt)")
    b.add_argument("--out", required=True, help="output HF directory")
    b.add_argument("--hf-flavour", choices=["deepseek_v3", "mimo"], help="HF naming (default: as converted)")
    b.add_argument(
        "--dtype", choices=["model", "fp32", "bf16"], default="model", help="tensor dtype (model: the run's)"
    )
    b.add_argument(
        "--mtp-embed-head-copies",
        action="store_true",
        help="deepseek_v3: write per-MTP-layer embed_tokens/shared_head.head copies as DeepSeek's checkpoints do",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    warnings.filterwarnings("default", category=ConversionWarning)  # ours must show
    try:
        if args.direction == "hf-to-mcore":
            path, margs = hf_to_mcore(
                args.hf_dir,
                args.save,
                flavour=args.hf_flavour,
                dtype=args.dtype,
                vocab_size=args.vocab_size,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                mtp_num_layers=args.mtp_num_layers,
                allow_missing_mtp=args.allow_missing_mtp,
            )
            print(f"wrote {path}")
            print(f"train from it with: mtp-rl train --load {args.save} --finetune " + " ".join(train_flags(margs)))
            print(f"  (tokenizer vocabulary must have {margs.vocab_size} entries)")
        else:
            out = mcore_to_hf(
                args.load,
                args.out,
                flavour=args.hf_flavour,
                mtp_embed_head_copies=args.mtp_embed_head_copies,
                dtype=args.dtype,
            )
            print(f"wrote {out}")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        platform.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
