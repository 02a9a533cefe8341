"""megatron's scale features as flags: what each needs, checked before anything is built."""

from megatron_mtp_rl.config import parse_config, resolve_model_args, validate


def _problems(*flags: str, cuda: bool | None) -> list[str]:
    cfg = parse_config(["--preset", "tiny-moe", *flags])
    return validate(cfg, 2, resolve_model_args(cfg, 64), cuda=cuda)


def test_gpu_only_features_are_refused_on_cpu_one_line_each():
    flags = ["--use-distributed-optimizer", "--recompute-granularity", "selective", "--transformer-impl",
             "transformer_engine"]  # fmt: skip
    cpu = _problems(*flags, cuda=False)
    assert len(cpu) == 3 and all("needs a CUDA GPU" in p and "\n" not in p for p in cpu)
    assert _problems(*flags, cuda=True) == []
    assert _problems(*flags, cuda=None) == []  # device unknown (a recipe checked on a CPU machine)


def test_recompute_and_sequence_parallel_rules():
    assert any("needs --recompute-method" in p for p in _problems("--recompute-granularity", "full", cuda=True))
    assert _problems("--recompute-granularity", "full", "--recompute-method", "uniform", cuda=True) == []
    assert any("go with --recompute-granularity full" in p for p in _problems("--recompute-method", "block", cuda=True))
    assert any("needs --tensor-model-parallel-size > 1" in p for p in _problems("--sequence-parallel", cuda=True))


def test_moe_with_tensor_parallelism_needs_sequence_parallel():
    tp2 = ["--tensor-model-parallel-size", "2"]
    assert any("needs --sequence-parallel" in p for p in _problems(*tp2, cuda=True))
    assert not any("sequence-parallel" in p for p in _problems(*tp2, "--sequence-parallel", cuda=True))
    assert any("local norm refuses it" in p for p in _problems(*tp2, "--sequence-parallel", "--transformer-impl",
                                                                "local", cuda=True))  # fmt: skip
