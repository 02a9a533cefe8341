"""Memory and time of the MTP self-distillation KL vs the log-probs it sits beside.

``distill`` = :func:`~megatron_mtp_rl.ops.vocab_parallel_kl` (forward + backward into the
draft logits); ``logprobs`` = :func:`~megatron_mtp_rl.ops.vocab_parallel_logprobs` on the same
logits; ``dense`` = ``kl_div(log_softmax(q), log_softmax(p))``. Each variant runs in its own
subprocess; "extra" is the peak resident memory minus the resident size once both logit
tensors (draft and main: both exist in training anyway) are allocated. Example:

    .venv/bin/python tools/bench_distill.py --tokens 2048 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import psutil
import torch
import torch.nn.functional as F


def _run(variant: str, tokens: int, vocab: int, chunk: int | None) -> dict:
    from megatron_mtp_rl.ops import vocab_parallel_kl, vocab_parallel_logprobs

    torch.manual_seed(0)
    draft = torch.randn(tokens, vocab)
    main = torch.randn(tokens, vocab)
    targets = torch.randint(0, vocab, (tokens,))
    x = draft.requires_grad_()
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if variant == "distill":
        out = vocab_parallel_kl(x, main, chunk_size=chunk)
    elif variant == "logprobs":
        out = vocab_parallel_logprobs(x, targets, chunk_size=chunk)
    else:
        out = F.kl_div(torch.log_softmax(x, -1), torch.log_softmax(main, -1), reduction="none", log_target=True).sum(-1)
    out.sum().backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad = x.numel() * x.element_size()  # every variant must hold the draft-logit gradient
    return {"variant": variant, "time_s": dt, "extra_MiB": (peak - base) / 2**20, "grad_MiB": grad / 2**20}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.variant:
        print(json.dumps(_run(a.variant, a.tokens, a.vocab, a.chunk)))
        return
    rows = {}
    for v in ("logprobs", "distill", "dense"):
        cmd = [sys.executable, __file__, "--variant", v, "--tokens", str(a.tokens), "--vocab", str(a.vocab)]
        if a.chunk:
            cmd += ["--chunk", str(a.chunk)]
        rows[v] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    for v, r in rows.items():
        extra, grad = r["extra_MiB"], r["grad_MiB"]
        print(f"{v:9s} time {r['time_s']:.3f}s  extra peak {extra:.0f} MiB (draft grad alone {grad:.0f})")
    ratio = rows["distill"]["extra_MiB"] / max(rows["logprobs"]["extra_MiB"], 1e-9)
    print(f"distill / logprobs extra memory: {ratio:.2f}x")


if __name__ == "__main__":
    main()
