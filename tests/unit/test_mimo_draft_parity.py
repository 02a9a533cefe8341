"""Our MiMo MTP head computes what SGLang 0.5.23's ``MiMoMTP`` drafts with, on a packed batch.

The reference below is SGLang's draft-extend path written in torch, step by step with the line it
follows (``sglang/srt/models/mimo_mtp.py`` and ``sglang/srt/speculative/eagle_worker_v2.py`` of the
0.5.23 wheel); the decoder layer is transformers' ``Qwen2DecoderLayer`` (SGLang's ``Qwen2DecoderLayer``
computes the same: pre-norm attention with neox RoPE, pre-norm SwiGLU MLP, residuals added). The
model is a random MiMo release (tests/hf_release.py) converted by tools/convert_checkpoint.py.
"""

from __future__ import annotations

import json

import pytest
import torch

# Import the HF model code before our CPU shims (see test_convert_checkpoint.py).
import transformers

from tests.hf_release import make_release
from tests.tool_loader import load_tool

REQUESTS = [[5, 17, 3, 99, 42, 8, 61], [7, 7, 120, 33, 2], [88, 1, 14, 15, 92, 65, 35, 89, 97]]


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def sglang_mimo_draft_extend(hf_dir, requests: list[list[int]], *, mask_position_0: bool = True) -> list:
    """Per request, the depth-1 draft's log-prob of token ``p + 2`` at position ``p`` (``p = 0 .. n-3``),
    computed as SGLang does for ONE packed extend batch of ``requests`` (no cached prefix)."""
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors |= load_file(str(f))
    eps = cfg["rms_norm_eps"]
    target = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # Target extend: spec_info.hidden_states = the target's final (normed) hidden states, requests flattened
    # (MiMoForCausalLM.forward hands Qwen2Model's output to the logits processor, which captures it).
    hidden = torch.cat([target.model(input_ids=torch.tensor([r])).last_hidden_state[0] for r in requests])
    # eagle_worker_v2.py _draft_extend_for_prefill: per request, input_ids[1:] + the target's next token
    # (its draft output is not compared here, so any id stands in for it).
    input_ids = torch.cat([torch.tensor(r[1:] + [0]) for r in requests])
    # ForwardBatch.positions of an extend without prefix: 0 .. n-1 per request.
    positions = torch.cat([torch.arange(len(r)) for r in requests])
    p = "model.mtp_layers.0."
    # mimo_mtp.py:58-61  hidden_states = self.embed_tokens(input_ids)
    h = torch.nn.functional.embedding(input_ids, tensors["model.embed_tokens.weight"])
    # mimo_mtp.py:62-63  "masking inputs at position 0, as not needed by MTP": hidden_states[positions == 0] = 0
    if mask_position_0:
        h[positions == 0] = 0
    # mimo_mtp.py:65-73  input_proj(cat(hidden_layernorm(spec_info.hidden_states), token_layernorm(hidden_states)))
    cat = torch.cat((_rms(hidden, tensors[p + "hidden_layernorm.weight"], eps),
                     _rms(h, tensors[p + "token_layernorm.weight"], eps)), -1)  # fmt: skip
    x = cat @ tensors[p + "input_proj.weight"].t()
    # mimo_mtp.py:75-82  mtp_block = Qwen2DecoderLayer(positions, hidden_states); residual folded back in.
    # RadixAttention's extend attends causally within each request only.
    layer = transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer(target.config, layer_idx=0).eval()
    own = layer.state_dict()
    layer.load_state_dict({n: tensors[p + n] for n in own})
    out, start = [], 0
    for r in requests:
        n = len(r)
        xr, pos = x[None, start : start + n], positions[None, start : start + n]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        y = layer(xr, attention_mask=mask, position_ids=pos, position_embeddings=target.model.rotary_emb(xr, pos))
        out.append((y[0] if isinstance(y, tuple) else y)[0])
        start += n
    y = torch.cat(out)
    # mimo_mtp.py:83  final_layernorm; MiMoMTP.forward:117-120  logits = lm_head(hidden_states)
    logits = _rms(y, tensors[p + "final_layernorm.weight"], eps) @ tensors["lm_head.weight"].t()
    logp = torch.log_softmax(logits, -1)
    result, start = [], 0
    for r in requests:
        n = len(r)
        result.append(logp[start : start + n - 2].gather(-1, torch.tensor(r[2:])[:, None])[:, 0])
        start += n
    return result


@pytest.fixture(scope="module")
def mimo(tmp_path_factory, single_process):
    root = tmp_path_factory.mktemp("mimo")
    shape = dict(hidden=64, layers=2, experts=0, mtp_layers=1, shards=2)
    hf = make_release(root / "hf", "mimo", dtype="fp32", seed=5, **shape)
    _, margs = load_tool("convert_checkpoint").hf_to_mcore(hf, root / "mcore")
    gpt, _, _ = load_tool("convert_checkpoint")._load_model(root / "mcore")
    return hf, margs, gpt.eval()


def _ours(gpt) -> list:
    """Depth-1 log-probs of token p+2 at position p, all requests packed into ONE row."""
    from megatron_mtp_rl.models import forward_logprobs, pack_sequences

    batch, where = pack_sequences([(r[:1], r[1:]) for r in REQUESTS], seq_length=24)
    assert batch.shape[0] == 1 and len({row for row, _, _ in where}) == 1
    with torch.no_grad():
        out = forward_logprobs(gpt, batch)
    # label frame: index i holds depth 1 at position i-1 scoring labels[i] = tokens[i+1]
    return [out.mtp_logprobs[0, 0, start + 1 : start + n - 1] for _, start, n in where]


def test_mimo_mtp_head_equals_sglang_draft_on_a_packed_batch(mimo):
    hf, margs, gpt = mimo
    assert margs.mtp_zero_first_embedding  # set by the MiMo family from config.json
    ours = _ours(gpt)
    want = sglang_mimo_draft_extend(hf, REQUESTS)
    for o, w in zip(ours, want):
        assert (o - w).abs().max().item() <= 1e-4, (o - w).abs().max()
    # SGLang's mask matters, at every packed sequence's start (not only the row's): without it the draft differs
    unmasked = sglang_mimo_draft_extend(hf, REQUESTS, mask_position_0=False)
    for o, u in zip(ours, unmasked):
        assert (o - u).abs()[0].item() > 1e-3
    # and it is the only difference: megatron's plain MTP layer (the flag off) is the unmasked draft
    gpt.mtp_zero_first_embedding = False
    try:
        plain = _ours(gpt)
    finally:
        gpt.mtp_zero_first_embedding = True
    for o, u in zip(plain, unmasked):
        assert (o - u).abs().max().item() <= 1e-4
