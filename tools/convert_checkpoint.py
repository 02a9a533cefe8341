"""Convert between a Hugging Face safetensors directory and our megatron-core dist checkpoint, and verify.

Both directions go through the HF model families (``megatron_mtp_rl/hf/families``: MiMo, Qwen3,
Qwen3-MoE, GLM-4.5, DeepSeek-V3) and the one Megatron↔HF tensor mapping, the same code weight sync
uses::

    # HF → Megatron: SAVE/iter_0000000/ + trainer_state.pt (model_args) + latest_checkpointed_iteration.txt
    python tools/convert_checkpoint.py hf-to-mcore --hf-dir HF_DIR --save ckpt/mcore
    # transformers vs our model on the same random tokens; last line max_abs_diff=<main head>, exit 1 above --tol
    python tools/convert_checkpoint.py verify --hf-dir HF_DIR --load ckpt/mcore --tol 1e-4
    # then: mtp-rl train --load ckpt/mcore --finetune ...   (no shape flags: the checkpoint has them)

    # Megatron → HF, in the form SGLang loads (depth 1: its MTP drafts take one layer)
    python tools/convert_checkpoint.py mcore-to-hf --load ckpt/mcore --out HF_OUT [--all-mtp-layers]

The family comes from ``architectures`` / ``model_type``. A config key that changes the computation
and has no megatron-core mapping (``rope_scaling``, sliding windows, ``scoring_func``, ``topk_method``,
``norm_topk_prob`` with sigmoid routing, ...) is refused with one line naming the key and its value,
never converted into a different model. Both directions stream (``hf/load.py + hf/export.py``): in one
process the model is built once and filled tensor by tensor (no second copy of the weights); under
``torchrun`` with ``--tensor/--pipeline/--expert-model-parallel-size`` each rank holds, reads and writes
only its shard::

    torchrun --nproc-per-node 8 tools/convert_checkpoint.py hf-to-mcore --hf-dir GLM-4.5 --save ckpt \
        --expert-model-parallel-size 8
    torchrun --nproc-per-node 8 tools/convert_checkpoint.py mcore-to-hf --load ckpt --out hf_out \
        --expert-model-parallel-size 8 --max-shard-size 5GB

``--dtype auto`` takes the dominant floating dtype (mixed releases keep the router's fp32 bias as megatron
does); block-quantised fp8 releases (DeepSeek-V3) are dequantised to bf16 on load. DeepSeek-V3's MLA needs
Transformer Engine.

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
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
    """The checkpoint cannot be represented by our model provider; the message says why."""


class ConversionWarning(UserWarning):
    """Exact weights, but something the user must know (numerics differ, a flag is missing)."""


# ---------------------------------------------------------------------------------------------
# HF side: config and tensors


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """config.json of an HF directory (``hf.directory.read_hf_config``), as a ConversionError when bad."""
    from megatron_mtp_rl.errors import ConfigError
    from megatron_mtp_rl.hf.directory import read_hf_config as read

    try:
        return read(hf_dir)
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def load_hf_tensors(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory (sharded or not; fp8 blocks dequantised) — for ``verify`` on small models.

    The conversions themselves never do this: they stream (``hf/load.py + hf/export.py``).
    """
    from megatron_mtp_rl.errors import ConfigError
    from megatron_mtp_rl.hf.reader import HFCheckpoint

    try:
        ckpt = HFCheckpoint(hf_dir)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return {name: ckpt.read(name) for name in ckpt.names()}


def model_args_from_hf_config(
    cfg: dict[str, Any],
    *,
    params_dtype: str = "fp32",
    vocab_size: int | None = None,
    make_vocab_size_divisible_by: int = 64,
    mtp_num_layers: int | None = None,
    family: str | None = None,
):
    """Our ModelArgs for an HF config, through its family (``hf/families``).

    Raises :class:`ConversionError` — one line naming every computation-changing key that is not
    mapped (``partial_rotary_factor``, ``routed_scaling_factor``, ``scoring_func``, ``rope_scaling`` ...).
    """
    from megatron_mtp_rl.hf.families import UnsupportedCheckpoint, detect, get_family

    try:
        fam = get_family(family) if family else detect(cfg)
        return fam.model_args(
            cfg,
            params_dtype=params_dtype,
            vocab_size=vocab_size,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            mtp_num_layers=mtp_num_layers,
        )
    except UnsupportedCheckpoint as e:
        raise ConversionError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Process set-up and the model


