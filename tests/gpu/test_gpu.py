"""GPU checks (``make test-gpu``): Transformer Engine + bf16, THD packing, the distributed
optimizer, speculative decoding on CUDA. Every test carries the ``gpu`` marker and skips,
saying why, where CUDA is absent (always in ``make test``: tests/conftest.py hides CUDA).

Job-level checks run the CLI in a subprocess (one NCCL process group per job); model-level
checks build tiny models in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--global-batch-size", "8",
    "--micro-batch-size", "8", "--num-eval-prompts", "8", "--eval-interval", "100", "--quiet",
]  # fmt: skip


def _cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    cmd = [sys.executable, "-m", "megatron_mtp_rl.cli", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cuda_group():
    from megatron.core import parallel_state

    from megatron_mtp_rl import platform

    if not parallel_state.model_parallel_is_initialized():
        platform.initialize(seed=1234)
    yield


def test_rl_step_with_transformer_engine_and_bf16(tmp_path):
    pytest.importorskip("transformer_engine")
    out = tmp_path / "m.jsonl"
    _cli("train", "--preset", "tiny-moe", "--bf16", "--transformer-impl", "transformer_engine",
         "--num-steps", "2", "--metrics-jsonl", str(out), *TINY)  # fmt: skip
    rows = [r for r in _rows(out) if r["step"] > 0]
    assert len(rows) == 2
    for key in ("train/loss", "train/grad_norm", "mtp/accept_1", "occ/lambda_1"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert rows[-1]["train/skipped_steps"] == 0


def test_cpu_fp32_and_gpu_bf16_log_probs_agree(tmp_path):
    """The same weights scored on CPU in fp32 and on CUDA in bf16 (local spec on both sides:
    identical parameter names). Tolerance: bf16 has 8 mantissa bits; per-token log-prob error
    of a 2-layer model stays well under 0.1 nats, mean under 0.02."""
    script = tmp_path / "score.py"
    script.write_text(
        "import sys, torch\n"
        "from megatron_mtp_rl import platform\n"
        "from megatron_mtp_rl.models import build_model, forward_logprobs, get_preset, pack_sequences\n"
        "platform.initialize(seed=5)\n"
        "cuda = torch.cuda.is_available()\n"
        "args = get_preset('tiny-dense').with_overrides(vocab_size=64, seq_length=32,"
        " params_dtype='bf16' if cuda else 'fp32')\n"
        "model = build_model(args, use_te=False)\n"
        "if cuda:\n"
        "    sd = torch.load(sys.argv[1])\n"
        "    model.load_state_dict({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()},"
        " strict=False)\n"
        "else:\n"
        "    torch.save(model.state_dict(), sys.argv[1])\n"
        "g = torch.Generator().manual_seed(0)\n"
        "seqs = [(torch.randint(1, 64, (5,), generator=g).tolist(), torch.randint(1, 64, (9,), generator=g).tolist())"
        " for _ in range(6)]\n"
        "batch, _ = pack_sequences(seqs, 32)\n"
        "model.eval()\n"
        "with torch.no_grad():\n"
        "    out = forward_logprobs(model, batch.to(platform.device()))\n"
        "torch.save({'lp': out.logprobs.float().cpu(), 'mask': out.loss_mask.cpu(),"
        " 'mtp': out.mtp_logprobs.float().cpu(), 'mtp_mask': out.mtp_mask.cpu()}, sys.argv[2])\n"
    )
    weights, cpu_out, gpu_out = tmp_path / "w.pt", tmp_path / "cpu.pt", tmp_path / "gpu.pt"
    env_cpu = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for env, out in ((env_cpu, cpu_out), (dict(os.environ), gpu_out)):
        res = subprocess.run([sys.executable, str(script), str(weights), str(out)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = torch.load(cpu_out), torch.load(gpu_out)
    m = a["mask"]
    diff = (a["lp"] - b["lp"])[m].abs()
    mtp_diff = (a["mtp"] - b["mtp"])[a["mtp_mask"]].abs()
    print(f"main: max {diff.max():.4f} mean {diff.mean():.4f}; mtp: max {mtp_diff.max():.4f}")
    assert diff.max() < 0.1 and diff.mean() < 0.02
    assert mtp_diff.max() < 0.1


def test_thd_packing_equals_per_sequence(cuda_group):
    """On the Transformer Engine path a packed batch runs as THD (cu_seqlens), not with the
    block-diagonal mask TE's causal mask type would ignore: packed == each sequence alone."""
    pytest.importorskip("transformer_engine")
    from megatron_mtp_rl.models import build_model, forward_logprobs, get_preset, pack_sequences

    args = get_preset("tiny-dense").with_overrides(vocab_size=64, seq_length=48)
    model = build_model(args, use_te=True).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [
        (torch.randint(1, 64, (n,), generator=g).tolist(), torch.randint(1, 64, (m,), generator=g).tolist())
        for n, m in ((4, 7), (6, 3), (3, 9), (5, 5))
    ]
    packed, where = pack_sequences(seqs, 48)
    assert packed.shape[0] < len(seqs)  # several sequences share a row
    with torch.no_grad():
        out = forward_logprobs(model, packed.cuda())
        for seq, (row, start, n) in zip(seqs, where):
            alone, _ = pack_sequences([seq], 48)
            ref = forward_logprobs(model, alone.cuda())
            m = alone.loss_mask[0, :n]
            close = dict(rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out.logprobs[row, start : start + n][m], ref.logprobs[0, :n][m], **close)
            for k in range(out.mtp_logprobs.shape[0]):
                mk = ref.mtp_mask[k, 0, :n]
                got = out.mtp_logprobs[k, row, start : start + n][mk]
                torch.testing.assert_close(got, ref.mtp_logprobs[k, 0, :n][mk], **close)


