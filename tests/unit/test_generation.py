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


def _full_logits(model, ids, depth=0):
    """Logits [S, V] of the main head (depth 0) or MTP depth k over ``ids``: the one forward, no cache."""
    from megatron_mtp_rl.models import pack_sequences
    from megatron_mtp_rl.models.forward import gpt_forward, output_logits

    b, _ = pack_sequences([(list(ids), [])], len(ids))
    with torch.no_grad():
        out = gpt_forward(model, b.tokens, b.position_ids, b.attention_mask(), with_mtp=depth > 0)
        h = out.mtp_hidden[depth - 1] if depth else out.hidden
        return output_logits(model, h)[:, 0]


def _naive_greedy(model, prompt, n):
    """Full recompute, no cache: argmax of the main head at the last position."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_full_logits(model, ids)[-1, :60].argmax()))
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
    table = {}
    for k in range(n):
        for prefix in itertools.product(range(vocab), repeat=k):
            lg = _full_logits(model, list(prompt) + list(prefix))[-1, :vocab]
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


@pytest.mark.parametrize("depths", [2, 3])
def test_kv_cached_mtp_drafts_equal_a_full_recompute(single_process, monkeypatch, depths):
    """Every draft logit of every depth, in every round of a batched sampled run with per-row
    acceptance (gaps in the cache), equals the MTP block re-run over the row's whole sequence."""
    from megatron_mtp_rl.models import generation

    model = _model(init_method_std=0.3, mtp_num_layers=depths)
    rounds = []
    original = generation._Runner.draft

    def recording(self, end, last, depths, generator):
        drafts, logits = original(self, end, last, depths, generator)
        rounds.append((self.seq.clone(), self.lens.clone(), logits.clone()))
        return drafts, logits

    monkeypatch.setattr(generation._Runner, "draft", recording)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3], [11]]
    out = generate(model, prompts, SamplingParams(temperature=1.0, max_new_tokens=10), vocab_size=60, speculative=True)
    assert 1.0 < out.stats["accept_len"] < depths + 1  # drafts were both accepted and rejected: gaps exist
    assert len(rounds) >= 4
    for seq, lens, logits in rounds:
        for b in range(len(prompts)):
            n = int(lens[b])  # position of the pending token: the drafts are for n+1, n+2
            for k in range(1, depths + 1):
                ref = _full_logits(model, seq[b, : n + k].tolist(), depth=k)[n - 1]
                torch.testing.assert_close(logits[b, k - 1], ref, atol=1e-4, rtol=1e-4)  # fp32 summation order


def test_each_row_advances_by_its_own_accepted_length(single_process):
    """Batched greedy speculation takes as many rounds as its slowest row alone (a batch that
    committed only the prefix every row accepted would take more) and emits the same tokens."""
    # A 6-token vocabulary: a random model's drafts agree with the main head often enough.
    model = _model(vocab_size=6, make_vocab_size_divisible_by=8, init_method_std=0.5)
    prompts = [[5, 1, 2], [0, 1, 4, 4, 3, 3], [1], [3, 3], [1, 2, 3, 4]]
    sp = SamplingParams(temperature=0, max_new_tokens=16)
    alone = [generate(model, [p], sp, vocab_size=6, speculative=True) for p in prompts]
    batched = generate(model, prompts, sp, vocab_size=6, speculative=True)
    assert batched.responses == [a.responses[0] for a in alone]
    assert batched.stats["rounds"] == max(a.stats["rounds"] for a in alone)
    # Rows differ in acceptance, so waiting for every row would cost rounds.
    assert len({a.stats["rounds"] for a in alone}) > 1
    mean_alone = sum(a.stats["accept_len"] * a.stats["rounds"] for a in alone) / sum(a.stats["rounds"] for a in alone)
    assert batched.stats["accept_len"] == pytest.approx(mean_alone)