def _init_processes(parallel: tuple[int, int, int] = (1, 1, 1)) -> None:
    """torch.distributed + parallel_state: one process, or ``torchrun``'s ranks with (TP, PP, EP) = ``parallel``.

    Kept as is when the caller already made a matching group (in-process use by tests and tools).
    """
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_mtp_rl import platform

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        sizes = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if sizes != tuple(parallel):
            raise ConversionError(f"this process group has (TP, PP, EP) = {sizes}, the conversion asks for {parallel}")
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp, ep = parallel
    if world % (tp * pp) or (world // pp) % ep:
        raise ConversionError(
            f"{world} process(es) do not fit --tensor-model-parallel-size {tp} × --pipeline-model-parallel-size {pp} "
            f"with --expert-model-parallel-size {ep} (launch with torchrun --nproc-per-node N)"
        )
    platform.initialize(
        platform.ParallelSizes(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
        ),
        seed=1234,
    )


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _build(model_args, use_te: bool | None, initialise: bool = True, device: str | None = None):
    from megatron_mtp_rl.models import build_model
    from megatron_mtp_rl.models.provider import RuntimeOptions

    if device is None:
        device = None if torch.cuda.is_available() else "cpu"
    runtime = RuntimeOptions(perform_initialization=initialise)
    try:
        return build_model(model_args, use_te=use_te, device=device, runtime=runtime)
    except ValueError as e:  # e.g. MLA without Transformer Engine: one line, no megatron traceback
        raise ConversionError(str(e)) from None


def _saved_model(load_dir: str | Path):
    """(checkpoint path, ModelArgs, trainer state) of the latest iteration in our checkpoint root."""
    from megatron_mtp_rl.models.presets import ModelArgs
    from megatron_mtp_rl.train.checkpoint import latest_checkpoint, read_trainer_state

    path = latest_checkpoint(str(load_dir))
    if path is None:
        raise ConversionError(f"no checkpoint in {load_dir} (missing latest_checkpointed_iteration.txt)")
    saved = read_trainer_state(path)
    known = {f.name for f in fields(ModelArgs)}
    return path, ModelArgs(**{k: v for k, v in saved["model_args"].items() if k in known}), saved


def _load_model(load_dir: str | Path, use_te: bool | None = None, parallel: tuple[int, int, int] = (1, 1, 1)):
    """(gpt, ModelArgs, trainer state) from our checkpoint root: this rank's shard at (TP, PP, EP) = ``parallel``."""
    from megatron_mtp_rl.models.provider import transformer_engine_available
    from megatron_mtp_rl.train.checkpoint import load_checkpoint

    _, margs, saved = _saved_model(load_dir)
    if use_te is None:
        use_te = transformer_engine_available()
    _init_processes(parallel)
    gpt = _build(margs, use_te, initialise=False)  # every tensor comes from the checkpoint
    load_checkpoint(str(load_dir), gpt, None)
    return gpt, margs, saved


def _meta_model(load_dir: str | Path, use_te: bool | None, parallel: tuple[int, int, int]):
    """(gpt on the meta device, ModelArgs, trainer state, verified checkpoint path): the model's shape
    only, its tensors read later a group at a time (``train/checkpoint_stream.py``)."""
    from megatron_mtp_rl.models.provider import transformer_engine_available
    from megatron_mtp_rl.train.checkpoint import verify_checkpoint

    path, margs, saved = _saved_model(load_dir)
    verify_checkpoint(path)
    if use_te is None:
        use_te = transformer_engine_available()
    _init_processes(parallel)
    with torch.device("meta"):
        gpt = _build(margs, use_te, initialise=False, device="meta")
    return gpt, margs, saved, path


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
    parallel: tuple[int, int, int] = (1, 1, 1),
):
    """HF safetensors + config.json → ``SAVE/iter_0000000`` that ``mtp-rl train --load SAVE`` reads.

    Streams: each rank builds its (TP, PP, EP) = ``parallel`` shard of the model and reads only
    the slices of the HF tensors that shard owns (``hf/load.load_hf``); the dist
    checkpoint is written collectively. The family comes from the config (``flavour`` overrides
    it); ``dtype="auto"`` takes the dominant floating dtype (fp8 → bf16; the router's fp32 expert
    bias stays fp32 as megatron keeps it). Returns ``(checkpoint path, ModelArgs)``.
    ``allow_missing_mtp`` keeps megatron's initialisation for MTP layers the HF checkpoint lacks.
    """
    from megatron_mtp_rl.errors import ConfigError
    from megatron_mtp_rl.hf.families import UnsupportedCheckpoint, detect, get_family
    from megatron_mtp_rl.hf.load import load_hf
    from megatron_mtp_rl.hf.reader import HFCheckpoint, dominant_dtype
    from megatron_mtp_rl.models.provider import transformer_engine_available
    from megatron_mtp_rl.train.checkpoint import save_checkpoint

    try:
        ckpt = HFCheckpoint(hf_dir)
        fam = get_family(flavour) if flavour else detect(ckpt.config)
        params_dtype = dominant_dtype(ckpt) if dtype == "auto" else dtype
    except (ConfigError, UnsupportedCheckpoint) as e:
        raise ConversionError(str(e)) from None
    margs = model_args_from_hf_config(
        ckpt.config,
        params_dtype=params_dtype,
        vocab_size=vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        mtp_num_layers=mtp_num_layers,
        family=fam.name,
    )
    if use_te is None:
        use_te = transformer_engine_available()
    _init_processes(parallel)
    gpt = _build(margs, use_te, initialise=allow_missing_mtp)  # every tensor is loaded: allocate only
    try:
        report = load_hf(gpt, hf_dir, family=fam, allow_missing_mtp=allow_missing_mtp, ckpt=ckpt)
    except ConfigError as e:  # names every tensor it could not place
        raise ConversionError(str(e)) from None
    if report.kept_init and _is_rank0():
        warnings.warn(
            f"{len(report.kept_init)} MTP tensors keep megatron's initialisation (not in the HF checkpoint)",
            ConversionWarning,
            stacklevel=2,
        )
    state = {
        "step": 0,
        "cursor": 0,
        "model_args": asdict(margs),
        "mtp_regime": None,
        "converted_from": str(Path(hf_dir).resolve()),
        "hf_flavour": fam.name,
    }
    path = save_checkpoint(str(save_dir), 0, gpt, None, state, keep_last=0)
    # the HF tokenizer travels with the weights: `mtp-rl train --load SAVE` uses SAVE/tokenizer
    if _is_rank0():
        from megatron_mtp_rl.rollout.tokenizer import CHECKPOINT_TOKENIZER_DIR, copy_tokenizer_files

        copy_tokenizer_files(hf_dir, Path(save_dir) / CHECKPOINT_TOKENIZER_DIR)
    return path, margs


