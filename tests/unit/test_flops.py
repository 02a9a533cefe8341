"""The trainer's FLOPs count against a hand count, and the throughput metrics of known micro-batches."""

import pytest

from megatron_mtp_rl.models import pack_sequences
from megatron_mtp_rl.models.presets import ModelArgs
from megatron_mtp_rl.train.flops import default_peak_tflops, forward_flops, step_flops
from megatron_mtp_rl.train.throughput import real_lengths


def test_flops_match_a_hand_count():
    m = ModelArgs(num_layers=1, hidden_size=4, num_attention_heads=2, ffn_hidden_size=6, vocab_size=10,
                  mtp_num_layers=1)  # fmt: skip
    lengths = [3, 2]  # 5 tokens; causal pairs 3·4/2 + 2·3/2 = 9
    # per token: q,k,v 2·4·(4+4+4) = 96, out 2·4·4 = 32, SwiGLU 3·2·4·6 = 144; per pair 2·(2·2·2) = 16
    layer = (96 + 32 + 144) * 5 + 16 * 9  # 1504
    output = 2 * 4 * 10 * 5  # 400
    trunk = layer + output  # 1904
    mtp = 2 * 8 * 4 * 5 + layer + output  # eh_proj + its layer + its output layer: 2224
    f = forward_flops(m, lengths, with_mtp=True)
    assert (f["trunk"], f["mtp"], f["recompute"]) == (trunk, mtp, 0)
    assert forward_flops(m, lengths, with_mtp=False)["mtp"] == 0
    # θ_old forward + update (forward + 2× backward) [+ reference trunk] [+ full recompute of both layers]
    assert step_flops(m, lengths, with_mtp=True, recompute=None, reference=False) == 4 * (trunk + mtp)
    assert (
        step_flops(m, lengths, with_mtp=True, recompute="full", reference=True) == 4 * (trunk + mtp) + trunk + 2 * layer
    )
    moe = ModelArgs(num_layers=1, hidden_size=4, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=6,
                    vocab_size=10, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=3,
                    moe_shared_expert_intermediate_size=5)  # fmt: skip
    # GQA (1 group): q,k,v 2·4·(4+2+2) = 64; router 2·4·4 = 32, 2 experts 2·(3·2·4·3) = 144, shared 3·2·4·5 = 120
    moe_layer = (64 + 32 + 32 + 144 + 120) * 5 + 16 * 9
    assert forward_flops(moe, lengths, with_mtp=False)["trunk"] == moe_layer + output
    assert default_peak_tflops("NVIDIA H200") == 989.0 and default_peak_tflops("NVIDIA GB200") == 2500.0
    assert default_peak_tflops(None) is None and default_peak_tflops("Some CPU") is None


def test_throughput_metrics_of_known_micro_batches(single_process):
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.throughput import throughput_metrics

    cfg = parse_config(["--preset", "tiny-dense"])
    a, _ = pack_sequences([([1, 2], [3, 4, 5]), ([6], [7, 8])], 8, rows=2)  # 8 real of 16 positions
    b, _ = pack_sequences([([1, 2, 3], [4, 5, 6, 7, 8])], 8)  # 8 of 8
    assert real_lengths(a) == [5, 3] and real_lengths(b) == [8]
    args = ModelArgs(num_layers=1, hidden_size=4, num_attention_heads=2, ffn_hidden_size=6, vocab_size=10)
    m = throughput_metrics(cfg, args, [a, b], with_mtp=False, train_time=2.0, step_time=4.0)
    assert m["perf/tokens_per_s"] == 16 / 4.0
    assert m["perf/padding_fraction"] == pytest.approx(8 / 24)
    assert m["perf/dp_token_imbalance"] == 1.0  # one DP rank
    flops = step_flops(args, [5, 3, 8], with_mtp=False, recompute=None, reference=False)
    assert m["perf/tflops_per_gpu"] == pytest.approx(flops / 2.0 / 1e12)
    assert "perf/mfu" not in m  # CPU: no peak unless --peak-tflops
    peak = throughput_metrics(cfg.replace(log__peak_tflops=1e-9), args, [a], with_mtp=False, train_time=1.0,
                              step_time=1.0)  # fmt: skip
    assert peak["perf/mfu"] == pytest.approx(peak["perf/tflops_per_gpu"] / 1e-9)
