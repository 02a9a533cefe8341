"""gather_full_state on 2 gloo ranks (TP=2, EP=2) reproduces the TP=1/EP=1 full tensors.

Two independent checks per layout:
* bit-exact: with CPU initialisation the same seed builds the same master weights for any TP
  size, so the TP=2 gather must equal a TP=1 model's parameters bit for bit (this exercises the
  stride-2 SwiGLU ``linear_fc1`` split that a plain concatenation gets wrong);
* functional: the gathered tensors loaded into a TP=1/EP=1 model give the log-probs (main and
  MTP) the 2-rank model computed. EP needs this one: each EP rank initialises its local experts
  from the same CPU RNG stream, so EP=2 weights differ from EP=1 weights for one seed.

TP=2 and EP=2 run as separate layouts: on 2 processes, TP=2 × EP=2 would need expert-TP 1,
which the platform does not expose.
"""

import torch

from tests.dist_utils import run_ranks

# (preset, tp, ep, seed)
LAYOUTS = [("tiny-dense", 2, 1, 21), ("tiny-moe", 2, 1, 22), ("tiny-moe", 1, 2, 23)]


def _batch():
    from megatron_mtp_rl.models import pack_sequences
    from tests.distributed.workers import sequences

    return pack_sequences(sequences(6, seed=5), 24)[0]


def _logprobs(model):
    from megatron_mtp_rl.models import forward_logprobs

    model.eval()  # megatron refuses MoE + TP without sequence parallelism in training mode
    with torch.no_grad():
        out = forward_logprobs(model, _batch())
    return out.logprobs.clone(), out.mtp_logprobs.clone()


def _worker(rank, world, layouts):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.hf.mapping import gather_full_state
    from megatron_mtp_rl.models import build_model, get_preset

    results = {}
    for preset, tp, ep, seed in layouts:
        sizes = platform.ParallelSizes(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
        platform.initialize(sizes, seed=seed)
        model = build_model(get_preset(preset))
        full = gather_full_state(model)
        results[(preset, tp, ep)] = {
            "full": {k: v.clone() for k, v in full.items()},
            "local": {n: p.detach().clone() for n, p in model.named_parameters()},
            "logprobs": _logprobs(model),
        }
    return results


def test_gather_tp2_ep2_equals_tp1(tmp_path, single_process):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.hf.mapping import DEEPSEEK_V3, gather_full_state, hf_to_megatron, megatron_to_hf
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.state import load_full_state_dict

    ranks = run_ranks(_worker, 2, tmp_path, LAYOUTS)
    for preset, tp, ep, seed in LAYOUTS:
        key = (preset, tp, ep)
        got = [r[key] for r in ranks]
        platform.seed_everything(seed)
        ref_model = build_model(get_preset(preset))
        ref = gather_full_state(ref_model)
        for res in got:
            # Same names, same order, same shapes as TP=1/EP=1; both ranks hold the same result.
            assert list(res["full"]) == list(ref), key
            for name, t in ref.items():
                assert res["full"][name].shape == t.shape, (key, name)
                assert torch.equal(res["full"][name], got[0]["full"][name]), (key, name)
        if ep == 1:
            for name, t in ref.items():
                assert torch.equal(got[0]["full"][name], t), (key, name)
        else:
            # EP rank r's local expert i is global expert r * (E / ep) + i.
            num_local = ref_model.config.num_moe_experts // ep
            for r, res in enumerate(got):
                for name, t in res["local"].items():
                    if ".local_experts." in name:
                        head, tail = name.split(".local_experts.")
                        i, rest = tail.split(".", 1)
                        name = f"{head}.local_experts.{r * num_local + int(i)}.{rest}"
                    assert torch.equal(res["full"][name], t), (key, name)
        # Functional: the gathered state (also after an HF round trip) drives a TP=1 model to
        # the log-probs the 2-rank model produced.
        full = hf_to_megatron(
            megatron_to_hf(got[0]["full"], ref_model.config, DEEPSEEK_V3), ref_model.config, DEEPSEEK_V3
        )
        load_full_state_dict(ref_model, full)
        logprobs, mtp_logprobs = _logprobs(ref_model)
        torch.testing.assert_close(logprobs, got[0]["logprobs"][0], atol=1e-5, rtol=1e-5, msg=str(key))
        torch.testing.assert_close(mtp_logprobs, got[0]["logprobs"][1], atol=1e-5, rtol=1e-5, msg=str(key))