def mcore_to_hf(
    load_dir: str | Path,
    out_dir: str | Path,
    *,
    flavour: str | None = None,
    mtp_embed_head_copies: bool = False,
    dtype: str = "model",
    use_te: bool | None = None,
    all_mtp_layers: bool = False,
    max_shard_size: str | int = "5GB",
    parallel: tuple[int, int, int] = (1, 1, 1),
) -> Path:
    """Our dist checkpoint (latest iteration in ``load_dir``) → an HF directory SGLang loads.

    Streams: each rank builds its (TP, PP, EP) = ``parallel`` shard of the model on the meta device
    and reads its tensors from the checkpoint a quarter shard at a time; every parameter is gathered
    over its own TP / EP group one at a time, named as the family names it and written into HF
    shards of at most ``max_shard_size`` (``model-0000k-of-0000n.safetensors`` + the index; one
    shard is ``model.safetensors``) by each pipeline stage's first rank. SGLang's drafts take one
    MTP layer, so the export carries depth 1 unless ``all_mtp_layers``. ``mtp_embed_head_copies``
    (DeepSeek-V3) writes the per-MTP-layer embedding/head copies; ``dtype="model"`` writes every
    tensor in the run's parameter dtype (megatron's local-spec norms stay fp32 in a bf16 model).
    """
    import torch.distributed as dist

    from megatron_mtp_rl.cluster.weight_sync import export_note, write_hf_metadata
    from megatron_mtp_rl.hf.families import UnsupportedCheckpoint, family_for
    from megatron_mtp_rl.hf.mapping import named_tensors
    from megatron_mtp_rl.hf.shards import parse_size, write_hf_shards
    from megatron_mtp_rl.train.checkpoint_stream import stream_checkpoint

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise ConversionError(f"--max-shard-size: {e}") from None
    gpt, margs, saved, path = _meta_model(load_dir, use_te, parallel)
    try:
        fam = family_for(margs, flavour or saved.get("hf_flavour"))
    except UnsupportedCheckpoint as e:
        raise ConversionError(str(e)) from None
    depth = fam.export_depth(margs, all_mtp_layers)
    target = {"model": _TORCH_DTYPES[margs.params_dtype], "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    out = Path(out_dir)
    # the checkpoint is read a quarter shard at a time as the shards fill: the peak stays under two
    # shards plus the largest tensor (the shard being filled, the group being read), whatever the model's size
    tensors = stream_checkpoint(gpt, path, named_tensors(gpt), group_bytes=max(shard_bytes // 4, 1))
    shards = write_hf_shards(
        gpt, margs, fam.name, out, max_shard_bytes=shard_bytes, depth=depth,
        with_copies=mtp_embed_head_copies, dtype=target, tensors=tensors,
    )  # fmt: skip
    if _is_rank0():
        write_hf_metadata(
            out, shards, margs, fam.name, depth, {torch.float32: "float32", torch.bfloat16: "bfloat16"}[target]
        )
        print(f"export: {export_note(margs, fam.name, depth)}; {len(shards)} shard(s)", file=sys.stderr)
    if dist.is_initialized():
        dist.barrier()
    return out


# ---------------------------------------------------------------------------------------------
# verify: the converted model against transformers on the same tokens


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _hf_class_config(cfg: dict[str, Any], fam):
    """(transformers CausalLM class, config) for the family's trunk; MiMo's trunk is Qwen2."""
    import transformers

    names = {
        "mimo": ("Qwen2ForCausalLM", "Qwen2Config"),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
        "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig"),
        "glm4_moe": ("Glm4MoeForCausalLM", "Glm4MoeConfig"),
        "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config"),
    }
    model_cls, cfg_cls = (getattr(transformers, n) for n in names[fam.name])
    clean = {k: v for k, v in cfg.items() if k not in ("auto_map", "model_type", "architectures")}
    return model_cls, cfg_cls(**clean)


def _mtp_module_names(fam, cfg: dict[str, Any], k: int) -> dict[str, str]:
    """The HF names of MTP layer ``k``'s own modules and its decoder-layer prefix."""
    style, layers = fam.flavour.mtp_style, cfg["num_hidden_layers"]
    if style == "mimo":
        p = f"model.mtp_layers.{k}."
        return dict(enorm=p + "token_layernorm", hnorm=p + "hidden_layernorm", proj=p + "input_proj",
                    norm=p + "final_layernorm", layer=p, order="he")  # fmt: skip
    if style == "qwen3":
        return dict(enorm="mtp.pre_fc_norm_embedding", hnorm="mtp.pre_fc_norm_hidden", proj="mtp.fc",
                    norm="mtp.norm", layer=f"mtp.layers.{k}.", order="eh")  # fmt: skip
    p = f"model.layers.{layers + k}."
    return dict(enorm=p + "enorm", hnorm=p + "hnorm", proj=p + "eh_proj", norm=p + "shared_head.norm", layer=p,
                order="eh")  # fmt: skip


_MTP_ONLY = ("token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm", "enorm", "hnorm", "eh_proj",
             "shared_head", "embed_tokens")  # fmt: skip


@torch.no_grad()
def hf_reference_logprobs(hf_dir: str | Path, tokens: torch.Tensor, depths: int) -> tuple[torch.Tensor, list]:
    """transformers' log-probs of ``tokens[:, 1:]`` (main head) and of each MTP depth.

    The MTP reference is written from the HF weights the way SGLang's draft computes it (MiMo's
    included: its token embedding is 0 at position 0, as ``MiMoMTP`` drafts): a one-layer model of the
    family's own decoder class runs ``proj(cat(norm(emb(x_{i+k})), norm(h_i)))`` (MiMo: hidden first),
    then the MTP final norm and the shared head. Depth k's hidden input is depth k-1's normalised
    output, as in megatron and SGLang. Returns ``(main [B, T-1], [depth k: [B, T-1-k] scoring tokens[:, 1+k:]])``.
    """
    import tempfile

    from safetensors.torch import save_file

    from megatron_mtp_rl.hf.families import detect

    cfg = read_hf_config(hf_dir)
    fam = detect(cfg)
    tensors = load_hf_tensors(hf_dir)
    model_cls, hf_cfg = _hf_class_config(cfg, fam)
    with tempfile.TemporaryDirectory() as tmp:
        trunk = {n: t for n, t in tensors.items() if not n.startswith(("model.mtp_layers.", "mtp."))}
        trunk = {n: t for n, t in trunk.items() if not _is_deepseek_mtp(n, cfg)}
        save_file({n: t.contiguous() for n, t in trunk.items()}, f"{tmp}/model.safetensors")
        hf_cfg.save_pretrained(tmp)
        ref = model_cls.from_pretrained(tmp, dtype=torch.float32).eval()
    hidden = ref.model(input_ids=tokens).last_hidden_state  # after the final norm: what megatron and SGLang
    logits = ref.lm_head(hidden)  # hand the MTP layer
    main = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    embed = tensors["model.embed_tokens.weight"].float()
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).float()
    mtps = []
    for k in range(depths):
        names = _mtp_module_names(fam, cfg, k)
        one = _one_layer_model(model_cls, cfg, tensors, names["layer"], eps)
        shifted = torch.roll(tokens, -(k + 1), dims=1)  # position i sees token i+1+k (last ones unused)
        emb = fam.draft_token_embedding(torch.nn.functional.embedding(shifted, embed))  # MiMo: 0 at position 0
        e = _rms(emb, tensors[names["enorm"] + ".weight"].float(), eps)
        h = _rms(hidden, tensors[names["hnorm"] + ".weight"].float(), eps)
        x = (
            torch.cat((h, e) if names["order"] == "he" else (e, h), dim=-1)
            @ tensors[names["proj"] + ".weight"].float().t()
        )
        y = one.model(inputs_embeds=x).last_hidden_state
        hidden = _rms(y, tensors[names["norm"] + ".weight"].float(), eps)
        logits = hidden @ head.t()
        n = tokens.shape[1] - 1 - (k + 1)
        lp = torch.log_softmax(logits.float(), -1)[:, :n].gather(-1, tokens[:, 2 + k :, None])[..., 0]
        mtps.append(lp)
    return main, mtps


