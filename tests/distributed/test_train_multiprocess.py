"""The main job on 2 gloo processes with the local engine: DP=2, TP=2 (dense), EP=2 (MoE); λ is identical on both ranks.

EP=2 used to end in the θ_old pass: generation ran under ``torch.inference_mode``, so the buffer megatron's
token dispatcher caches for its EP all-gather was an inference tensor, and the trainer's gather into it failed.
The EP=2 ranks then generate different prompts in lockstep (models/lockstep.py): other row counts, prompt
widths and finishing steps, plain and self-speculative, each equal to generating its prompts on both ranks.
"""

import math

import pytest

from tests.dist_utils import run_ranks
from tests.e2e.test_train import FAST


def _worker(rank, world, extra, out_dir):
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.loop import run_training

    cfg = parse_config([*FAST, "--num-steps", "2", "--metrics-jsonl", f"{out_dir}/m.jsonl", *extra])
    history = run_training(cfg)
    return history, _lockstep_generation(rank) if "--expert-model-parallel-size" in extra else None


X = [[3, 5, 7]]  # rank 0: one row of 3 tokens
Y = [[2, 4, 6, 8, 9], [1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4, 3]]  # rank 1: three rows, up to 7 tokens


def _lockstep_generation(rank: int) -> dict:
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.generation import SamplingParams, generate

    margs = get_preset("tiny-moe")
    gpt = build_model(margs)

    def gen(prompts, params, spec=False):
        return generate(gpt, prompts, params, vocab_size=margs.vocab_size, speculative=spec).responses

    eos = gen(X, SamplingParams(temperature=0.0, max_new_tokens=1))[0][0]  # rank 0's rows finish at once
    params = SamplingParams(temperature=0.0, max_new_tokens=6, eos_id=eos)
    mine = X if rank == 0 else Y
    return {"own": gen(mine, params), "own_spec": gen(mine, params, True), "x": gen(X, params), "y": gen(Y, params)}


LAYOUTS = {
    "dp2": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    # micro-batches smaller than a generation batch (as at any real size): the trainer reuses what generation cached
    "ep2-moe": ["--preset", "tiny-moe", "--expert-model-parallel-size", "2", "--micro-batch-size", "1"],
}


# DP=2 alone is slow: the OCC reducer and the NaN-step tests keep a fast two-rank data-parallel run
@pytest.mark.parametrize(
    "extra",
    [pytest.param(v, marks=pytest.mark.slow) if k == "dp2" else v for k, v in LAYOUTS.items()],
    ids=list(LAYOUTS),
)
def test_two_process_job(tmp_path, extra):
    (a, gen_a), (b, gen_b) = run_ranks(_worker, 2, tmp_path, extra, str(tmp_path))
    assert [h["step"] for h in a] == [0, 1, 2]
    for ha, hb in zip(a[1:], b[1:]):
        for k in ("occ/lambda_1", "occ/lambda_2"):
            assert ha[k] == hb[k] and math.isfinite(ha[k])
        assert ha["train/grad_norm"] == hb["train/grad_norm"]
        assert ha["train/param_norm_main"] == pytest.approx(hb["train/param_norm_main"], rel=1e-6)
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 3  # one writer
    if gen_a is not None:
        assert gen_a["own"] == gen_a["own_spec"] == gen_a["x"] and len(gen_a["own"]) == 1
        assert gen_b["own"] == gen_b["own_spec"] == gen_b["y"] and len(gen_b["own"]) == 3
        assert len(gen_a["own"][0]) == 1 < max(map(len, gen_b["own"])), (gen_a, gen_b)  # rank 1 stepped on alone
