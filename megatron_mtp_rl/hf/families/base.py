"""What every HF model family shares: reading config.json into ModelArgs, refusing what is not mapped.

A family knows three things about one Hugging Face architecture: its ``config.json`` ⇄ our
:class:`~megatron_mtp_rl.models.presets.ModelArgs`, its tensor names (an
:class:`~megatron_mtp_rl.hf.mapping.HFFlavour`), and what SGLang's draft model for it
accepts. The converter and weight sync both go through it, so a model converts and exports
the same way everywhere.

The converter never converts silently wrong: a config key that changes the computation is either
mapped onto a megatron-core option or refused (:class:`UnsupportedCheckpoint`, one line naming
the key and its value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from megatron_mtp_rl.errors import ConfigError, UnsupportedCheckpoint  # noqa: F401 (re-exported)
from megatron_mtp_rl.hf.mapping import HFFlavour
from megatron_mtp_rl.models.presets import ModelArgs

RMS_NORM_EPS_DEFAULT = 1e-6


class Reader:
    """Reads an HF config dict; collects every refusal so the user sees them all in one line."""

    def __init__(self, cfg: dict[str, Any], family: str) -> None:
        self.cfg = cfg
        self.family = family
        self.problems: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        value = self.cfg.get(key)
        return default if value is None else value

    def req(self, key: str) -> Any:
        if self.cfg.get(key) is None:
            self.problems.append(f"{key} is missing")
        return self.cfg.get(key)

    def refuse(self, key: str, value: Any, why: str = "") -> None:
        self.problems.append(f"{key}={value!r}" + (f" ({why})" if why else ""))

    def refuse_unless(self, key: str, allowed: tuple, why: str = "") -> None:
        """Refuse ``key`` when present with a value outside ``allowed`` (``None`` = absent)."""
        value = self.cfg.get(key)
        if value not in allowed:
            self.refuse(key, value, why)

    def rope(self) -> dict[str, Any]:
        """transformers ≥ 5 nests rope settings in ``rope_parameters``; older configs use flat keys."""
        params = dict(self.cfg.get("rope_parameters") or {})
        scaling = self.cfg.get("rope_scaling") or {}
        out = {**scaling, **params}
        out.setdefault("rope_theta", self.cfg.get("rope_theta", 10000.0))
        if "partial_rotary_factor" in self.cfg:
            out.setdefault("partial_rotary_factor", self.cfg["partial_rotary_factor"])
        out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
        return out

    def finish(self) -> None:
        if self.problems:
            raise UnsupportedCheckpoint(
                f"cannot convert this {self.family} config exactly: "
                + "; ".join(self.problems)
                + " — these keys change the computation and have no megatron-core mapping here"
            )


@dataclass(frozen=True)
class ExportInfo:
    """What an export carries beyond the tensors: config.json, extra files, the MTP depth written."""

    config: dict[str, Any]
    files: dict[str, str]
    depth: int
    note: str  # one line for the log: what was exported and why (e.g. "1 of 2 MTP layers")


class Family:
    """One HF architecture. Subclasses fill the class attributes and the three hooks."""

    name: ClassVar[str]
    architecture: ClassVar[str]  # what exports declare
    config_class: ClassVar[str]  # transformers' config class that parses it
    accepts: ClassVar[tuple[str, ...]] = ()  # architectures / model_types read on import
    flavour: ClassVar[HFFlavour]
    draft_class: ClassVar[str | None] = None  # SGLang 0.5.23's draft (speculative) class for it
    draft_depth: ClassVar[int] = 1  # MTP layers that draft takes (SGLang: one; 0 where it has no draft)
    # SGLang's class ties lm_head to embed_tokens under tie_word_embeddings. Where it does not (it always
    # reads lm_head.weight, else the head stays zero), a tied model's export writes the head explicitly.
    served_class_ties: ClassVar[bool] = True

    def writes_explicit_head(self, m: ModelArgs) -> bool:
        """A tied model's export carries ``lm_head.weight`` (= the embedding): SGLang's class reads it."""
        return not m.untie_embeddings_and_output_weights and not self.served_class_ties

    # The draft reads a zero token embedding at each sequence's position 0 (MiMo); our MTP layers then do too.
    draft_zeroes_first_embedding: ClassVar[bool] = False

    # -- HF → ours ---------------------------------------------------------------------------
    def normalize(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The config as transformers (and so SGLang, which parses with ``AutoConfig``) sees it.

        An absent key means transformers' default for the class (GLM-4.5's ``partial_rotary_factor``
        is 0.5, DeepSeek-V3's ``first_k_dense_replace`` 3 ...), so defaults are filled by the class.
        """
        try:
            import transformers
        except ImportError:
            return cfg
        cls = getattr(transformers, self.config_class, None)
        if cls is None:
            return cfg
        skip = ("auto_map", "model_type", "architectures", "transformers_version", "torch_dtype", "dtype")
        try:
            out = cls(**{k: v for k, v in cfg.items() if k not in skip}).to_dict()
        except Exception as e:  # transformers validates values; say which
            raise UnsupportedCheckpoint(f"{self.config_class} refuses this config.json: {e}") from None
        out["architectures"] = cfg.get("architectures")
        return out

    def model_args(self, cfg: dict[str, Any], **overrides: Any) -> ModelArgs:
        """ModelArgs for this HF config; raises :class:`UnsupportedCheckpoint` naming every unmapped key."""
        r = Reader(self.normalize(cfg), self.name)
        fields = self.common(r)
        fields.update(self.specific(r, fields))
        r.finish()
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return ModelArgs(**fields)

    def draft_token_embedding(self, embedded, positions=None):
        """``embedded [B, T, H]`` (the token embeddings an MTP layer reads) as this family's SGLang draft
        feeds them: zero at ``positions == 0`` when the draft masks position 0 (``positions`` default:
        each row is one sequence from position 0). The MTP reference of ``convert_checkpoint verify``."""
        if not self.draft_zeroes_first_embedding:
            return embedded
        if positions is None:
            import torch

            positions = torch.arange(embedded.shape[1], device=embedded.device).expand(embedded.shape[:2])
        return embedded.masked_fill((positions == 0)[..., None], 0.0)

    def common(self, r: Reader) -> dict[str, Any]:
        """Keys every family here reads the same way (Llama-style trunk)."""
        hidden, heads = r.req("hidden_size"), r.req("num_attention_heads")
        layers, vocab = r.req("num_hidden_layers"), r.req("vocab_size")
        if r.problems:
            r.finish()
        r.refuse_unless("hidden_act", (None, "silu"), "our MLPs are SwiGLU")
        r.refuse_unless("mlp_bias", (None, False), "megatron's bias-free MLP")
        if r.get("quantization_config"):  # block fp8 (DeepSeek-V3's) is dequantised to bf16 on load
            from megatron_mtp_rl.hf.fp8 import block_size_from_config

            try:
                block_size_from_config(r.cfg)
            except UnsupportedCheckpoint as e:
                r.problems.append(str(e))
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "logits_scaling"):
            r.refuse_unless(key, (None,))
        if r.get("use_sliding_window", False):
            r.refuse("use_sliding_window", True, "sliding-window attention is not built")
        kinds = set(r.get("layer_types") or ["full_attention"])
        if kinds != {"full_attention"}:
            r.refuse("layer_types", sorted(kinds), "only full attention is built")
        rope = r.rope()
        if rope["rope_type"] not in ("default",) and not self.maps_rope_type(rope["rope_type"]):
            r.refuse("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"}, "plain RoPE only")
        theta = float(rope["rope_theta"])
        heads_kv = r.get("num_key_value_heads", heads)
        head_dim = r.get("head_dim")
        mtp = int(r.get("num_nextn_predict_layers", 0) or 0)
        return dict(
            mtp_zero_first_embedding=self.draft_zeroes_first_embedding,
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=None if heads_kv == heads else heads_kv,
            kv_channels=None if head_dim in (None, hidden // heads) else head_dim,
            ffn_hidden_size=r.get("intermediate_size"),
            vocab_size=vocab,
            seq_length=int(r.get("max_position_embeddings", 4096)),
            mtp_num_layers=mtp,
            untie_embeddings_and_output_weights=not r.get("tie_word_embeddings", False),
            rotary_base=int(theta) if theta.is_integer() else theta,
            norm_epsilon=float(r.get("rms_norm_eps", RMS_NORM_EPS_DEFAULT)),
        )

    def maps_rope_type(self, rope_type: str) -> bool:
        return False

    def partial_rotary(self, r: Reader, *, mapped: bool) -> float:
        factor = float(r.rope().get("partial_rotary_factor", 1.0))
        if factor != 1.0 and not mapped:
            r.refuse("partial_rotary_factor", factor, f"{self.name} rotates the whole head")
        return factor

    def specific(self, r: Reader, fields: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # -- ours → HF ---------------------------------------------------------------------------
    def unrepresentable(self, m: ModelArgs) -> list[str]:
        """Why ``m`` cannot be written exactly as this family (empty: it can)."""
        raise NotImplementedError

    def export_depth(self, m: ModelArgs, all_layers: bool = False) -> int:
        """MTP layers an export carries: SGLang's draft takes ``draft_depth``; ``all_layers`` keeps every one."""
        if all_layers:  # the Qwen3 MTP naming (mtp.fc, mtp.layers.0 ...) holds one layer
            return min(m.mtp_num_layers, 1) if self.flavour.mtp_style == "qwen3" else m.mtp_num_layers
        return min(m.mtp_num_layers, self.draft_depth)

    def hf_config(self, m: ModelArgs, depth: int) -> dict[str, Any]:
        raise NotImplementedError

    def extra_files(self, m: ModelArgs) -> dict[str, str]:
        return {}

    def complete(self, hf: dict, m: ModelArgs, depth: int) -> dict:
        """Add tensors the HF architecture always has and our model may leave out (exact zeros)."""
        return hf

    def base_config(self, m: ModelArgs, depth: int) -> dict[str, Any]:
        """Llama-style keys every family here writes."""
        return {
            "architectures": [self.architecture],
            "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
            "head_dim": m.head_dim,
            "max_position_embeddings": m.seq_length,
            "rms_norm_eps": m.norm_epsilon,
            "rope_theta": float(m.rotary_base),
            "hidden_act": "silu",
            "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
            "torch_dtype": "bfloat16" if m.params_dtype == "bf16" else "float32",
            "num_nextn_predict_layers": depth,
        }

    def common_unrepresentable(self, m: ModelArgs) -> list[str]:
        out = []
        if m.normalization != "RMSNorm" or not m.swiglu:
            out.append("needs RMSNorm and SwiGLU")
        if m.attention_output_gate:
            out.append("--attention-output-gate has no HF family here")
        if m.moe_shared_expert_gate:
            out.append("--moe-shared-expert-gate (Qwen2-MoE style) is not this family's")
        return out


def zero_bias_names(hf: dict, pattern_layers: list[str], proj: tuple[str, ...], shape_of) -> dict:
    """Zero biases for ``<layer>.self_attn.{q,k,v}_proj.bias`` where the model has none (exactly no bias)."""
    out = dict(hf)
    for layer in pattern_layers:
        for p in proj:
            w = hf.get(f"{layer}self_attn.{p}.weight")
            if w is not None and f"{layer}self_attn.{p}.bias" not in hf:
                out[f"{layer}self_attn.{p}.bias"] = w.new_zeros(shape_of(w))
    return out