def _is_deepseek_mtp(name: str, cfg: dict[str, Any]) -> bool:
    import re

    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= cfg["num_hidden_layers"]


def _one_layer_model(model_cls, cfg: dict[str, Any], tensors: dict, layer_prefix: str, eps: float):
    """The family's CausalLM with one layer holding the MTP layer's weights (MoE like the last trunk layer)."""
    import tempfile

    from safetensors.torch import save_file

    from megatron_mtp_rl.hf.families import detect

    one_cfg = dict(cfg, num_hidden_layers=1, num_nextn_predict_layers=0)
    one_cfg.update(first_k_dense_replace=0, mlp_only_layers=[], layer_types=None)
    one_cfg = {k: v for k, v in one_cfg.items() if v is not None}
    _, hf_cfg = _hf_class_config(one_cfg, detect(cfg))
    h = cfg["hidden_size"]
    own = {"model.embed_tokens.weight": tensors["model.embed_tokens.weight"], "model.norm.weight": torch.ones(h)}
    if not cfg.get("tie_word_embeddings", False):
        own["lm_head.weight"] = tensors["lm_head.weight"]
    for n, t in tensors.items():
        if n.startswith(layer_prefix):
            rest = n[len(layer_prefix) :]
            if not rest.startswith(_MTP_ONLY):
                own["model.layers.0." + rest] = t
    with tempfile.TemporaryDirectory() as tmp:
        save_file({n: t.contiguous() for n, t in own.items()}, f"{tmp}/model.safetensors")
        hf_cfg.save_pretrained(tmp)
        model = model_cls.from_pretrained(tmp, dtype=torch.float32).eval()
    model.model.norm = _Identity()  # the MTP layer's own final norm is applied by the caller
    return model


