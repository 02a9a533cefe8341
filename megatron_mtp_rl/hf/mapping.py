"""One mapping between megatron-core GPTModel tensors and Hugging Face checkpoint tensors.

Weight sync to SGLang and checkpoint conversion both go through this module, so a layout
fix made here reaches both. Three steps:

1. :func:`gather_full_state` (collective) turns this rank's TP/EP shards into FULL tensors
   named as a TP=1/EP=1/PP=1 model names them, experts by their GLOBAL index, and joins
   the pipeline stages;
2. :func:`megatron_to_hf` renames and re-lays them out for an :class:`HFFlavour`;
3. :func:`hf_to_megatron` is its exact inverse (bit-exact round trip).

Layouts (megatron-core 0.19.2, rows = output features):

* ``linear_qkv``: per query group, that group's ``np/ng`` query heads, then its key head,
  then its value head (``[ng, (np/ng + 2) * hn, h]``); HF keeps ``q_proj``/``k_proj``/``v_proj``
  with query head ``j`` in group ``j // (np/ng)`` (``repeat_kv``), so the split needs no
  permutation of heads. RoPE is the rotate-half form on both sides (no permutation either).
* ``linear_fc1`` (SwiGLU): ``[gate; up]`` stacked along rows, ``silu(gate) * up``.
  Each TP rank holds ``[gate_r; up_r]`` (``partition_stride`` 2), which the gather undoes.
* MoE: ``mlp.router.weight`` ``[E, h]``; ``mlp.experts.local_experts.{i}`` on EP rank ``r`` is
  global expert ``r * E / ep + i``.
* MTP layer ``k``: ``eh_proj(cat(enorm(emb), hnorm(hidden)))`` → transformer layer
  (``mtp_model_layer``) → ``final_layernorm`` → the shared output layer.

HF names (where they come from, checked against the code, not copied from it):

* DeepSeek-V3 (``deepseek-ai/DeepSeek-V3`` README_WEIGHTS.md; SGLang 0.5.23
  ``srt/models/deepseek_nextn.py`` and ``deepseek_common/deepseek_weight_loader.py``;
  transformers 5.24.0 ``models/deepseek_v3``): MTP layer ``k`` is ``model.layers.{L + k}.`` with
  ``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, ``shared_head.head``
  plus a decoder layer's names; ``eh_proj`` consumes ``cat(enorm(emb), hnorm(hidden))`` as
  megatron does. The checkpoint stores copies of the embedding and output head per MTP layer.
* MiMo-7B (SGLang 0.5.23 ``srt/models/mimo_mtp.py``; XiaomiMiMo ``modeling_mimo.py``): MTP layer
  ``k`` is ``model.mtp_layers.{k}.`` with ``token_layernorm`` (= enorm), ``hidden_layernorm``
  (= hnorm), ``input_proj``, ``final_layernorm`` plus a Qwen2 decoder layer's names. ``input_proj``
  consumes ``cat(hidden_layernorm(hidden), token_layernorm(emb))``: the opposite order, so the two
  column halves of ``eh_proj`` are swapped.
* Both: ``model.embed_tokens``, ``model.layers.{i}.input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
  ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``; MoE ``mlp.gate.weight`` (router),
  ``mlp.gate.e_score_correction_bias``, ``mlp.experts.{e}.{gate,up,down}_proj``,
  ``mlp.shared_experts.*``; ``model.norm``; ``lm_head`` only when embeddings are untied.

* MLA (DeepSeek-V3): ``linear_q_down_proj``/``linear_q_up_proj``/``linear_kv_down_proj``/
  ``linear_kv_up_proj`` ↔ ``q_a_proj``/``q_b_proj``/``kv_a_proj_with_mqa``/``kv_b_proj``, the
  ``q_a``/``kv_a`` norms inside the up-projections (TE) or as ``q_layernorm``/``kv_layernorm`` (local).
* Qwen3-MoE MTP (SGLang 0.5.23 ``qwen3_moe_mtp.py``): ``mtp.fc`` (= ``eh_proj``, same column order),
  ``mtp.pre_fc_norm_embedding``/``mtp.pre_fc_norm_hidden``, ``mtp.layers.0.*``, ``mtp.norm``.

Not covered: the gated attention output, grouped-GEMM expert weights, learned absolute position embeddings, and
non-gated MLPs (no HF flavour here names them); each raises rather than guessing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.models.state import full_name

MtpStyle = Literal["deepseek_v3", "mimo", "qwen3"]
_MTP_STYLES = ("deepseek_v3", "mimo", "qwen3")


@dataclass(frozen=True)
class HFFlavour:
    """How one Hugging Face model family names our GPT + MTP tensors.

    ``mtp_style`` picks the MTP naming (``deepseek_v3``: ``model.layers.{L+k}.enorm`` ...;
    ``mimo``: ``model.mtp_layers.{k}.token_layernorm`` ...; ``qwen3``: ``mtp.fc``,
    ``mtp.pre_fc_norm_{embedding,hidden}``, ``mtp.layers.0.*``, ``mtp.norm`` — one MTP layer only).
    ``router``/``experts``/``shared_experts`` are the MoE module paths inside a layer. ``mtp_embed_head_copies`` makes
    DeepSeek-style output carry per-MTP-layer copies of the embedding and output head, as the
    published checkpoints do; SGLang ignores them, so weight sync can turn them off.
    """

    name: str
    mtp_style: MtpStyle
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    shared_experts: str = "mlp.shared_experts"
    mtp_embed_head_copies: bool = False

    def __post_init__(self) -> None:
        if self.mtp_style not in _MTP_STYLES:
            raise ValueError(f"unknown MTP naming style {self.mtp_style!r}; use one of {_MTP_STYLES}")
        if self.mtp_embed_head_copies and self.mtp_style != "deepseek_v3":
            raise ValueError("per-MTP-layer embedding/head copies exist only in the deepseek_v3 naming")


DEEPSEEK_V3 = HFFlavour("deepseek_v3", "deepseek_v3", mtp_embed_head_copies=True)
MIMO = HFFlavour("mimo", "mimo")
GLM4_MOE = HFFlavour("glm4_moe", "deepseek_v3")  # GLM-4.5: DeepSeek's MTP names at model.layers.{L}
QWEN3 = HFFlavour("qwen3", "qwen3")
QWEN3_MOE = HFFlavour("qwen3_moe", "qwen3")
FLAVOURS: dict[str, HFFlavour] = {f.name: f for f in (DEEPSEEK_V3, MIMO, GLM4_MOE, QWEN3, QWEN3_MOE)}


def get_flavour(name: str | HFFlavour) -> HFFlavour:
    """Resolve a flavour by name (CLI flags pass strings)."""
    if isinstance(name, HFFlavour):
        return name
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ValueError(f"unknown HF flavour {name!r}; choose one of {sorted(FLAVOURS)}") from None


class HFNameMismatch(ValueError):
    """Produced HF names differ from the expected ones; ``missing``/``unexpected`` list them."""

    def __init__(self, missing: list[str], unexpected: list[str], what: str = "HF tensor names") -> None:
        self.missing = missing
        self.unexpected = unexpected
        lines = [f"{what} do not match the expected names"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        super().__init__("\n".join(lines))


def check_hf_names(produced: Iterable[str], expected: Iterable[str], *, what: str = "HF tensor names") -> None:
    """Raise :class:`HFNameMismatch` naming every missing and unexpected key.

    Use before a sync or a save, so a layout mismatch fails with the key names rather than
    as a shape error deep inside the engine's loader.
    """
    produced_set, expected_set = set(produced), set(expected)
    missing = sorted(expected_set - produced_set)
    unexpected = sorted(produced_set - expected_set)
    if missing or unexpected:
        raise HFNameMismatch(missing, unexpected, what)


# --------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class _Shape:
    num_layers: int
    mtp_layers: int
    heads: int
    groups: int
    head_dim: int
    gated: bool
    moe: bool
    mla: bool
    moe_layers: tuple[bool, ...]  # per trunk layer; MTP layers follow the last one (megatron's MTP spec)


def _moe_layers(config: Any, num_layers: int, moe: bool) -> tuple[bool, ...]:
    if not moe:
        return (False,) * num_layers
    from megatron_mtp_rl.models.presets import parse_moe_layer_freq

    return tuple(bool(x) for x in parse_moe_layer_freq(getattr(config, "moe_layer_freq", 1), num_layers))


def _shape(config: Any) -> _Shape:
    """The numbers the layouts depend on, from a TransformerConfig (or ModelArgs)."""
    if getattr(config, "attention_output_gate", False):
        raise NotImplementedError("the gated attention output is not mapped")
    heads = config.num_attention_heads
    groups = getattr(config, "num_query_groups", None) or heads
    head_dim = getattr(config, "kv_channels", None) or config.hidden_size // heads
    gated = getattr(config, "gated_linear_unit", None)
    if gated is None:
        gated = getattr(config, "swiglu", True)
    experts = getattr(config, "num_moe_experts", None) or getattr(config, "num_experts", None)
    if heads % groups != 0:
        raise ValueError(f"num_query_groups {groups} does not divide num_attention_heads {heads}")
    return _Shape(
        num_layers=config.num_layers,
        mtp_layers=getattr(config, "mtp_num_layers", None) or 0,
        heads=heads,
        groups=groups,
        head_dim=head_dim,
        gated=bool(gated),
        moe=bool(experts),
        mla=bool(getattr(config, "multi_latent_attention", False)),
        moe_layers=_moe_layers(config, config.num_layers, bool(experts)),
    )


# --------------------------------------------------------------------------------------------
# Layout transforms (each op has an exact inverse)


def split_qkv(fused: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's group-interleaved ``linear_qkv`` weight/bias → HF ``q``, ``k``, ``v`` (GQA-aware)."""
    s = _shape(config)
    per_group = s.heads // s.groups
    rows = s.groups * (per_group + 2) * s.head_dim
    if fused.shape[0] != rows:
        raise ValueError(
            f"linear_qkv has {fused.shape[0]} rows, expected {rows} = {s.groups} groups × "
            f"({per_group} q + 1 k + 1 v heads) × {s.head_dim}"
        )
    rest = fused.shape[1:]
    x = fused.reshape(s.groups, (per_group + 2) * s.head_dim, *rest)
    q_rows = per_group * s.head_dim
    q = x[:, :q_rows].reshape(s.heads * s.head_dim, *rest)
    k = x[:, q_rows : q_rows + s.head_dim].reshape(s.groups * s.head_dim, *rest)
    v = x[:, q_rows + s.head_dim :].reshape(s.groups * s.head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Any, tp_size: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_qkv`; with ``tp_size`` > 1, of one TP rank's query groups only
    (``q``/``k``/``v`` are then the rows :func:`qkv_source_rows` names)."""
    s = _shape(config)
    heads, groups = s.heads // tp_size, s.groups // tp_size
    per_group = s.heads // s.groups
    rest = q.shape[1:]
    expect = (heads * s.head_dim, groups * s.head_dim, groups * s.head_dim)
    if (q.shape[0], k.shape[0], v.shape[0]) != expect or k.shape[1:] != rest or v.shape[1:] != rest:
        raise ValueError(
            f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fit "
            f"{heads} heads, {groups} query groups, head dim {s.head_dim}"
        )
    parts = (
        q.reshape(groups, per_group * s.head_dim, *rest),
        k.reshape(groups, s.head_dim, *rest),
        v.reshape(groups, s.head_dim, *rest),
    )
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def qkv_source_rows(config: Any, tp_rank: int, tp_size: int) -> tuple[tuple[int, int], ...]:
    """The HF ``q``, ``k``, ``v`` row ranges TP rank ``tp_rank`` of ``tp_size`` holds in its ``linear_qkv``.

    Megatron splits ``linear_qkv`` by whole query groups, so each rank's rows are one contiguous
    range of each of HF's three projections.
    """
    s = _shape(config)
    if s.groups % tp_size:
        raise ValueError(f"{s.groups} query groups do not split over tensor-parallel size {tp_size}")
    per_rank = s.groups // tp_size
    g0, g1 = tp_rank * per_rank, (tp_rank + 1) * per_rank
    per_group = s.heads // s.groups
    q = (g0 * per_group * s.head_dim, g1 * per_group * s.head_dim)
    kv = (g0 * s.head_dim, g1 * s.head_dim)
    return q, kv, kv


def _split_glu(t: torch.Tensor) -> list[torch.Tensor]:
    if t.shape[0] % 2:
        raise ValueError(f"a SwiGLU linear_fc1 needs an even number of rows, got {t.shape[0]}")
    gate, up = t.chunk(2, dim=0)
    return [gate.contiguous(), up.contiguous()]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """MiMo's input_proj takes [hidden, token] where megatron's eh_proj takes [token, hidden]."""
    if t.dim() != 2 or t.shape[1] % 2:
        raise ValueError(f"eh_proj/input_proj must be [h, 2h], got {tuple(t.shape)}")
    half = t.shape[1] // 2
    return torch.cat((t[:, half:], t[:, :half]), dim=1)


def _trim_vocab(t: torch.Tensor, hf_vocab_size: int | None) -> torch.Tensor:
    if hf_vocab_size is None or hf_vocab_size == t.shape[0]:
        return t
    if hf_vocab_size > t.shape[0]:
        raise ValueError(f"hf_vocab_size {hf_vocab_size} exceeds the model's {t.shape[0]} vocabulary rows")
    return t[:hf_vocab_size]


def _pad_vocab(t: torch.Tensor, padded_vocab_size: int | None) -> torch.Tensor:
    if padded_vocab_size is None or padded_vocab_size == t.shape[0]:
        return t
    if padded_vocab_size < t.shape[0]:
        raise ValueError(f"padded_vocab_size {padded_vocab_size} is below the checkpoint's {t.shape[0]} rows")
    pad = t.new_zeros((padded_vocab_size - t.shape[0], *t.shape[1:]))
    return torch.cat((t, pad), dim=0)


# --------------------------------------------------------------------------------------------
# Rules: one table read in both directions


@dataclass(frozen=True)
class _Rule:
    """Megatron name template ↔ HF name template(s), relative to a layer prefix.

    ``{p}`` is ``weight``/``bias``, ``{e}`` an expert index. ``op`` says how the tensors
    relate: ``copy``, ``qkv`` (3 parts), ``glu`` (gate, up), ``swap`` (eh_proj halves).
    """

    meg: str
    hf: tuple[str, ...]
    op: str = "copy"


def _template_regex(template: str) -> re.Pattern[str]:
    out = []
    for piece in re.split(r"(\{p\}|\{e\})", template):
        if piece == "{p}":
            out.append(r"(?P<p>weight|bias)")
        elif piece == "{e}":
            out.append(r"(?P<e>\d+)")
        else:
            out.append(re.escape(piece))
    return re.compile("".join(out))


def _mla_rules(fused_layernorm: bool) -> list[_Rule]:
    """DeepSeek MLA (megatron ``MLASelfAttention``); ``q_a``/``kv_a`` norms sit inside the up-projections
    under TE. Megatron's MLA RoPE de-interleaves q_pe/k_pe as HF's ``rope_interleave=True`` does, so the
    weights copy without a permutation."""
    q_norm = "self_attention.linear_q_up_proj.layer_norm_{p}" if fused_layernorm else "self_attention.q_layernorm.{p}"
    kv_norm = (
        "self_attention.linear_kv_up_proj.layer_norm_{p}" if fused_layernorm else "self_attention.kv_layernorm.{p}"
    )
    return [
        _Rule("self_attention.linear_q_proj.{p}", ("self_attn.q_proj.{p}",)),
        _Rule("self_attention.linear_q_down_proj.{p}", ("self_attn.q_a_proj.{p}",)),
        _Rule(q_norm, ("self_attn.q_a_layernorm.{p}",)),
        _Rule("self_attention.linear_q_up_proj.{p}", ("self_attn.q_b_proj.{p}",)),
        _Rule("self_attention.linear_kv_down_proj.{p}", ("self_attn.kv_a_proj_with_mqa.{p}",)),
        _Rule(kv_norm, ("self_attn.kv_a_layernorm.{p}",)),
        _Rule("self_attention.linear_kv_up_proj.{p}", ("self_attn.kv_b_proj.{p}",)),
    ]


@cache
def _layer_rules(flavour: HFFlavour, fused_layernorm: bool, moe: bool, mla: bool = False) -> tuple[_Rule, ...]:
    """Rules for one transformer layer. The TE spec fuses the norms into linear_qkv/linear_fc1.

    Forward (megatron → HF) accepts both spellings; the inverse emits the one ``fused_layernorm``
    asks for (MoE layers keep ``pre_mlp_layernorm`` even under TE; so does MLA's input norm).
    """
    r, x, sx = flavour.router, flavour.experts, flavour.shared_experts
    input_norm = _Rule("input_layernorm.{p}", ("input_layernorm.{p}",))
    input_norm_te = _Rule("self_attention.linear_qkv.layer_norm_{p}", ("input_layernorm.{p}",))
    post_norm = _Rule("pre_mlp_layernorm.{p}", ("post_attention_layernorm.{p}",))
    post_norm_te = _Rule("mlp.linear_fc1.layer_norm_{p}", ("post_attention_layernorm.{p}",))
    if mla:
        attention = _mla_rules(fused_layernorm)
    else:
        attention = [
            _Rule(
                "self_attention.linear_qkv.{p}",
                ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
                "qkv",
            ),
            _Rule("self_attention.q_layernorm.{p}", ("self_attn.q_norm.{p}",)),
            _Rule("self_attention.k_layernorm.{p}", ("self_attn.k_norm.{p}",)),
        ]
    rules = [
        *attention,
        _Rule("self_attention.linear_proj.{p}", ("self_attn.o_proj.{p}",)),
        _Rule("mlp.linear_fc1.{p}", ("mlp.gate_proj.{p}", "mlp.up_proj.{p}"), "glu"),
        _Rule("mlp.linear_fc2.{p}", ("mlp.down_proj.{p}",)),
        _Rule("mlp.router.weight", (f"{r}.weight",)),
        _Rule("mlp.router.expert_bias", (f"{r}.e_score_correction_bias",)),
        _Rule(
            "mlp.experts.local_experts.{e}.linear_fc1.{p}",
            (f"{x}.{{e}}.gate_proj.{{p}}", f"{x}.{{e}}.up_proj.{{p}}"),
            "glu",
        ),
        _Rule("mlp.experts.local_experts.{e}.linear_fc2.{p}", (f"{x}.{{e}}.down_proj.{{p}}",)),
        _Rule("mlp.shared_experts.linear_fc1.{p}", (f"{sx}.gate_proj.{{p}}", f"{sx}.up_proj.{{p}}"), "glu"),
        _Rule("mlp.shared_experts.linear_fc2.{p}", (f"{sx}.down_proj.{{p}}",)),
    ]
    rules.append(input_norm_te if fused_layernorm and not mla else input_norm)
    rules.append(post_norm_te if fused_layernorm and not moe else post_norm)
    return tuple(rules)


@cache
def _all_layer_rules(flavour: HFFlavour, mla: bool = False) -> tuple[_Rule, ...]:
    """Forward direction: every spelling megatron may use."""
    seen: dict[str, _Rule] = {}
    for fused in (False, True):
        for moe in (False, True):
            for rule in _layer_rules(flavour, fused, moe, mla):
                seen.setdefault(rule.meg, rule)
    return tuple(seen.values())


def _mtp_rules(flavour: HFFlavour) -> tuple[_Rule, ...]:
    """MTP-only modules, relative to ``mtp.layers.{k}.`` / the flavour's MTP layer prefix."""
    if flavour.mtp_style == "deepseek_v3":
        return (
            _Rule("enorm.{p}", ("enorm.{p}",)),
            _Rule("hnorm.{p}", ("hnorm.{p}",)),
            _Rule("eh_proj.weight", ("eh_proj.weight",)),
            _Rule("final_layernorm.{p}", ("shared_head.norm.{p}",)),
        )
    if flavour.mtp_style == "qwen3":  # relative to "mtp."; the layer itself is mtp.layers.0.
        return (
            _Rule("enorm.{p}", ("pre_fc_norm_embedding.{p}",)),
            _Rule("hnorm.{p}", ("pre_fc_norm_hidden.{p}",)),
            _Rule("eh_proj.weight", ("fc.weight",)),
            _Rule("final_layernorm.{p}", ("norm.{p}",)),
        )
    return (
        _Rule("enorm.{p}", ("token_layernorm.{p}",)),
        _Rule("hnorm.{p}", ("hidden_layernorm.{p}",)),
        _Rule("eh_proj.weight", ("input_proj.weight",), "swap"),
        _Rule("final_layernorm.{p}", ("final_layernorm.{p}",)),
    )


_COMPILED: dict[str, re.Pattern[str]] = {}


def _match(template: str, text: str) -> dict[str, str] | None:
    pattern = _COMPILED.get(template)
    if pattern is None:
        pattern = _COMPILED[template] = _template_regex(template)
    m = pattern.fullmatch(text)
    return m.groupdict() if m else None


def _forward(rule: _Rule, t: torch.Tensor, config: Any) -> list[torch.Tensor]:
    if rule.op == "copy":
        return [t]
    if rule.op == "qkv":
        return list(split_qkv(t, config))
    if rule.op == "glu":
        if not _shape(config).gated:
            raise NotImplementedError("only SwiGLU (gated) MLPs have an HF gate_proj/up_proj layout")
        return _split_glu(t)
    if rule.op == "swap":
        return [_swap_halves(t)]
    raise AssertionError(rule.op)


def _inverse(rule: _Rule, parts: list[torch.Tensor], config: Any) -> torch.Tensor:
    if rule.op == "copy":
        return parts[0]
    if rule.op == "qkv":
        return fuse_qkv(*parts, config)
    if rule.op == "glu":
        if parts[0].shape != parts[1].shape:
            raise ValueError(f"gate_proj {tuple(parts[0].shape)} and up_proj {tuple(parts[1].shape)} differ")
        return torch.cat(parts, dim=0)
    if rule.op == "swap":
        return _swap_halves(parts[0])
    raise AssertionError(rule.op)


# --------------------------------------------------------------------------------------------
# megatron → HF

_DECODER_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_MTP_LAYER = re.compile(r"mtp\.layers\.(\d+)\.(.+)")


def _mtp_prefix(flavour: HFFlavour, s: _Shape, k: int, *, layer: bool = False) -> str:
    """HF prefix of MTP layer ``k``'s own modules (``layer``: of its transformer layer)."""
    if flavour.mtp_style == "deepseek_v3":
        return f"model.layers.{s.num_layers + k}."
    if flavour.mtp_style == "qwen3":
        if k > 0:
            raise ValueError(
                f"the {flavour.name} MTP naming (mtp.fc, mtp.layers.0 ...) holds one MTP layer; export depth 1"
            )
        return "mtp.layers.0." if layer else "mtp."
    return f"model.mtp_layers.{k}."


def _find_rule(rules: Iterable[_Rule], rest: str) -> tuple[_Rule, dict[str, str]] | None:
    for rule in rules:
        groups = _match(rule.meg, rest)
        if groups is not None:
            return rule, groups
    return None


def _locate(name: str, s: _Shape, flavour: HFFlavour) -> tuple[_Rule, dict[str, str], str] | None:
    """The rule, its matched fields and the HF prefix for a decoder or MTP layer tensor."""
    m = _DECODER_LAYER.fullmatch(name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i >= s.num_layers:
            raise KeyError(f"{name}: layer {i} is beyond num_layers {s.num_layers}")
        found = _find_rule(_all_layer_rules(flavour, s.mla), rest)
        return (*found, f"model.layers.{i}.") if found else None
    m = _MTP_LAYER.fullmatch(name)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        if k >= s.mtp_layers:
            raise KeyError(f"{name}: MTP layer {k} is beyond mtp_num_layers {s.mtp_layers}")
        found = _find_rule(_mtp_rules(flavour), rest)
        if found:
            return (*found, _mtp_prefix(flavour, s, k))
        if rest.startswith("mtp_model_layer."):
            found = _find_rule(_all_layer_rules(flavour, s.mla), rest.removeprefix("mtp_model_layer."))
            if found:
                return (*found, _mtp_prefix(flavour, s, k, layer=True))
    return None


def hf_sources(name: str, config: Any, flavour: HFFlavour | str, *, tied: bool) -> tuple[str, tuple[str, ...]]:
    """How ONE full megatron tensor is built from HF tensors: ``(op, hf_names)``, reading nothing.

    ``op`` is ``copy``, ``qkv`` (q, k, v), ``glu`` (gate, up), ``swap`` (eh_proj halves) or ``vocab``
    (rows padded to megatron's vocabulary); :func:`build_from_parts` applies it. Streamed loading
    uses this to read only the HF tensors (and slices) one parameter needs.
    """
    flavour = get_flavour(flavour)
    s = _shape(config)
    if name == "embedding.word_embeddings.weight":
        return "vocab", ("model.embed_tokens.weight",)
    if name == "output_layer.weight":
        return "vocab", ("model.embed_tokens.weight" if tied else "lm_head.weight",)
    m = re.fullmatch(r"decoder\.final_layernorm\.(weight|bias)", name)
    if m:
        return "copy", (f"model.norm.{m.group(1)}",)
    found = _locate(name, s, flavour)
    if found is None:
        raise KeyError(f"no HF mapping for megatron tensor {name!r} (flavour {flavour.name})")
    rule, groups, prefix = found
    return rule.op, tuple(prefix + tpl.format(**groups) for tpl in rule.hf)


def build_from_parts(op: str, parts: list[torch.Tensor], config: Any, tp_size: int = 1) -> torch.Tensor:
    """Inverse of the layout transform ``op`` on HF tensors (or on one TP rank's rows of them)."""
    if op == "vocab":
        return parts[0]
    if op == "qkv":
        return fuse_qkv(*parts, config, tp_size)
    return _inverse(_Rule("", ("",) * len(parts), op), parts, config)


def megatron_tensor_to_hf(
    name: str,
    tensor: torch.Tensor,
    config: Any,
    flavour: HFFlavour | str,
    *,
    tied: bool,
    hf_vocab_size: int | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Convert ONE full megatron tensor; weight sync streams through this one at a time.

    ``name`` is a TP=1/EP=1/PP=1 name with the GLOBAL expert index (what
    :func:`gather_full_state` yields). Returns ``[]`` for ``output_layer.weight`` when
    ``tied`` (HF ties ``lm_head`` to ``embed_tokens``). Per-MTP-layer copies alias the source
    tensor: clone before saving with safetensors, which refuses shared storage.
    """
    flavour = get_flavour(flavour)
    s = _shape(config)
    copies = flavour.mtp_embed_head_copies
    if name == "embedding.word_embeddings.weight":
        t = _trim_vocab(tensor, hf_vocab_size)
        out = [("model.embed_tokens.weight", t)]
        if copies:
            for k in range(s.mtp_layers):
                out.append((_mtp_prefix(flavour, s, k) + "embed_tokens.weight", t))
                if tied:
                    out.append((_mtp_prefix(flavour, s, k) + "shared_head.head.weight", t))
        return out
    if name == "output_layer.weight":
        if tied:
            return []
        t = _trim_vocab(tensor, hf_vocab_size)
        out = [("lm_head.weight", t)]
        if copies:
            out += [(_mtp_prefix(flavour, s, k) + "shared_head.head.weight", t) for k in range(s.mtp_layers)]
        return out
    m = re.fullmatch(r"decoder\.final_layernorm\.(weight|bias)", name)
    if m:
        return [(f"model.norm.{m.group(1)}", tensor)]
    found = _locate(name, s, flavour)
    if found is not None:
        rule, groups, prefix = found
        outs = _forward(rule, tensor, config)
        return [(prefix + tpl.format(**groups), out) for tpl, out in zip(rule.hf, outs, strict=True)]
    raise KeyError(f"no HF mapping for megatron tensor {name!r} (flavour {flavour.name})")


def megatron_to_hf(
    named_full_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    config: Any,
    flavour: HFFlavour | str,
    *,
    tied: bool | None = None,
    hf_vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Full megatron tensors (see :func:`gather_full_state`) → HF-named tensors.

    ``config`` is the model's TransformerConfig (or ModelArgs). ``tied`` defaults to "no
    ``output_layer.weight`` among the inputs". ``hf_vocab_size`` trims megatron's padded
    vocabulary rows to the HF config's ``vocab_size``.
    """
    flavour = get_flavour(flavour)
    items = list(named_full_tensors.items() if isinstance(named_full_tensors, Mapping) else named_full_tensors)
    if tied is None:
        tied = not any(n == "output_layer.weight" for n, _ in items)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in items:
        for hf_name, t in megatron_tensor_to_hf(name, tensor, config, flavour, tied=tied, hf_vocab_size=hf_vocab_size):
            if hf_name in out:
                raise KeyError(f"two megatron tensors map to {hf_name!r} (second: {name!r})")
            out[hf_name] = t
    return out


# --------------------------------------------------------------------------------------------
# HF → megatron

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_MIMO_MTP = re.compile(r"model\.mtp_layers\.(\d+)\.(.+)")
_HF_QWEN3_MTP_LAYER = re.compile(r"mtp\.layers\.(\d+)\.(.+)")


def hf_to_megatron(
    hf_tensors: Mapping[str, torch.Tensor],
    config: Any,
    flavour: HFFlavour | str,
    *,
    padded_vocab_size: int | None = None,
    fused_layernorm: bool = False,
) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`megatron_to_hf`: HF tensors → full megatron tensors.

    ``fused_layernorm=True`` emits Transformer Engine spec names (norms inside
    ``linear_qkv``/``linear_fc1``). ``padded_vocab_size`` zero-pads the vocabulary rows back to
    megatron's padded size. DeepSeek's per-MTP-layer embedding/head copies must equal the main
    ones (they are shared parameters) and are dropped. Raises listing every unmapped name.
    """
    flavour = get_flavour(flavour)
    s = _shape(config)
    mtp_rules = _mtp_rules(flavour)

    def layer_rules_of(i: int) -> tuple[_Rule, ...]:  # i ≥ num_layers: an MTP layer (the last layer's spec)
        moe = s.moe_layers[min(i, s.num_layers - 1)] if s.num_layers else s.moe
        return _layer_rules(flavour, fused_layernorm, moe, s.mla)

    out: dict[str, torch.Tensor] = {}
    pending: dict[str, tuple[_Rule, list[torch.Tensor | None], list[str]]] = {}
    copies: list[tuple[str, str, torch.Tensor]] = []
    unknown: list[str] = []

    def emit(meg_name: str, t: torch.Tensor, hf_name: str) -> None:
        if meg_name in out:
            raise KeyError(f"two HF tensors map to {meg_name!r} (second: {hf_name!r})")
        out[meg_name] = t

    def place(rules: Iterable[_Rule], rest: str, t: torch.Tensor, meg_prefix: str, hf_name: str) -> bool:
        for rule in rules:
            for slot, tpl in enumerate(rule.hf):
                groups = _match(tpl, rest)
                if groups is None:
                    continue
                meg_name = meg_prefix + rule.meg.format(**groups)
                if len(rule.hf) == 1:
                    emit(meg_name, _inverse(rule, [t], config), hf_name)
                    return True
                _, parts, names = pending.setdefault(meg_name, (rule, [None] * len(rule.hf), [""] * len(rule.hf)))
                if parts[slot] is not None:
                    raise KeyError(f"{hf_name!r} given twice")
                parts[slot], names[slot] = t, hf_name
                if all(p is not None for p in parts):
                    del pending[meg_name]
                    emit(meg_name, _inverse(rule, parts, config), hf_name)
                return True
        return False

    for hf_name, t in hf_tensors.items():
        if hf_name == "model.embed_tokens.weight":
            emit("embedding.word_embeddings.weight", _pad_vocab(t, padded_vocab_size), hf_name)
            continue
        if hf_name == "lm_head.weight":
            emit("output_layer.weight", _pad_vocab(t, padded_vocab_size), hf_name)
            continue
        m = re.fullmatch(r"model\.norm\.(weight|bias)", hf_name)
        if m:
            emit(f"decoder.final_layernorm.{m.group(1)}", t, hf_name)
            continue
        m = _HF_LAYER.fullmatch(hf_name)
        if m and int(m.group(1)) < s.num_layers:
            i, rest = int(m.group(1)), m.group(2)
            if not place(layer_rules_of(i), rest, t, f"decoder.layers.{i}.", hf_name):
                unknown.append(hf_name)
            continue
        k, rest = None, None
        if m and flavour.mtp_style == "deepseek_v3":
            k, rest = int(m.group(1)) - s.num_layers, m.group(2)
        m2 = _HF_MIMO_MTP.fullmatch(hf_name)
        if m2 and flavour.mtp_style == "mimo":
            k, rest = int(m2.group(1)), m2.group(2)
        if flavour.mtp_style == "qwen3" and hf_name.startswith("mtp."):
            m3 = _HF_QWEN3_MTP_LAYER.fullmatch(hf_name)
            # mtp.fc / mtp.norm ... belong to MTP layer 0; its transformer layer is mtp.layers.0.
            k, rest = (int(m3.group(1)), "mtp_model_layer." + m3.group(2)) if m3 else (0, hf_name[4:])
        if k is None or k >= s.mtp_layers:
            unknown.append(hf_name)
            continue
        if flavour.mtp_style == "deepseek_v3" and rest in ("embed_tokens.weight", "shared_head.head.weight"):
            source = "embedding.word_embeddings.weight" if rest == "embed_tokens.weight" else "output_layer.weight"
            copies.append((hf_name, source, t))
            continue
        meg_prefix = f"mtp.layers.{k}."
        if flavour.mtp_style == "qwen3":
            placed = (
                place(layer_rules_of(s.num_layers + k), rest[16:], t, meg_prefix + "mtp_model_layer.", hf_name)
                if rest.startswith("mtp_model_layer.")
                else place(mtp_rules, rest, t, meg_prefix, hf_name)
            )
        else:
            placed = place(mtp_rules, rest, t, meg_prefix, hf_name) or place(
                layer_rules_of(s.num_layers + k), rest, t, meg_prefix + "mtp_model_layer.", hf_name
            )
        if not placed:
            unknown.append(hf_name)

    problems = []
    if unknown:
        problems.append(f"no megatron mapping for {len(unknown)} HF tensor(s): " + ", ".join(unknown))
    for meg_name, (_, parts, names) in pending.items():
        have = [n for n in names if n]
        problems.append(f"{meg_name} needs {len(parts)} HF tensors, got only {have}")
    if problems:
        raise KeyError(f"flavour {flavour.name}: " + "; ".join(problems))
    for hf_name, source, t in copies:
        if source == "output_layer.weight" and source not in out:
            source = "embedding.word_embeddings.weight"  # tied: the head is the embedding
        ref = out.get(source)
        if ref is None or not torch.equal(_pad_vocab(t, padded_vocab_size), ref):
            raise ValueError(f"{hf_name} is not a copy of the model's {source}; MTP layers here share it")
    return out


# --------------------------------------------------------------------------------------------
# Gathering TP / EP shards into full tensors

_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)")


def _all_gather(t: torch.Tensor, group: Any) -> list[torch.Tensor]:
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def _gather_partitioned(t: torch.Tensor, group: Any, dim: int, stride: int) -> torch.Tensor:
    """Undo megatron's split: rank r holds pieces r, r + tp, ... of ``tp * stride`` pieces."""
    parts = _all_gather(t, group)
    if stride == 1:
        return torch.cat(parts, dim=dim)
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(parts))], dim=dim)


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a weight export reads, in order: the parameters and the routers' expert bias."""
    yield from model.named_parameters()
    for name, buf in model.named_buffers():
        if name.endswith("router.expert_bias"):  # the aux-loss-free routing bias is inference state
            yield name, buf


def iter_full_tensors(
    model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield this stage's tensors one at a time as full TP=1/EP=1 tensors (a collective).

    Every rank of the TP, expert-TP and EP groups must run the iteration to the end in step.
    TP shards are all-gathered along ``partition_dim`` honouring ``partition_stride`` (SwiGLU
    ``linear_fc1`` always counts as stride 2: each rank holds ``[gate_r; up_r]``); expert
    weights are gathered over the expert-TP group, then over the EP group, and renamed to the
    global expert index. Within one parameter, experts come out ordered by EP rank. Names are
    PP=1 names (decoder layers offset by the stage). Tensors that need no gathering alias the
    parameters: clone what must survive an optimizer step. ``tensors``: :func:`named_tensors`'s
    pairs from elsewhere (a model on the meta device read from its checkpoint as it goes).
    """
    model = unwrap(model)
    config = model.config
    gated = bool(config.gated_linear_unit)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    ep_group = parallel_state.get_expert_model_parallel_group() if ep_size > 1 else None
    etp_group = parallel_state.get_expert_tensor_parallel_group() if config.num_moe_experts else None
    num_local = (config.num_moe_experts or 0) // ep_size
    for local_name, param in named_tensors(model) if tensors is None else tensors:
        name = full_name(model, local_name)
        expert = _LOCAL_EXPERT.search(name)
        t = param.detach()
        if getattr(param, "tensor_model_parallel", False):
            group = etp_group if expert else tp_group
            if dist.get_world_size(group) > 1:
                stride = getattr(param, "partition_stride", 1)
                if gated and re.search(r"linear_fc1\.(weight|bias)$", name):
                    stride = 2
                t = _gather_partitioned(t, group, param.partition_dim, stride)
        if expert is None or ep_group is None:
            yield name, t
            continue
        local = int(expert.group(2))
        for r, part in enumerate(_all_gather(t, ep_group)):
            a, b = expert.span(2)
            yield name[:a] + str(r * num_local + local) + name[b:], part


def _expert_order(items: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Sort each run of one layer's expert tensors by (global index, local parameter order)."""
    out: list[tuple[str, torch.Tensor]] = []
    i = 0
    while i < len(items):
        m = _LOCAL_EXPERT.search(items[i][0])
        if m is None:
            out.append(items[i])
            i += 1
            continue
        head = items[i][0][: m.start(2)]
        j = i
        suffix_rank: dict[str, int] = {}
        keyed = []
        while j < len(items):
            mj = _LOCAL_EXPERT.search(items[j][0])
            if mj is None or items[j][0][: mj.start(2)] != head:
                break
            suffix = items[j][0][mj.end(2) :]
            suffix_rank.setdefault(suffix, len(suffix_rank))
            keyed.append(((int(mj.group(2)), suffix_rank[suffix]), items[j]))
            j += 1
        out.extend(item for _, item in sorted(keyed, key=lambda kv: kv[0]))
        i = j
    return out


def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's parameters as full tensors in TP=1/EP=1 order, under PP=1 names.

    A collective: TP/EP shards are gathered by :func:`iter_full_tensors`; with PP > 1 the
    stages' dicts are then exchanged over the pipeline group (as CPU tensors), so every rank
    gets the same dict — the HF export and the weight push need the MTP layers of the last
    stage as much as the embedding of the first. A name two stages hold (the tied or MTP
    stage's copy of the word embedding, kept equal by megatron) is taken from the first.
    """
    own = dict(_expert_order(list(iter_full_tensors(model))))
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return own
    group = parallel_state.get_pipeline_model_parallel_group()
    stages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(stages, {k: v.cpu() for k, v in own.items()}, group=group)
    full: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, t in stage.items():
            full.setdefault(name, t)
    return full
