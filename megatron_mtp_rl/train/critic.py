"""The critic of PPO with GAE: a megatron-core GPTModel whose output layer is a scalar value head.

The value model has the policy's shape and parallel layout (no MTP block); its head is megatron's
``RowParallelLinear(hidden, 1)`` (the input is split over TP ranks, the output all-reduced), so
every TP rank gets the same value. It has its own DDP wrapper, Adam (``--critic-lr``) and clip.

Weights, in order of precedence: the resumed checkpoint's ``critic/`` part (with its optimizer);
``--critic-load DIR`` (a run's checkpoint with a ``critic/`` part, or a policy checkpoint whose
trunk is loaded under a fresh head); else the policy's own weights (the ``--load`` ones, or its
initialisation). The critic is saved as ``SAVE/iter_N/critic/`` inside the policy's checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

from megatron_mtp_rl.config import RunConfig
from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.hf.directory import is_hf_dir
from megatron_mtp_rl.models import megatron_compat as compat
from megatron_mtp_rl.models.batch import TokenBatch
from megatron_mtp_rl.models.forward import gpt_forward, unwrap
from megatron_mtp_rl.models.presets import ModelArgs
from megatron_mtp_rl.models.provider import RuntimeOptions
from megatron_mtp_rl.models.provider import build_model as build_gpt
from megatron_mtp_rl.rl.loss import step_denominators
from megatron_mtp_rl.rl.metric_values import averaged, summed
from megatron_mtp_rl.rl.policy_loss import aggregate, sequence_index
from megatron_mtp_rl.rl.value_loss import clipped_value_loss
from megatron_mtp_rl.train.builders import runtime_options
from megatron_mtp_rl.train.checkpoint import (
    LATEST,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    verify_checkpoint,
)
from megatron_mtp_rl.train.optim import GradNorms, build_optimizer, clip_and_step, wrap_ddp
from megatron_mtp_rl.train.schedule import configure, forward_backward

#: The critic's part of a checkpoint iteration: ``SAVE/iter_N/critic/``.
CRITIC_DIR = "critic"
_HEAD = "output_layer."


def build_value_model(args: ModelArgs, runtime: RuntimeOptions | None = None) -> torch.nn.Module:
    """The policy's GPTModel without MTP layers, its output layer a scalar value head."""
    # Built tied on its single stage, the vocabulary-sized output layer allocates no weight.
    gpt = build_gpt(replace(args, mtp_num_layers=0, untie_embeddings_and_output_weights=False), runtime=runtime)
    cfg = gpt.config
    head = tensor_parallel.RowParallelLinear(
        cfg.hidden_size,
        1,
        config=cfg,
        init_method=cfg.init_method,
        bias=False,
        input_is_parallel=False,
        skip_bias_add=False,
    )
    compat.replace_output_layer(gpt, head.to(next(gpt.parameters()).device))
    return gpt