class _Identity(torch.nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


@torch.no_grad()
def our_logprobs(gpt, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Our model's log-probs in the same frames as :func:`hf_reference_logprobs`."""
    from megatron_mtp_rl.models import forward_logprobs, pack_sequences

    gpt.eval()
    b, t = tokens.shape
    ids = tokens.tolist()
    batch, _ = pack_sequences([(row[:1], row[1:]) for row in ids], seq_length=t, rows=b)
    out = forward_logprobs(gpt, batch, with_mtp=True)
    main = out.logprobs[:, : t - 1]
    mtps = []
    for k in range(out.num_depths):  # depth k+1 scores labels[i] at position i-(k+1)
        d = k + 1
        mtps.append(out.mtp_logprobs[k][:, d : t - 1])
    return main, mtps


def verify(hf_dir: str | Path, load_dir: str | Path, *, tol: float = 1e-4, seq_len: int = 32, batch: int = 2,
           seed: int = 0) -> tuple[float, list[float]]:  # fmt: skip
    """Score one random token batch with transformers and with our converted model; return max |Δ| per head."""
    gpt, margs, _ = _load_model(load_dir)
    cfg = read_hf_config(hf_dir)
    vocab = min(int(cfg["vocab_size"]), margs.vocab_size)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=g)
    ours_main, ours_mtp = our_logprobs(gpt, tokens)
    depths = min(len(ours_mtp), _hf_mtp_depth(cfg, load_hf_tensors(hf_dir)))
    ref_main, ref_mtp = hf_reference_logprobs(hf_dir, tokens, depths)
    main = (ours_main.float() - ref_main).abs().max().item()
    mtp = [(ours_mtp[k].float() - ref_mtp[k]).abs().max().item() for k in range(depths)]
    return main, mtp


def _draft_reference_note(hf_dir: str | Path) -> str:
    """What the MTP reference computes: SGLang's draft for the family (MiMo's zeroes position 0's embedding)."""
    from megatron_mtp_rl.hf.families import detect

    fam = detect(read_hf_config(hf_dir))
    zeroed = getattr(fam, "draft_zeroes_first_embedding", False)
    draft = fam.draft_class or "no SGLang draft"
    return f"{draft}" + (" (token embedding 0 at position 0, as the trained heads)" if zeroed else "")


def _hf_mtp_depth(cfg: dict[str, Any], tensors: dict) -> int:
    from megatron_mtp_rl.hf.families import detect

    fam = detect(cfg)
    k = 0
    while _mtp_module_names(fam, cfg, k)["proj"] + ".weight" in tensors:
        k += 1
        if fam.flavour.mtp_style == "qwen3":
            break
    return k


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from megatron_mtp_rl.hf.families import FAMILIES

    families = sorted(FAMILIES)
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors directory → megatron dist checkpoint")
    a.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    a.add_argument("--save", required=True, help="checkpoint root (iter_0000000 is written inside)")
    a.add_argument("--hf-flavour", choices=families, help="HF family (default: from config.json)")
    a.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="parameter dtype")
    a.add_argument("--vocab-size", type=int, help="the run's tokenizer size (default: config vocab_size)")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=64, help="as the train flag")
    a.add_argument("--mtp-num-layers", type=int, help="MTP depths (default: num_nextn_predict_layers)")
    a.add_argument(
        "--allow-missing-mtp", action="store_true", help="initialise MTP layers the checkpoint lacks (warns)"
    )
    _parallel_flags(a)
    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint → HF safetensors directory SGLang loads")
    b.add_argument("--load", required=True, help="checkpoint root (reads latest_checkpointed_iteration.txt)")
    b.add_argument("--out", required=True, help="output HF directory")
    b.add_argument("--hf-flavour", choices=families, help="HF family (default: as converted / the model's)")
    b.add_argument(
        "--dtype", choices=["model", "fp32", "bf16"], default="model", help="tensor dtype (model: the run's)"
    )
    b.add_argument(
        "--mtp-embed-head-copies",
        action="store_true",
        help="deepseek_v3: write per-MTP-layer embed_tokens/shared_head.head copies as DeepSeek's checkpoints do",
    )
    b.add_argument(
        "--all-mtp-layers",
        action="store_true",
        help="write every MTP layer (default: the depth SGLang's draft takes, 1)",
    )
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (HF's spelling: 5GB, 500MB)")
    _parallel_flags(b)
    c = sub.add_parser("verify", help="score random tokens with transformers and with the converted model")
    c.add_argument("--hf-dir", required=True, help="the HF directory that was converted")
    c.add_argument("--load", required=True, help="our checkpoint root")
    c.add_argument("--tol", type=float, default=1e-4, help="exit 1 when the main head's max |Δ| exceeds it")
    c.add_argument("--seq-len", type=int, default=32)
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--seed", type=int, default=0)
    return p


def _parallel_flags(p: argparse.ArgumentParser) -> None:
    """Under ``torchrun`` each rank holds (and reads or writes) only its shard of the model."""
    for name in ("tensor", "pipeline", "expert"):
        p.add_argument(f"--{name}-model-parallel-size", type=int, default=1, metavar="N",
                       help=f"{name}-parallel ranks (launch with torchrun --nproc-per-node ...)")  # fmt: skip


def _parallel(args) -> tuple[int, int, int]:
    return (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.cli import quiet_known_noise
    from megatron_mtp_rl.errors import ConfigError

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
                parallel=_parallel(args),
            )
            if _is_rank0():
                print(f"wrote {path}")
                print(f"train from it with: mtp-rl train --load {args.save} --finetune (the model shape comes from it)")
                print(f"  (tokenizer vocabulary must have {margs.vocab_size} entries)")
        elif args.direction == "mcore-to-hf":
            out = mcore_to_hf(
                args.load,
                args.out,
                flavour=args.hf_flavour,
                mtp_embed_head_copies=args.mtp_embed_head_copies,
                dtype=args.dtype,
                all_mtp_layers=args.all_mtp_layers,
                max_shard_size=args.max_shard_size,
                parallel=_parallel(args),
            )
            if _is_rank0():
                print(f"wrote {out}")
        else:
            main_diff, mtp = verify(args.hf_dir, args.load, tol=args.tol, seq_len=args.seq_len, batch=args.batch,
                                    seed=args.seed)  # fmt: skip
            for k, d in enumerate(mtp, start=1):
                print(f"mtp_depth_{k}_max_abs_diff={d:.3e}")
            if mtp:
                print(f"mtp_reference={_draft_reference_note(args.hf_dir)}")
            print(f"main_max_abs_diff={main_diff:.3e} (tol {args.tol:g})")
            print(f"max_abs_diff={main_diff:.6e}")
            return 0 if main_diff <= args.tol else 1
    except (ConversionError, ConfigError) as e:
        if _is_rank0():
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        platform.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
