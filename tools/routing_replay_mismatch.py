"""Routing agreement and rollout–trainer mismatch with and without R3, on the same samples.

tiny-moe (freshly initialised, ``--init-std``) generates with the local engine in bf16; the fp32
trainer's old-logprob pass then scores the same packed samples twice, routing live and replaying
the engine's routes (models/routing_replay.py). Prints JSON: agreement, mismatch_kl, pass times.

    PYTHONPATH=. .venv/bin/python tools/routing_replay_mismatch.py --prompts 64 --samples 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _kl(mbs) -> float:
    num = den = 0.0
    for b in mbs:
        r = (b.old_logprobs - b.rollout_logprobs).double()[b.loss_mask]
        num += float((torch.expm1(r) - r).sum())
        den += float(b.loss_mask.sum())
    return num / den


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--init-std", type=float, default=0.3)
    a = p.parse_args(argv)

    from megatron_mtp_rl import platform

    platform.initialize(seed=1234)
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.generation import SamplingParams
    from megatron_mtp_rl.models.provider import RuntimeOptions
    from megatron_mtp_rl.rollout.local_engine import LocalEngine
    from megatron_mtp_rl.rollout.manager import Sample
    from megatron_mtp_rl.train.microbatches import build_micro_batches
    from megatron_mtp_rl.train.step import compute_old_logprobs

    torch.manual_seed(0)
    args = get_preset("tiny-moe").with_overrides(init_method_std=a.init_std)
    model = build_model(args, runtime=RuntimeOptions(routing_replay=True))
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 9, (a.prompts,), generator=g).tolist()
    prompts = [torch.randint(1, 60, (n,), generator=g).tolist() for n in lengths]
    reqs = [x for x in prompts for _ in range(a.samples)]
    params = SamplingParams(temperature=1.0, max_new_tokens=a.new_tokens)
    out: dict = {"samples": len(reqs)}
    for record in (False, True):
        engine = LocalEngine(model, vocab_size=model.real_vocab_size, dtype="bfloat16", record_routes=record)
        t = time.perf_counter()
        comps, _ = engine.generate(reqs, params, seed=1)
        out[f"generate_s_record_{record}"] = round(time.perf_counter() - t, 3)
    samples = [
        Sample(None, x, c.response_ids, c.logprobs, "", c.finished, routes=c.routes) for x, c in zip(reqs, comps)
    ]
    mbs = build_micro_batches(samples, [0.0] * len(samples), 64, 8 + a.new_tokens + 1, False)
    replay = model.route_replay
    for name, source in (("live", None), ("r3", "routes"), ("live_again", None), ("r3_again", "routes")):
        replay.configure(source=source, observe=True)
        t = time.perf_counter()
        compute_old_logprobs(model, mbs, with_mtp=True)
        dt = time.perf_counter() - t
        agree, pairs = replay.take_agreement()
        out[name] = {"routing_agreement": agree / pairs, "pairs": pairs, "mismatch_kl": _kl(mbs), "old_pass_s": dt}
    replay.configure()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
