"""KV-cached generation and MTP self-speculative decoding."""

import itertools
import math

import pytest
import torch

from megatron_mtp_rl.models.generation import SamplingParams, generate


def _model(preset="tiny-dense", **overrides):
    from megatron_mtp_rl.models import build_model, get_preset

    torch.manual_seed(0)
    return build_model(get_preset(preset).with_overrides(**overrides))


def _naive_greedy(model, prompt, n):
    """Full recompute, no cache: argmax of the main head at the last position."""
    from megatron_mtp_rl.models import pack_sequences, unwrap

    gpt = unwrap(model)
    ids = list(prompt)
    for _ in range(n):
        batch, _ = pack_sequences([(ids, [])], len(ids))
        pre = gpt._preprocess(batch.tokens, batch.position_ids, None, None, None)
        h = gpt.decoder(hidden_states=pre[0], attention_mask=batch.attention_mask(), rotary_pos_emb=pre[1])
        logits = gpt.output_layer(h, weight=gpt.shared_embedding_or_output_weight())[0]
        ids.append(int(logits[-1, 0, :60].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_cached_batched_greedy_equals_full_recompute(single_process, preset):
    model = _model(preset)
    model.eval()
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3], [11]]
    sp = SamplingParams(temperature=0, max_new_tokens=6)
    with torch.no_grad():
        batched = generate(model, prompts, sp, vocab_size=60).responses
        ref = [_naive_greedy(model, p, 6) for p in prompts]
    assert batched == ref


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_speculative_greedy_is_identical_to_plain_greedy(single_process, preset):
    model = _model(preset, init_method_std=0.3)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3], [11], [3, 3]]
    sp = SamplingParams(temperature=0, max_new_tokens=12, eos_id=2)
    plain = generate(model, prompts, sp, vocab_size=60)
    spec = generate(model, prompts, sp, vocab_size=60, speculative=True)
    assert spec.responses == plain.responses
    for a, b in zip(spec.logprobs, plain.logprobs):
        assert a == pytest.approx(b, abs=1e-4)


def test_speculation_saves_rounds_for_a_single_row(single_process):
    model = _model()
    sp = SamplingParams(temperature=1.0, max_new_tokens=24)
    out = generate(model, [[5, 9, 2]], sp, vocab_size=60, speculative=True)
    assert len(out.responses[0]) == 24
    assert out.stats["rounds"] < 23 and out.stats["accept_len"] > 1.0
    assert out.stats["accept_len"] == pytest.approx(out.stats["row_accept_len"])


def _exact_joint(model, prompt, n, vocab, temperature):
    """P(x_1..x_n | prompt) for every sequence: one full forward per prefix, no cache."""
    from megatron_mtp_rl.models import pack_sequences, unwrap

    gpt = unwrap(model)
    table = {}
    for k in range(n):
        for prefix in itertools.product(range(vocab), repeat=k):
            ids = list(prompt) + list(prefix)
            b, _ = pack_sequences([(ids, [])], len(ids))
            with torch.no_grad():
                pre = gpt._preprocess(b.tokens, b.position_ids, None, None, None)
                h = gpt.decoder(hidden_states=pre[0], attention_mask=b.attention_mask(), rotary_pos_emb=pre[1])
                lg = gpt.output_layer(h, weight=gpt.shared_embedding_or_output_weight())[0][-1, 0, :vocab]
            table[prefix] = torch.softmax(lg.float() / temperature, -1)
    probs = {}
    for seq in itertools.product(range(vocab), repeat=n):
        p = 1.0
        for k in range(n):
            p *= float(table[seq[:k]][seq[k]])
        probs[seq] = p
    return probs


def _chi2(counts, probs, n):
    stat, df, rest_obs, rest_exp = 0.0, -1, 0, 0.0
    for seq, p in probs.items():
        e = n * p
        o = counts.get(seq, 0)
        if e < 5:
            rest_obs += o
            rest_exp += e
            continue
        stat += (o - e) ** 2 / e
        df += 1
    if rest_exp > 0:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        df += 1
    return stat, df


def test_speculative_sampling_matches_the_plain_distribution(single_process):
    vocab, n_new, N = 5, 3, 4000
    model = _model(vocab_size=vocab, make_vocab_size_divisible_by=8, init_method_std=0.5)
    prompt = [1, 3]
    exact = _exact_joint(model, prompt, n_new, vocab, temperature=1.0)
    assert abs(sum(exact.values()) - 1) < 1e-4
    sp = SamplingParams(temperature=1.0, max_new_tokens=n_new)
    results = {}
    for spec in (False, True):
        g = torch.Generator().manual_seed(1234)
        out = generate(model, [prompt] * N, sp, vocab_size=vocab, generator=g, speculative=spec)
        counts = {}
        for r in out.responses:
            counts[tuple(r)] = counts.get(tuple(r), 0) + 1
        stat, df = _chi2(counts, exact, N)
        results[spec] = (stat, df, out.stats)
        # χ² below df + 4·sqrt(2·df): a ~4σ bound, deterministic for this seed.
        assert stat < df + 4 * math.sqrt(2 * df), (spec, stat, df)
    # Drafts were both accepted and rejected: the acceptance test really ran.
    assert 1.0 < results[True][2]["row_accept_len"] < 3.0
