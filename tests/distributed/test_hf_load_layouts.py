"""Direct HF loading and the converter under 2 gloo ranks, against convert-then-load in one process.

Releases are tiny random HF checkpoints laid out as the hub serves them (tests/hf_release.py: shards +
index, bf16 with GLM's fp32 router bias, MTP layers). For each family and layout (TP=2, PP=2, EP=2)
both ranks build their shard of the model twice: once filled by ``load_hf`` straight from the HF
directory, once from the checkpoint ``hf-to-mcore`` wrote in one process — every tensor must be equal,
bit for bit, and no rank may read any HF tensor twice. Then ``hf-to-mcore`` itself runs on the two
ranks (EP=2 for GLM-4.5, PP=2 for Qwen3-MoE) and its checkpoint must equal the one-process one, and
``mcore-to-hf`` on the two ranks must write the one-process export's tensors.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.tool_loader import load_tool

# family → (release kwargs, layouts (tp, pp, ep) checked, the layout the 2-rank converter runs)
CASES = {
    "mimo": (dict(hidden=64, layers=2, experts=0, mtp_layers=2, shards=2), [(2, 1, 1), (1, 2, 1)], None),
    "qwen3_moe": (dict(hidden=64, layers=2, experts=4, mtp_layers=1, shards=3), [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
                  (1, 2, 1)),
    "glm4_moe": (dict(hidden=64, layers=4, experts=4, mtp_layers=1, shards=3), [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
                 (1, 1, 2)),
}  # fmt: skip


@pytest.fixture(scope="module")
def releases(tmp_path_factory, single_process):
    """family → (HF dir, one-process converted checkpoint dir)."""
    from tests.hf_release import make_release

    tool = load_tool("convert_checkpoint")
    out = {}
    for family, (kw, _, _) in CASES.items():
        root = tmp_path_factory.mktemp(family)
        hf = make_release(root / "hf", family, seed=3, **kw)
        tool.hf_to_mcore(hf, root / "mcore")  # --dtype auto: bf16 weights, GLM's fp32 bias kept
        out[family] = (str(hf), str(root / "mcore"))
    return out


def _hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _local_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _worker(rank, world, releases, out_root):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.hf.load import load_hf
    from megatron_mtp_rl.hf.reader import HFCheckpoint
    from megatron_mtp_rl.models import build_model
    from megatron_mtp_rl.models.presets import ModelArgs
    from megatron_mtp_rl.train.checkpoint import load_checkpoint
    from megatron_mtp_rl.train.saved_args import saved_model_args

    tool = load_tool("convert_checkpoint")
    results = {}
    for family, (hf, mcore) in releases.items():
        margs = ModelArgs(**saved_model_args(mcore))
        for tp, pp, ep in CASES[family][1]:
            platform.initialize(platform.ParallelSizes(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                       expert_model_parallel_size=ep), seed=7)  # fmt: skip
            direct = build_model(margs, device="cpu")
            ckpt = HFCheckpoint(hf)
            report = load_hf(direct, hf, ckpt=ckpt)
            converted = build_model(margs, device="cpu")
            load_checkpoint(mcore, converted, None)
            a, b = _local_state(direct), _local_state(converted)
            results[(family, tp, pp, ep)] = {
                "differ": sorted(k for k in b if not torch.equal(a[k], b[k])),
                "same_keys": sorted(a) == sorted(b),
                "tensors": report.tensors,
                "max_reads": max(ckpt.stats.reads.values()),
                "bytes": report.bytes_read,
            }
        layout = CASES[family][2]
        if layout is not None:
            tp, pp, ep = layout
            platform.initialize(platform.ParallelSizes(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                       expert_model_parallel_size=ep), seed=7)  # fmt: skip
            tool.hf_to_mcore(hf, f"{out_root}/{family}-2ranks", parallel=layout)
            # and back, streamed from the checkpoint (meta-device model, a group of tensors at a time)
            tool.mcore_to_hf(mcore, f"{out_root}/{family}-hf-2ranks", parallel=layout, max_shard_size="40KB")
    return results


def test_direct_hf_load_equals_convert_then_load_on_two_ranks(tmp_path, releases):
    from megatron_mtp_rl.hf.reader import HFCheckpoint

    ranks = run_ranks(_worker, 2, tmp_path / "ranks", releases, str(tmp_path), timeout=400)
    for family, (hf, _) in releases.items():
        whole = sum(HFCheckpoint(hf).nbytes(n) for n in HFCheckpoint(hf).names())
        for tp, pp, ep in CASES[family][1]:
            per_rank = [r[(family, tp, pp, ep)] for r in ranks]
            for rank, res in enumerate(per_rank):
                assert res["same_keys"] and res["differ"] == [], (family, tp, pp, ep, rank, res["differ"][:5])
                assert res["max_reads"] == 1, (family, tp, pp, ep, rank)  # nothing read twice
                assert res["bytes"] < whole, (family, tp, pp, ep, rank)  # nobody reads the whole release
    # the 2-rank converter wrote the one-process checkpoint, bit for bit
    tool = load_tool("convert_checkpoint")
    from megatron_mtp_rl import platform

    for family, (_, mcore) in releases.items():
        if CASES[family][2] is None:
            continue
        platform.destroy()
        one, _, _ = tool._load_model(mcore)
        a = _local_state(one)
        platform.destroy()
        two, _, _ = tool._load_model(tmp_path / f"{family}-2ranks")
        b = _local_state(two)
        assert sorted(a) == sorted(b)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], family
        platform.destroy()
        # mcore-to-hf on 2 ranks writes the one-process export's tensors (the shards differ: under EP
        # a parameter's experts come out by rank, under PP each stage fills its own shards)
        one_hf = tool.mcore_to_hf(mcore, tmp_path / f"{family}-hf-1rank", max_shard_size="40KB")
        a, b = _hf_tensors(one_hf), _hf_tensors(tmp_path / f"{family}-hf-2ranks")
        assert len(list(one_hf.glob("*.safetensors"))) > 2 and sorted(a) == sorted(b), family
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], family
    platform.destroy()
