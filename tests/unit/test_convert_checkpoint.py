"""tools/convert_checkpoint.py: HF safetensors ↔ our megatron dist checkpoint, per HF family.

* Round trips HF → Megatron → HF are bit-exact (names, dtypes, values) on tiny random HF-style
  tensors whose names and shapes are written out here from the published layouts: MiMo
  (Qwen2 + q/k/v bias, ``model.mtp_layers.{k}.*``), GLM-4.5 (``model.layers.{L+k}.*``, sigmoid
  router with ``e_score_correction_bias``), Qwen3 (q/k norm, head_dim ≠ hidden/heads, ``mtp.*``).
* Every computation-changing config key without a mapping is refused with one line naming the key
  and its value (transformers-model parity per family lives in test_families_parity.py).
* ``mtp-rl train --load DIR`` trains from a converted checkpoint with no shape flags.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    return load_tool("convert_checkpoint")


# ---------------------------------------------------------------------------------------------
# Tiny HF checkpoints made here


def _w(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * 0.05).to(dtype)


def _norm(g: torch.Generator, h: int, dtype=torch.float32) -> torch.Tensor:
    return (1.0 + 0.1 * torch.randn(h, generator=g)).to(dtype)


def _layer(prefix: str, cfg: dict, g: torch.Generator, dtype, moe: bool) -> dict[str, torch.Tensor]:
    """One decoder layer in Qwen2/Qwen3/GLM naming (GQA), MoE with per-expert checkpoint names."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, d = cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    t = {
        "input_layernorm.weight": _norm(g, h, dtype),
        "self_attn.q_proj.weight": _w(g, heads * d, h, dtype=dtype),
        "self_attn.k_proj.weight": _w(g, kv * d, h, dtype=dtype),
        "self_attn.v_proj.weight": _w(g, kv * d, h, dtype=dtype),
        "self_attn.o_proj.weight": _w(g, h, heads * d, dtype=dtype),
        "post_attention_layernorm.weight": _norm(g, h, dtype),
    }
    if cfg.get("model_type") == "mimo" or cfg.get("attention_bias"):  # Qwen2 always, GLM when asked
        t |= {f"self_attn.{p}_proj.bias": _w(g, n * d, dtype=dtype) for p, n in (("q", heads), ("k", kv), ("v", kv))}
    if cfg.get("model_type") == "qwen3" or cfg.get("use_qk_norm"):
        t |= {"self_attn.q_norm.weight": _norm(g, d, dtype), "self_attn.k_norm.weight": _norm(g, d, dtype)}
    if moe:
        experts, f = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        t["mlp.gate.weight"] = _w(g, experts, h, dtype=dtype)
        t["mlp.gate.e_score_correction_bias"] = _w(g, experts, dtype=torch.float32)  # fp32, as published
        for e in range(experts):
            t[f"mlp.experts.{e}.gate_proj.weight"] = _w(g, f, h, dtype=dtype)
            t[f"mlp.experts.{e}.up_proj.weight"] = _w(g, f, h, dtype=dtype)
            t[f"mlp.experts.{e}.down_proj.weight"] = _w(g, h, f, dtype=dtype)
    else:
        f = cfg["intermediate_size"]
        t["mlp.gate_proj.weight"] = _w(g, f, h, dtype=dtype)
        t["mlp.up_proj.weight"] = _w(g, f, h, dtype=dtype)
        t["mlp.down_proj.weight"] = _w(g, h, f, dtype=dtype)
    return {prefix + k: v for k, v in t.items()}


