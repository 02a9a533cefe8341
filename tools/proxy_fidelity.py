"""Do OCC's log-probability proxies track the true gradient terms?

For every optimizer step of a short RL run, before the update, this measures on the same
mini-batch the quantities the proxies stand for, with real gradients over the main model's
(non-MTP) parameters:

    true alignment  <g_RL, g_k>   g_RL = ∇ policy loss, g_k = ∇ depth-k MTP loss
    true variance   ||g_k||²

and correlates them across steps with the proxies OCC computed, A_k = mean(d·e) and
V_k = mean(e²). Steps whose θ equals θ_old (the first mini-batch of each rollout batch, d ≡ 0)
are left out. Any ``mtp-rl train`` flag can be added. Example:

    .venv/bin/python tools/proxy_fidelity.py --num-steps 12 --out runs/proxy_fidelity.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def _main_grad_vector(model) -> torch.Tensor:
    from megatron_mtp_rl.train.optim import split_parameters

    main, _ = split_parameters(model)
    return torch.cat([p.main_grad.detach().flatten().double().clone() for p in main])


def main(argv: list[str] | None = None) -> dict:
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    import megatron_mtp_rl.train.step as step_mod
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.rl.loss import RLLoss, step_denominators
    from megatron_mtp_rl.train.loop import close, prepare
    from megatron_mtp_rl.train.schedule import forward_backward

    argv = list(sys.argv[1:] if argv is None else argv)
    out_path = None
    if "--out" in argv:
        i = argv.index("--out")
        out_path = argv[i + 1]
        del argv[i : i + 2]
    defaults = [
        "--preset", "tiny-dense", "--mtp-regime", "policy", "--rollout-batch-size", "32",
        "--global-batch-size", "64", "--micro-batch-size", "64", "--seq-length", "16",
        "--num-steps", "12", "--lr", "3e-4", "--eval-interval", "1000", "--quiet",
    ]  # fmt: skip
    cfg = parse_config(defaults + argv)
    ctx, loop_state = prepare(cfg)
    depths = ctx.run.model_args.mtp_num_layers
    real_train_step = step_mod.train_step
    records = []
    state = {"update": 0}
    per_rollout = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt // cfg.optim.global_batch_size

    def probed(model, optimizer, micro_batches, loss_cfg, occ, **kw):
        # probes: losses without the OCC estimator (no statistics accumulated, no reduce)
        den = step_denominators(micro_batches, depths)
        grads = []
        for coefs in [[0.0] * depths] + [[1.0 if j == k else 0.0 for j in range(depths)] for k in range(depths)]:
            model.zero_grad_buffer()
            fn = RLLoss(loss_cfg, den, None, mtp_coef_override=coefs)
            forward_backward(model, micro_batches, fn, **fn.forward_kwargs())
            grads.append(_main_grad_vector(model))
        m = real_train_step(model, optimizer, micro_batches, loss_cfg, occ, **kw)
        g_rl = grads[0]
        row = {"update": state["update"], "theta_is_old": state["update"] % per_rollout == 0}
        for k in range(depths):
            g_k = grads[k + 1] - g_rl
            row[f"true_alignment_{k + 1}"] = float(g_rl @ g_k)
            row[f"true_variance_{k + 1}"] = float(g_k @ g_k)
            row[f"proxy_alignment_{k + 1}"] = m[f"occ/alignment_{k + 1}"]
            row[f"proxy_variance_{k + 1}"] = m[f"occ/variance_{k + 1}"]
        records.append(row)
        state["update"] += 1
        return m

    step_mod.train_step = probed
    try:
        while loop_state.step < cfg.num_steps:
            loop_state.step += 1
            _, loop_state.cursor = step_mod.rl_step(ctx, loop_state.step, loop_state.cursor)
    finally:
        step_mod.train_step = real_train_step
        close(ctx)
        platform.destroy()

    used = [r for r in records if not r["theta_is_old"]]
    summary = {"updates_used": len(used), "updates_total": len(records), "regime": cfg.mtp.mtp_regime, "depths": {}}
    print(f"{len(used)} optimizer steps with θ ≠ θ_old (of {len(records)}), regime {cfg.mtp.mtp_regime}")
    print("depth | corr(A_k, <g_RL,g_k>) | sign agreement | corr(V_k, ||g_k||²) | corr(A_k/V_k, true ratio)")
    for k in range(1, depths + 1):
        pa = [r[f"proxy_alignment_{k}"] for r in used]
        ta = [r[f"true_alignment_{k}"] for r in used]
        pv = [r[f"proxy_variance_{k}"] for r in used]
        tv = [r[f"true_variance_{k}"] for r in used]
        pr = [a / (v + 1e-12) for a, v in zip(pa, pv)]
        tr = [a / (v + 1e-30) for a, v in zip(ta, tv)]
        sign = sum((a > 0) == (b > 0) for a, b in zip(pa, ta)) / max(len(pa), 1)
        d = {"corr_alignment": pearson(pa, ta), "sign_agreement": sign, "corr_variance": pearson(pv, tv)}
        d["corr_ratio"] = pearson(pr, tr)
        summary["depths"][k] = d
        print(
            f"{k:5d} | {d['corr_alignment']:21.3f} | {sign:14.2f} | {d['corr_variance']:19.3f} | {d['corr_ratio']:.3f}"
        )
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps({"summary": summary, "records": records}, indent=1))
        print(out_path)
    return summary


if __name__ == "__main__":
    main()
