"""Self-speculative decoding (MTP drafts, exact verification) vs plain KV-cached decoding.

Generates from the same prompts with both modes, with one row per call (per-row acceptance
is not limited by the batch) and with the whole batch at once, and prints acceptance length
and tokens/s ratios measured in one run. Example (after ``make demo``):

    .venv/bin/python tools/bench_spec_decode.py --load runs/demo/warmstart --preset tiny-moe
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> None:
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.models.generation import SamplingParams, generate
    from megatron_mtp_rl.train.builders import build_run
    from megatron_mtp_rl.train.loop import resume
    from megatron_mtp_rl.train.pretrain import Evaluator

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(["--quiet", "--finetune", "--rollout-max-response-len", "32", *argv])
    run = build_run(cfg)
    resume(run.cfg, run)  # --load: weights only (--finetune)
    max_new = cfg.rollout.rollout_max_response_len
    prompts = [Evaluator(run.cfg, run).manager.encode_prompt(p) for p in run.source.eval_prompts()[:64]]
    vocab = run.tokenizer.vocab_size
    results = {}
    for temp in (0.0, 1.0):
        sp = SamplingParams(temperature=temp, max_new_tokens=max_new, eos_id=None)
        for mode in ("plain", "spec"):
            spec = mode == "spec"
            reps = {"row": [], "batch": []}
            accept = []
            for rep in range(3):  # interleaved repetitions; report the median
                t0, tokens = time.perf_counter(), 0
                for i, p in enumerate(prompts[:16]):
                    g = torch.Generator().manual_seed(rep * 1000 + i)
                    out = generate(run.gpt, [p], sp, vocab_size=vocab, generator=g, speculative=spec)
                    tokens += out.stats["tokens"]
                    if spec:
                        accept.append(out.stats["accept_len"])
                reps["row"].append(tokens / (time.perf_counter() - t0))
                g = torch.Generator().manual_seed(rep)
                out = generate(run.gpt, prompts, sp, vocab_size=vocab, generator=g, speculative=spec)
                reps["batch"].append(out.stats["tokens_per_s"])
            results[(temp, mode)] = {
                "row_tps": statistics.median(reps["row"]),
                "batch_tps": statistics.median(reps["batch"]),
                "accept_len": statistics.mean(accept) if accept else 1.0,
            }
    platform.destroy()
    print(
        f"{len(prompts)} held-out prompts, {max_new} new tokens, "
        f"{run.model_args.mtp_num_layers} MTP depths, torch threads {torch.get_num_threads()}"
    )
    print("temperature | accept len (1 row) | tokens/s spec/plain, 1 row | tokens/s spec/plain, batch of 64")
    for temp in (0.0, 1.0):
        p, s = results[(temp, "plain")], results[(temp, "spec")]
        print(
            f"{temp:11.1f} | {s['accept_len']:18.2f} | {s['row_tps'] / p['row_tps']:26.2f}x | "
            f"{s['batch_tps'] / p['batch_tps']:.2f}x"
        )


if __name__ == "__main__":
    main()