def test_gae_critic_with_transformer_engine_bf16_and_the_distributed_optimizer(tmp_path):
    pytest.importorskip("transformer_engine")
    out = tmp_path / "m.jsonl"
    _cli("train", "--preset", "tiny-dense", "--bf16", "--transformer-impl", "transformer_engine",
         "--use-distributed-optimizer", "--advantage-estimator", "gae", "--critic-warmup-steps", "1",
         "--num-steps", "2", "--metrics-jsonl", str(out), *TINY)  # fmt: skip
    rows = [r for r in _rows(out) if r["step"] > 0]
    assert len(rows) == 2 and "train/loss" not in rows[0]  # warm-up step: the critic only
    for key in ("critic/value_loss", "critic/values_mean", "critic/grad_norm"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert torch.isfinite(torch.tensor(rows[1]["train/loss"]))


def test_distributed_optimizer_save_and_exact_resume(tmp_path):
    common = ["--preset", "tiny-moe", "--bf16", "--use-distributed-optimizer", "--seed", "3", *TINY]
    straight, first, resumed = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    _cli("train", *common, "--num-steps", "4", "--metrics-jsonl", str(straight))
    _cli("train", *common, "--num-steps", "2", "--save", str(tmp_path / "ck"), "--metrics-jsonl", str(first))
    _cli("train", *common, "--num-steps", "4", "--load", str(tmp_path / "ck"), "--metrics-jsonl", str(resumed))
    a = {r["step"]: r for r in _rows(straight)}
    b = {r["step"]: r for r in _rows(resumed)}
    for step in (3, 4):
        for key in ("train/loss", "rollout/reward_mean", "train/param_norm_main", "occ/lambda_1"):
            assert a[step][key] == b[step][key], (step, key)


def test_speculative_decoding_is_exact_on_cuda(cuda_group):
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.generation import SamplingParams, generate

    args = get_preset("tiny-moe").with_overrides(vocab_size=64, seq_length=64)
    model = build_model(args)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 64, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (16,), generator=g)]
    params = SamplingParams(temperature=0.0, max_new_tokens=24, eos_id=None)
    plain = generate(model, prompts, params, vocab_size=64)
    spec = generate(model, prompts, params, vocab_size=64, speculative=True)
    assert spec.responses == plain.responses
    assert spec.stats["row_accept_len"] >= 1.0


def test_colocated_offload_frees_the_gpu_and_restores_bit_for_bit(cuda_group):
    """The colocated hand-off's trainer side on CUDA: offload frees every parameter, gradient and
    Adam-state storage (allocated bytes drop by at least their size), onload restores them exactly."""
    from megatron_mtp_rl.cluster.offload import TrainerOffload, _tensors, gpu_memory_gb
    from tests.unit.test_offload import _model_and_optimizer, _step

    model, optimizer = _model_and_optimizer()
    _step(model, optimizer)
    before = [t.detach().clone() for t in _tensors(model, optimizer)]
    hand = TrainerOffload(model, optimizer)
    held = hand.resident_bytes()
    side = gpu_memory_gb()  # the hand-off's per-side metric: the trainer's peak covers what it holds
    assert side["trainer_peak_gb"] * 2**30 >= held and side["others_gb"] >= 0.0
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    hand.offload()
    freed = allocated - torch.cuda.memory_allocated()
    print(f"offload freed {freed / 2**20:.1f} MiB of {held / 2**20:.1f} MiB held")
    assert hand.resident_bytes() == 0 and freed >= held
    hand.onload()
    after = list(_tensors(model, optimizer))
    same = [
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) for a, b in zip(before, after)
    ]
    assert len(after) == len(before) and all(same)


def test_r3_with_the_real_sglang_server(tmp_path):
    """--use-rollout-routing-replay against a real SGLang 0.5.23 (--enable-return-routed-experts
    pins host memory through CUDA: it dies at start-up on CPU, so this is the only check of the real
    answer's layout end to end). The engine and the trainer hold the same weights: most routes agree."""
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed in this environment")
    out = tmp_path / "m.jsonl"
    _cli("train", "--preset", "tiny-moe", "--rollout-engine", "sglang", "--rollout-num-engines", "1",
         "--use-rollout-routing-replay", "--num-steps", "1", "--rollout-hf-dir", str(tmp_path / "hf"),
         "--metrics-jsonl", str(out), *TINY, timeout=900)  # fmt: skip
    rows = [r for r in _rows(out) if r["step"] > 0]
    assert rows and 0.5 < rows[-1]["rollout/routing_agreement"] <= 1.0
    assert rows[-1]["rollout/mismatch_kl"] >= 0.0
