"""tools/convert_checkpoint.py: HF safetensors ↔ our megatron dist checkpoint, MTP layers included.

* Round trips HF → Megatron → HF are bit-exact (names, dtypes, values) on tiny random HF-style
  tensors whose names and shapes are written out here from the published layouts (MiMo:
  ``model.mtp_layers.{k}.*``; DeepSeek-V3: ``model.layers.{L+k}.*`` with per-layer embedding/head
  copies), dense and MoE.
* A converted model's main-head log-probs equal a Hugging Face reference model's on the same
  tokens: transformers 5.x ``LlamaForCausalLM`` (dense GQA, SwiGLU, RMSNorm, RoPE; no biases —
  Qwen2 hard-codes qkv biases, which our provider does not build) and ``Qwen2MoeForCausalLM``
  (``norm_topk_prob=True``, ``qkv_bias=False``, a zero-width shared expert, which adds exactly 0,
  dropped before conversion). HF has no MTP heads, so only the main head is compared.
* The flags the converter prints make ``mtp-rl train --load DIR --finetune`` accept the checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

try:
    # Import the HF model code at collection time, before any test applies our CPU shims:
    # platform/cpu.py replaces torch.cuda.Stream with a function, and transformers 5.x evaluates
    # ``torch.cuda.Stream | None`` annotations when its generation utilities are imported.
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
except ImportError:  # the test extra installs it; without it the two reference tests skip
    transformers = None


def _tool():
    if "convert_checkpoint" not in sys.modules:
        spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["convert_checkpoint"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["convert_checkpoint"]


# ---------------------------------------------------------------------------------------------
# Tiny HF checkpoints made here


def _w(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * 0.05).to(dtype)


def _norm(g: torch.Generator, h: int, dtype=torch.float32) -> torch.Tensor:
    return (1.0 + 0.1 * torch.randn(h, generator=g)).to(dtype)


def _layer(prefix: str, cfg: dict, g: torch.Generator, dtype) -> dict[str, torch.Tensor]:
    """One decoder layer in Llama/Qwen2/DeepSeek (GQA) naming; MoE with Qwen2-MoE/DeepSeek expert names."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, d = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    t = {
        "input_layernorm.weight": _norm(g, h, dtype),
        "self_attn.q_proj.weight": _w(g, heads * d, h, dtype=dtype),
        "self_attn.k_proj.weight": _w(g, kv * d, h, dtype=dtype),
        "self_attn.v_proj.weight": _w(g, kv * d, h, dtype=dtype),
        "self_attn.o_proj.weight": _w(g, h, heads * d, dtype=dtype),
        "post_attention_layernorm.weight": _norm(g, h, dtype),
    }
    experts = cfg.get("n_routed_experts", 0)
    if experts:
        f = cfg["moe_intermediate_size"]
        t["mlp.gate.weight"] = _w(g, experts, h, dtype=dtype)
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


def _mtp(cfg: dict, flavour: str, g: torch.Generator, dtype, trunk: dict, copies: bool) -> dict[str, torch.Tensor]:
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    out: dict[str, torch.Tensor] = {}
    for k in range(cfg["num_nextn_predict_layers"]):
        if flavour == "mimo":
            p = f"model.mtp_layers.{k}."
            out |= {
                p + "token_layernorm.weight": _norm(g, h, dtype),
                p + "hidden_layernorm.weight": _norm(g, h, dtype),
                p + "input_proj.weight": _w(g, h, 2 * h, dtype=dtype),
                p + "final_layernorm.weight": _norm(g, h, dtype),
            }
        else:
            p = f"model.layers.{L + k}."
            out |= {
                p + "enorm.weight": _norm(g, h, dtype),
                p + "hnorm.weight": _norm(g, h, dtype),
                p + "eh_proj.weight": _w(g, h, 2 * h, dtype=dtype),
                p + "shared_head.norm.weight": _norm(g, h, dtype),
            }
            if copies:  # DeepSeek's checkpoints store the shared embedding and head again per MTP layer
                out[p + "embed_tokens.weight"] = trunk["model.embed_tokens.weight"].clone()
                head = trunk.get("lm_head.weight", trunk["model.embed_tokens.weight"])
                out[p + "shared_head.head.weight"] = head.clone()
        out |= _layer(p, cfg, g, dtype)
    return out


