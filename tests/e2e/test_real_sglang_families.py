"""Our exports, served by the real SGLang 0.5.23 on CPU, compute what our trainer computes.

For each family whose SGLang class runs on CPU (MiMo, Qwen3, Qwen3-MoE, GLM-4.5) a tiny RANDOM model
of ours is exported the way rollouts export it (``export_hf``) and served by the session's real engine
(tests/real_sglang.py) in fp32:

* SGLang's prompt log-probs (``input_token_logprobs``) equal our trainer's forward within 1e-4;
* SGLang's greedy continuation equals our local engine's (``models.generation.generate``, temperature 0).

DeepSeek-V3 is GPU-only: megatron's MLA and SGLang's MLA attention backends both need CUDA.
GLM-4.5 runs in ``make test`` (the demo's family, whose export SGLang once served with a zero LM head);
the other families restart the engine on their architecture and are ``slow``.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.real_sglang import export_family

PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14, 70, 33, 2]
NEW_TOKENS = 8
FAST_FAMILY = "glm4_moe"


def trainer_prompt_logprobs(model, ids: list[int], vocab: int) -> list[float]:
    """Our trainer's forward (fp32): log p(x_t | x_<t) for t = 1 .."""
    from megatron_mtp_rl.models.forward import gpt_forward, output_logits

    tokens = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    mask = ~torch.ones(len(ids), len(ids), dtype=torch.bool).tril()[None, None]
    model.eval()
    with torch.no_grad():
        hidden = gpt_forward(model, tokens, pos, mask, with_mtp=False).hidden
        logp = torch.log_softmax(output_logits(model, hidden, gather=True)[:, 0, :vocab].float(), -1)
    return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def local_greedy(model, ids: list[int], vocab: int, n: int) -> list[int]:
    from megatron_mtp_rl.models.generation import generate
    from megatron_mtp_rl.models.sampling_params import SamplingParams

    out = generate(model, [ids], SamplingParams(temperature=0.0, max_new_tokens=n, eos_id=None), vocab_size=vocab)
    return [int(t) for t in out.responses[0]]


def check_family(real_sglang, tmp_path, family: str) -> float:
    """Serve ``family``'s export; returns the largest |SGLang - trainer| prompt log-prob gap."""
    out, model, margs = export_family(tmp_path, family)
    real_sglang.serve(out)
    greedy = real_sglang.generate(PROMPT, max_new_tokens=NEW_TOKENS)["output_ids"]
    assert greedy == local_greedy(model, PROMPT, margs.vocab_size, NEW_TOKENS), family
    seq = PROMPT + greedy  # random tokens (unlikely) then the model's own choices (likely)
    ours = trainer_prompt_logprobs(model, seq, margs.vocab_size)
    theirs = real_sglang.prompt_logprobs(seq)
    diff = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    print(f"\n{family}: max |SGLang - trainer| prompt log-prob = {diff:.2e} over {len(ours)} tokens")
    assert diff <= 1e-4, f"{family}: prompt log-probs differ by {diff:.3g}\nours   {ours}\nsglang {theirs}"
    uniform = -math.log(margs.vocab_size)  # a zero or wrong head would sit near here
    assert max(ours) > -0.5 and min(ours) < uniform - 1.0, ours
    return diff


@pytest.mark.sglang
def test_glm45_export_served_by_real_sglang_matches_the_trainer(single_process, real_sglang, tmp_path):
    check_family(real_sglang, tmp_path, FAST_FAMILY)


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.parametrize("family", ["mimo", "qwen3", "qwen3_moe"])
def test_export_served_by_real_sglang_matches_the_trainer(single_process, real_sglang, tmp_path, family):
    check_family(real_sglang, tmp_path, family)