def forward_values(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Values ``[B, S]`` (fp32) in the label frame: index ``i`` is V of the state that emits ``labels[i]``."""
    gpt = unwrap(model)
    if getattr(gpt, "thd_packing", False):  # Transformer Engine: one THD row with cu_seqlens
        flat = batch.flattened()
        return _values(gpt, flat, flat.packed_seq_params()).reshape(batch.shape)
    return _values(gpt, batch, None)


def _values(gpt, batch: TokenBatch, packed_seq_params) -> torch.Tensor:
    mask = None if packed_seq_params is not None else batch.attention_mask()
    fwd = gpt_forward(gpt, batch.tokens, batch.position_ids, mask, with_mtp=False, packed_seq_params=packed_seq_params)
    values, _ = gpt.output_layer(fwd.hidden)  # [S, B, 1], the same on every TP rank
    return values.squeeze(-1).t().float()


class ValueLoss:
    """``loss_fn`` of the schedule: the clipped value loss of one micro-batch (global denominators)."""

    def __init__(self, value_clip: float, loss_agg_mode: str, denominators):
        self.value_clip = value_clip
        self.loss_agg_mode = loss_agg_mode
        self.den = denominators

    def __call__(self, batch, values: torch.Tensor):
        mask = batch.loss_mask
        terms = clipped_value_loss(values, batch.values, batch.returns, self.value_clip)
        loss = aggregate(terms.loss, mask, sequence_index(batch.segment_ids), self.loss_agg_mode, self.den)
        m = mask.bool()
        metrics = {
            "critic/value_loss": summed(loss.detach()),
            "critic/values_mean": averaged(values.detach()[m].double().sum(), m.sum()),
            "critic/clipfrac": averaged(terms.clipped[m].double().sum(), m.sum()),
        }
        return loss, metrics


@dataclass
class Critic:
    """The value model (bare and DDP-wrapped), its optimizer and the value-loss settings."""

    gpt: torch.nn.Module
    model: torch.nn.Module
    optimizer: object
    value_clip: float
    clip_grad: float
    loss_agg_mode: str = "token-mean"

    @torch.no_grad()
    def values(self, micro_batches: list) -> list[torch.Tensor]:
        """V_old of every micro-batch (forward-only schedule), on the CPU like the batches."""
        was_training = self.model.training
        self.model.eval()
        outs = forward_backward(self.model, micro_batches, None, forward_only=True, forward_fn=forward_values)
        self.model.train(was_training)
        return [v.detach().cpu() for v in outs]

    def update(self, micro_batches: list) -> tuple[list[dict], GradNorms, bool]:
        """One optimizer step on the value loss of a mini-batch; (per-micro-batch metrics, norms, stepped).

        Each batch carries ``values`` (V_old) and ``returns`` (label frame) besides its ``loss_mask``.
        """
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        den = step_denominators(micro_batches, 0, group=group).main
        loss_fn = ValueLoss(self.value_clip, self.loss_agg_mode, den)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = forward_backward(self.model, micro_batches, loss_fn, forward_fn=forward_values)
        stepped, norms = clip_and_step(self.model, self.optimizer, self.clip_grad, self.clip_grad)
        return results, norms, stepped


def create_critic(
    args: ModelArgs,
    *,
    lr: float,
    value_clip: float,
    clip_grad: float = 1.0,
    loss_agg_mode: str = "token-mean",
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    runtime: RuntimeOptions | None = None,
    use_distributed_optimizer: bool = False,
) -> Critic:
    """A freshly initialised critic with its DDP wrapper and optimizer (weights: see :func:`init_critic`)."""
    gpt = build_value_model(args, runtime)
    model = wrap_ddp(gpt, use_distributed_optimizer=use_distributed_optimizer)
    configure(model)
    optimizer = build_optimizer(model, lr=lr, weight_decay=weight_decay, adam_beta1=adam_beta1, adam_beta2=adam_beta2)
    return Critic(gpt, model, optimizer, value_clip=value_clip, clip_grad=clip_grad, loss_agg_mode=loss_agg_mode)


def build_critic(cfg: RunConfig, run) -> Critic | None:
    """``--advantage-estimator gae``: the critic, freshly initialised; :func:`init_critic` gives it its weights.

    Built before the resume restores the RNG state, so a resumed run draws what an uninterrupted one does.
    """
    if cfg.algo.advantage_estimator != "gae":
        return None
    op = cfg.optim
    critic = create_critic(
        run.model_args,
        lr=op.lr if op.critic_lr is None else op.critic_lr,
        value_clip=cfg.algo.value_clip,
        clip_grad=op.clip_grad,
        loss_agg_mode=cfg.algo.loss_agg_mode,
        weight_decay=op.weight_decay,
        adam_beta1=op.adam_beta1,
        adam_beta2=op.adam_beta2,
        runtime=runtime_options(cfg),
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return critic


def init_critic(cfg: RunConfig, critic: Critic, run) -> str:
    """Give the critic its weights (and, on a resume, its optimizer); returns where they came from."""
    c = cfg.ckpt
    resumed = latest_checkpoint(c.load) if c.load else None
    if resumed is not None and (resumed / CRITIC_DIR).is_dir() and not c.finetune:
        updated = read_trainer_state(resumed).get("step", 0) > 0  # a step-0 save has no Adam state yet
        load_checkpoint(c.load, critic.model, critic.optimizer if updated else None, part=CRITIC_DIR)
        return f"{resumed}/{CRITIC_DIR}"
    if c.critic_load:
        if is_hf_dir(c.critic_load):
            raise ConfigError(
                f"--critic-load {c.critic_load} is an HF directory: the critic loads this project's checkpoints; "
                "--load the HF model instead (the critic then starts from its weights)"
            )
        src = latest_checkpoint(c.critic_load)
        if src is None:
            raise ConfigError(f"--critic-load {c.critic_load}: no checkpoint there (no {LATEST})")
        _check_shape(src, run.model_args)
        if (src / CRITIC_DIR).is_dir():
            load_checkpoint(c.critic_load, critic.model, None, part=CRITIC_DIR)
            where = f"{src}/{CRITIC_DIR}"
        else:
            load_trunk(src, critic.gpt)
            where = f"{src} (policy trunk, new value head)"
    else:
        copy_trunk(run.gpt, critic.gpt)
        where = "the policy's weights (new value head)"
    critic.optimizer.reload_model_params()  # mixed precision: main params follow the new weights
    return where


def _check_shape(path: Path, args: ModelArgs) -> None:
    saved = read_trainer_state(path).get("model_args", {})
    mine = asdict(args)
    skip = {"seq_length", "mtp_num_layers", "untie_embeddings_and_output_weights"}
    diff = [f"{k}: checkpoint {saved[k]} vs run {mine[k]}" for k in sorted(mine) if k not in skip and k in saved
            and saved[k] != mine[k]]  # fmt: skip
    if diff:
        raise ConfigError(f"--critic-load {path}: a different model shape ({', '.join(diff)})")


def copy_trunk(policy: torch.nn.Module, value_model: torch.nn.Module) -> None:
    """The policy's embedding, decoder and final norm into the value model (same layout: same shards)."""
    mine = dict(unwrap(policy).named_parameters())
    with torch.no_grad():
        for name, p in unwrap(value_model).named_parameters():
            if not name.startswith(_HEAD):
                p.copy_(mine[name])


def load_trunk(path: Path, value_model: torch.nn.Module) -> None:
    """Load a policy checkpoint (dist checkpoint at ``path``) into everything but the value head.

    The policy's MTP layers and vocabulary output layer are in the checkpoint but not requested:
    megatron's load leaves unrequested tensors alone.
    """
    gpt = unwrap(value_model)
    verify_checkpoint(path)
    wanted = {k: v for k, v in gpt.sharded_state_dict().items() if not k.startswith(_HEAD)}
    state = dist_checkpointing.load(wanted, str(path))
    missing, unexpected = gpt.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_HEAD)]
    if missing or unexpected:
        raise ConfigError(f"--critic-load {path}: not a policy checkpoint of this model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")  # fmt: skip