def make_hf_checkpoint(
    path: Path, cfg: dict, *, flavour: str, dtype=torch.float32, copies: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write config.json + two safetensors shards (trunk, MTP) and return every tensor."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    trunk = {"model.embed_tokens.weight": _w(g, v, h, dtype=dtype), "model.norm.weight": _norm(g, h, dtype)}
    if not cfg["tie_word_embeddings"]:
        trunk["lm_head.weight"] = _w(g, v, h, dtype=dtype)
    for i in range(cfg["num_hidden_layers"]):
        trunk |= _layer(f"model.layers.{i}.", cfg, g, dtype)
    mtp = _mtp(cfg, flavour, g, dtype, trunk, copies)
    path.mkdir(parents=True, exist_ok=True)
    save_file(trunk, str(path / "model-00001-of-00002.safetensors"))
    save_file(mtp, str(path / "model-00002-of-00002.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return trunk | mtp


DENSE = {
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
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "num_nextn_predict_layers": 2,
}
MOE = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 18,
    "hidden_size": 64,
    "intermediate_size": 160,
    "moe_intermediate_size": 48,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
}

CASES = {
    "dense-mimo-tied-fp32": (DENSE, "mimo", torch.float32, False),
    "moe-deepseek-untied-copies-fp32": (MOE, "deepseek_v3", torch.float32, True),
    "dense-deepseek-untied-bf16": (
        DENSE | {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False},
        "deepseek_v3",
        torch.bfloat16,
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_hf_mcore_hf_is_bit_exact(single_process, tmp_path, case):
    from safetensors.torch import load_file

    conv = _tool()
    cfg, flavour, dtype, copies = CASES[case]
    src = make_hf_checkpoint(tmp_path / "hf", cfg, flavour=flavour, dtype=dtype, copies=copies)
    path, margs = conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    assert path == tmp_path / "mcore" / "iter_0000000"
    assert (tmp_path / "mcore" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    assert state["model_args"]["mtp_num_layers"] == cfg["num_nextn_predict_layers"]
    assert state["model_args"]["params_dtype"] == ("bf16" if dtype is torch.bfloat16 else "fp32")
    assert state["hf_flavour"] == flavour  # detected from model_type / the tensor names
    assert margs.is_moe == bool(cfg.get("n_routed_experts"))

    out = conv.mcore_to_hf(tmp_path / "mcore", tmp_path / "back", mtp_embed_head_copies=copies)
    back = load_file(str(out / "model.safetensors"))
    assert sorted(back) == sorted(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    exported = json.loads((out / "config.json").read_text())
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_nextn_predict_layers",
        "tie_word_embeddings",
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
    ):
        if key in cfg:
            assert exported[key] == cfg[key], key
    # and the exported directory converts again to the same megatron tensors
    path2, margs2 = conv.hf_to_mcore(out, tmp_path / "mcore2")
    assert margs2 == margs


def test_refusals_name_the_reason(single_process, tmp_path):
    conv = _tool()
    mla = MOE | {"q_lora_rank": 1536, "kv_lora_rank": 512, "n_shared_experts": 1, "scoring_func": "sigmoid"}
    with pytest.raises(conv.ConversionError) as e:
        conv.model_args_from_hf_config(mla)
    for words in ("multi-latent attention", "shared experts", "scoring_func"):
        assert words in str(e.value)
    with pytest.raises(conv.ConversionError, match="head_dim 32"):
        conv.model_args_from_hf_config(DENSE | {"head_dim": 32})
    with pytest.raises(conv.ConversionError, match="linear biases"):
        conv.model_args_from_hf_config(DENSE | {"qkv_bias": True})
    with pytest.warns(conv.ConversionWarning, match="rms_norm_eps 1e-06"):
        conv.model_args_from_hf_config(DENSE | {"rms_norm_eps": 1e-6})
    # an HF tensor with no place in our model (a qkv bias) is named, not silently dropped
    make_hf_checkpoint(tmp_path / "hf", DENSE, flavour="mimo")
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(tmp_path / "hf" / "extra.safetensors"))
    with pytest.raises(conv.ConversionError, match=r"q_proj\.bias|linear_qkv\.bias"):
        conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")


def test_missing_mtp_layers_need_the_flag(single_process, tmp_path):
    """A model released without MTP weights (e.g. Moonlight) gets initialised MTP layers only on request."""
    from safetensors.torch import load_file

    conv = _tool()
    make_hf_checkpoint(tmp_path / "hf", MOE | {"num_nextn_predict_layers": 0}, flavour="deepseek_v3")
    with pytest.raises(conv.ConversionError, match="no HF source"):
        conv.hf_to_mcore(tmp_path / "hf", tmp_path / "a", mtp_num_layers=1)
    with pytest.warns(conv.ConversionWarning, match="MTP tensors keep"):
        _, margs = conv.hf_to_mcore(tmp_path / "hf", tmp_path / "b", mtp_num_layers=1, allow_missing_mtp=True)
    assert margs.mtp_num_layers == 1
    out = load_file(str(conv.mcore_to_hf(tmp_path / "b", tmp_path / "back") / "model.safetensors"))
    assert "model.layers.2.eh_proj.weight" in out


# ---------------------------------------------------------------------------------------------
# Against transformers reference models


REF_VOCAB_NOTE = """
The reference tests use a vocabulary that is already a multiple of --make-vocab-size-divisible-by.
Otherwise megatron's output layer has zero rows for the padding ids, whose logits (0) take part in
our log-softmax but not in HF's: with a tiny random model (logits near 0) that shifts every log-prob
by about log(64/18); with a trained model it is small but not zero (see the converter's docstring).
"""


def _our_main_logprobs(conv, save_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Load the converted checkpoint into a fresh model and score tokens[1:] with the main head."""
    from megatron_mtp_rl.models import ModelArgs, forward_logprobs, pack_sequences
    from megatron_mtp_rl.train.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state

    margs = ModelArgs(**read_trainer_state(latest_checkpoint(str(save_dir)))["model_args"])
    gpt = conv._build(margs, use_te=False)
    load_checkpoint(str(save_dir), gpt, None)
    gpt.eval()
    ids = tokens.tolist()
    batch, _ = pack_sequences([(ids[:1], ids[1:])], seq_length=len(ids))
    with torch.no_grad():
        out = forward_logprobs(gpt, batch, with_mtp=True)
    assert out.mtp_logprobs is not None  # the MTP heads ran on the converted weights
    return out.logprobs[0, : len(ids) - 1]


def _hf_logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=tokens[None]).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, tokens[1:, None])[:, 0]


def _randomise_norms(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def test_main_head_logprobs_equal_hf_llama(single_process, tmp_path):
    """Dense: transformers (5.24.0 when written) LlamaForCausalLM (GQA 4 heads / 2 KV heads, tied, rope base 50000)."""
    if transformers is None:
        pytest.skip("transformers is not installed")
    from safetensors.torch import save_file

    conv = _tool()
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=64,  # = the padded size: see REF_VOCAB_NOTE
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,  # megatron's layernorm_epsilon default, which our provider keeps
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},  # ≠ 10000: rope base must carry over
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        max_position_embeddings=64,
    )
    ref = LlamaForCausalLM(hf_cfg).eval()
    _randomise_norms(ref, 1)
    ref.save_pretrained(tmp_path / "hf")  # HF writes the names and config.json itself
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text()) | {"num_nextn_predict_layers": 1}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(2)
    mtp = _mtp(cfg, "mimo", g, torch.float32, {}, copies=False)
    save_file(mtp, str(tmp_path / "hf" / "mtp.safetensors"))

    with pytest.warns(conv.ConversionWarning, match="rope base 50000"):
        _, margs = conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", flavour="mimo")
    assert margs.rotary_base == 50000 and margs.num_query_groups == 2
    tokens = torch.randint(0, 64, (40,), generator=g)
    ours = _our_main_logprobs(conv, tmp_path / "mcore", tokens)
    theirs = _hf_logprobs(ref, tokens)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_main_head_logprobs_equal_hf_qwen2_moe(single_process, tmp_path):
    """MoE: transformers Qwen2MoeForCausalLM, 4 experts top-2 with normalised top-k weights, untied."""
    if transformers is None:
        pytest.skip("transformers is not installed")
    from safetensors.torch import load_file, save_file

    conv = _tool()
    torch.manual_seed(0)
    hf_cfg = Qwen2MoeConfig(
        vocab_size=64,  # = the padded size: see REF_VOCAB_NOTE
        hidden_size=64,
        intermediate_size=160,
        moe_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,  # megatron: softmax over the top-k logits
        qkv_bias=False,
        shared_expert_intermediate_size=0,  # zero-width shared expert: adds exactly 0
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    ref = Qwen2MoeForCausalLM(hf_cfg).eval()
    _randomise_norms(ref, 3)
    ref.save_pretrained(tmp_path / "saved")  # per-expert checkpoint names, written by transformers
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in saved
    shared = {n for n in saved if ".shared_expert" in n}
    assert all(saved[n].numel() == 0 for n in shared if "shared_expert_gate" not in n)
    trunk = {n: t for n, t in saved.items() if n not in shared}
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    cfg |= {"num_nextn_predict_layers": 1, "shared_expert_intermediate_size": 0, "n_routed_experts": 4}
    g = torch.Generator().manual_seed(4)
    mtp = _mtp(cfg | {"n_routed_experts": 4}, "deepseek_v3", g, torch.float32, trunk, copies=False)
    (tmp_path / "hf").mkdir()
    save_file(trunk | mtp, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))

    _, margs = conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", flavour="deepseek_v3")
    assert margs.num_experts == 4 and margs.moe_ffn_hidden_size == 48 and margs.untie_embeddings_and_output_weights
    tokens = torch.randint(0, 64, (40,), generator=g)
    ours = _our_main_logprobs(conv, tmp_path / "mcore", tokens)
    theirs = _hf_logprobs(ref, tokens)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The CLI and `mtp-rl train --load DIR --finetune`


def test_cli_convert_then_train_finetune_loads_it(tmp_path):
    """The printed flags make the trainer accept the converted checkpoint (1 RL step on the arith task)."""
    make_hf_checkpoint(tmp_path / "hf", DENSE, flavour="mimo")  # vocab 18 = the arith tokenizer's
    env = {"PATH": str(Path(sys.executable).parent), "CUDA_VISIBLE_DEVICES": "", "HOME": str(tmp_path)}
    conv = subprocess.run(
        [sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "hf-to-mcore", "--hf-dir", str(tmp_path / "hf"),
         "--save", str(tmp_path / "mcore")],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    assert conv.returncode == 0, conv.stderr
    line = next(x for x in conv.stdout.splitlines() if x.startswith("train from it with: "))
    flags = line.split("--finetune ", 1)[1].split()
    assert flags[:2] == ["--preset", "tiny-dense"]
    train = subprocess.run(
        [sys.executable, "-m", "megatron_mtp_rl.train", "--load", str(tmp_path / "mcore"), "--finetune", *flags,
         "--num-steps", "1", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--micro-batch-size", "4",
         "--num-eval-prompts", "4", "--reward-workers", "0", "--quiet", "--metrics-jsonl", str(tmp_path / "m.jsonl")],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines() if x.strip()]
    assert rows and rows[-1]["step"] == 1