MTP_ONLY = {  # family → (decoder-layer prefix, own-module prefix, names: enorm, hnorm, proj, final norm)
    "mimo": ("model.mtp_layers.{k}.", "model.mtp_layers.{k}.",
             ("token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm")),
    "glm4_moe": ("model.layers.{L}.", "model.layers.{L}.", ("enorm", "hnorm", "eh_proj", "shared_head.norm")),
    "qwen3": ("mtp.layers.{k}.", "mtp.", ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm")),
}  # fmt: skip


def _mtp(cfg: dict, family: str, g: torch.Generator, dtype, moe: bool) -> dict[str, torch.Tensor]:
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    out: dict[str, torch.Tensor] = {}
    for k in range(cfg["num_nextn_predict_layers"]):
        layer, own, (en, hn, proj, fn) = MTP_ONLY[family]
        layer, own = layer.format(k=k, L=L + k), own.format(k=k, L=L + k)
        out |= {
            own + f"{en}.weight": _norm(g, h, dtype),
            own + f"{hn}.weight": _norm(g, h, dtype),
            own + f"{proj}.weight": _w(g, h, 2 * h, dtype=dtype),
            own + f"{fn}.weight": _norm(g, h, dtype),
        }
        out |= _layer(layer, cfg, g, dtype, moe)
    return out


def make_hf_checkpoint(path: Path, cfg: dict, *, family: str, dtype=torch.float32, seed: int = 0) -> dict:
    """Write config.json + two safetensors shards (trunk, MTP) and return every tensor."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    trunk = {"model.embed_tokens.weight": _w(g, v, h, dtype=dtype), "model.norm.weight": _norm(g, h, dtype)}
    if not cfg["tie_word_embeddings"]:
        trunk["lm_head.weight"] = _w(g, v, h, dtype=dtype)
    dense_first = cfg.get("first_k_dense_replace", 0)
    moe = bool(cfg.get("n_routed_experts"))
    for i in range(cfg["num_hidden_layers"]):
        trunk |= _layer(f"model.layers.{i}.", cfg, g, dtype, moe and i >= dense_first)
    mtp = _mtp(cfg, family, g, dtype, moe)
    path.mkdir(parents=True, exist_ok=True)
    save_file(trunk, str(path / "model-00001-of-00002.safetensors"))
    save_file(mtp, str(path / "model-00002-of-00002.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return trunk | mtp


DENSE = {  # MiMo-7B's layout, tiny
    "model_type": "mimo",
    "architectures": ["MiMoForCausalLM"],
    "vocab_size": 18,  # not a multiple of 64: exercises megatron's vocabulary padding and the trim back
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 640000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "num_nextn_predict_layers": 2,
}
MOE = {  # GLM-4.5's layout, tiny (one dense layer first, sigmoid routing with expert bias)
    "model_type": "glm4_moe",
    "architectures": ["Glm4MoeForCausalLM"],
    "vocab_size": 18,
    "hidden_size": 64,
    "intermediate_size": 160,
    "moe_intermediate_size": 48,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 0,
    "first_k_dense_replace": 1,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
}
QWEN3 = DENSE | {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 32,
                 "tie_word_embeddings": False, "num_nextn_predict_layers": 1}  # fmt: skip

CASES = {
    "mimo-tied-fp32": (DENSE, "mimo", torch.float32),
    "glm4_moe-untied-fp32": (MOE, "glm4_moe", torch.float32),
    "qwen3-untied-bf16": (QWEN3, "qwen3", torch.bfloat16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_hf_mcore_hf_is_bit_exact(single_process, tmp_path, case):
    from safetensors.torch import load_file

    conv = _tool()
    cfg, family, dtype = CASES[case]
    src = make_hf_checkpoint(tmp_path / "hf", cfg, family=family, dtype=dtype)
    path, margs = conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    assert path == tmp_path / "mcore" / "iter_0000000"
    assert (tmp_path / "mcore" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    assert state["model_args"]["mtp_num_layers"] == cfg["num_nextn_predict_layers"]
    assert state["model_args"]["params_dtype"] == ("bf16" if dtype is torch.bfloat16 else "fp32")
    assert state["hf_flavour"] == family  # detected from architectures / model_type

    out = conv.mcore_to_hf(tmp_path / "mcore", tmp_path / "back", all_mtp_layers=True)
    back = load_file(str(out / "model.safetensors"))
    assert sorted(back) == sorted(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    exported = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "num_nextn_predict_layers", "tie_word_embeddings", "n_routed_experts", "num_experts_per_tok",
                "moe_intermediate_size", "first_k_dense_replace", "partial_rotary_factor", "head_dim",
                "architectures", "model_type"):  # fmt: skip
        if key in cfg:
            assert exported[key] == cfg[key], key
    # and the exported directory converts again to the same model
    _, margs2 = conv.hf_to_mcore(out, tmp_path / "mcore2")
    assert margs2 == margs


def test_default_export_carries_the_depth_sglang_drafts_take(single_process, tmp_path, capsys):
    from safetensors.torch import load_file

    conv = _tool()
    make_hf_checkpoint(tmp_path / "hf", DENSE, family="mimo")  # 2 MTP layers
    conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    out = conv.mcore_to_hf(tmp_path / "mcore", tmp_path / "sglang")
    names = load_file(str(out / "model.safetensors"))
    assert any(n.startswith("model.mtp_layers.0.") for n in names)
    assert not any(n.startswith("model.mtp_layers.1.") for n in names)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert "1 of 2 MTP layer(s) (MiMoMTP takes 1" in capsys.readouterr().err


# Each computation-changing key without a megatron-core mapping: (base config, change, words in the message)
REFUSALS = {
    "partial_rotary_factor": (QWEN3, {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    "rope_scaling": (DENSE, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 32}}, "rope_scaling="),
    "sliding_window": (DENSE, {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0},
                       "use_sliding_window=True"),
    "hidden_act": (DENSE, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    "mlp_bias": (QWEN3, {"mlp_bias": True}, "mlp_bias=True"),
    "qwen3_attention_bias": (QWEN3, {"attention_bias": True}, "attention_bias=True"),
    "scoring_func": (MOE, {"scoring_func": "softmax"}, "scoring_func='softmax'"),
    "topk_method": (MOE, {"topk_method": "greedy"}, "topk_method='greedy'"),
    "norm_topk_prob_sigmoid": (MOE, {"norm_topk_prob": False}, "norm_topk_prob=False"),
    "topk_group": (MOE, {"n_group": 2, "topk_group": 2}, "topk_group=2"),
    "routed_scaling_factor_qwen3_moe": (
        QWEN3 | {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
                 "num_experts_per_tok": 2, "moe_intermediate_size": 32},
        {"routed_scaling_factor": 2.5}, "routed_scaling_factor=2.5"),
    "top1_without_pre_softmax": (
        QWEN3 | {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
                 "num_experts_per_tok": 1, "moe_intermediate_size": 32},
        {"norm_topk_prob": True}, "norm_topk_prob=True"),
    "layer_types": (QWEN3, {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
                            "use_sliding_window": False}, "layer_types="),
    "rope_interleave": (
        MOE | {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "kv_lora_rank": 32,
               "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16},
        {"rope_interleave": False}, "rope_interleave=False"),
    "qwen3_next": (QWEN3 | {"model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"]}, {},
                   "Gated DeltaNet"),
    "unknown_family": (DENSE | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, {},
                       "not a supported family"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_unmapped_key_is_refused_in_one_line(case):
    conv = _tool()
    base, change, words = REFUSALS[case]
    with pytest.raises(conv.ConversionError) as e:
        conv.model_args_from_hf_config(base | change)
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg


def test_mla_is_refused_on_cpu_naming_transformer_engine(single_process, tmp_path):
    """DeepSeek-V3 maps (see test_families_mla.py) but megatron builds MLA only on Transformer Engine."""
    from safetensors.torch import save_file

    conv = _tool()
    cfg = MOE | {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "kv_lora_rank": 32,
                 "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                 "n_group": 1, "topk_group": 1, "partial_rotary_factor": 1.0, "attention_bias": False}  # fmt: skip
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": torch.zeros(18, 64)}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(conv.ConversionError, match="Transformer Engine") as e:
        conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", use_te=False)
    assert "\n" not in str(e.value)


def test_unplaced_tensor_is_named(single_process, tmp_path):
    from safetensors.torch import save_file

    conv = _tool()
    make_hf_checkpoint(tmp_path / "hf", DENSE, family="mimo")
    save_file({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, str(tmp_path / "hf" / "extra.safetensors"))
    with pytest.raises(conv.ConversionError, match=r"no place for \(1\): model\.layers\.0\.self_attn\.o_proj\.bias"):
        conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")


def test_missing_mtp_layers_need_the_flag(single_process, tmp_path):
    """A model released without MTP weights (e.g. Moonlight) gets initialised MTP layers only on request."""
    from safetensors.torch import load_file

    conv = _tool()
    make_hf_checkpoint(tmp_path / "hf", MOE | {"num_nextn_predict_layers": 0}, family="glm4_moe")
    with pytest.raises(conv.ConversionError, match="no HF source"):
        conv.hf_to_mcore(tmp_path / "hf", tmp_path / "a", mtp_num_layers=1)
    with pytest.warns(conv.ConversionWarning, match="MTP tensors keep"):
        _, margs = conv.hf_to_mcore(tmp_path / "hf", tmp_path / "b", mtp_num_layers=1, allow_missing_mtp=True)
    assert margs.mtp_num_layers == 1
    out = load_file(str(conv.mcore_to_hf(tmp_path / "b", tmp_path / "back") / "model.safetensors"))
    assert "model.layers.3.eh_proj.weight" in out


# ---------------------------------------------------------------------------------------------
# The CLI and `mtp-rl train --load DIR`


@pytest.mark.slow  # ~50 s of subprocesses; the same steps run in-process in the fast tests
def test_cli_convert_verify_and_load_alone(tmp_path):
    """Convert, verify against transformers (exit 0, last line max_abs_diff=); --load alone gives the shapes.

    One RL step from each family's converted checkpoint with --load alone: tests/e2e/test_families_rl_step.py.
    """
    make_hf_checkpoint(tmp_path / "hf", DENSE, family="mimo")  # vocab 18 = the arith tokenizer's
    env = {"PATH": str(Path(sys.executable).parent), "CUDA_VISIBLE_DEVICES": "", "HOME": str(tmp_path)}
    tool = [sys.executable, str(ROOT / "tools/convert_checkpoint.py")]
    conv = subprocess.run(
        [*tool, "hf-to-mcore", "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "mcore")],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    assert conv.returncode == 0, conv.stderr
    ver = subprocess.run(
        [*tool, "verify", "--hf-dir", str(tmp_path / "hf"), "--load", str(tmp_path / "mcore"), "--seq-len", "16"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    # vocab 18, padded to 64 by megatron: our log-probs leave the padding out, as transformers has none
    last = ver.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= 1e-4 and ver.returncode == 0, ver.stdout
    assert "mtp_depth_2_max_abs_diff=" in ver.stdout  # both MTP heads against the reference
    # above --tol: exit 1 (in process: one interpreter start less)
    assert _tool().main(["verify", "--hf-dir", str(tmp_path / "hf"), "--load", str(tmp_path / "mcore"),
                         "--seq-len", "8", "--tol", "0"]) == 1  # fmt: skip
    # a shape flag that disagrees with the checkpoint: one ConfigError naming both values
    from megatron_mtp_rl.config import parse_config, resolve_model_args
    from megatron_mtp_rl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--num-layers 3 \(the checkpoint has 2\)"):
        resolve_model_args(parse_config(["--load", str(tmp_path / "mcore"), "--num-layers", "3"]), 18)
    # a refusal reaches the user as one line, no traceback
    make_hf_checkpoint(tmp_path / "hf2", QWEN3 | {"partial_rotary_factor": 0.5}, family="qwen3")
    r = subprocess.run(
        [*tool, "hf-to-mcore", "--hf-dir", str(tmp_path / "hf2"), "--save", str(tmp_path / "m2")],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "partial_rotary_factor=0.5" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
