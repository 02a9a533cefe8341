"""``mtp-rl train --ray``: trainer ranks and a rollout actor as Ray actors in a placement group.

The driver (the ``mtp-rl`` process) starts a local Ray cluster — or joins one when
``RAY_ADDRESS`` is set — reserves one bundle per trainer rank (plus one for the rollout actor
when ``--ray-rollout-placement disaggregated``; ``colocated`` packs it into rank 0's bundle),
starts the rollout actor, then one TrainerActor per rank with the torchrun environment
variables set, and waits for them. Trainer rank 0 pushes weights to the rollout actor after
each RL step.
"""

from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@ray.remote
class TrainerActor:
    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, cfg, env: dict, rollout_actor) -> list[dict]:
        """One trainer rank; its engine is the rollout actor (weights pushed: builders.build_engine)."""
        os.environ.update(env)
        from megatron_mtp_rl import platform
        from megatron_mtp_rl.train.loop import run_training

        try:
            return run_training(cfg, rollout_actor=rollout_actor)
        finally:
            platform.destroy()


def launch(cfg) -> list[dict]:
    """Run the job on Ray; returns rank 0's metrics history."""
    from megatron_mtp_rl.config import check, resolve_model_args
    from megatron_mtp_rl.models.presets import ModelArgs  # noqa: F401  (imported for pickling)
    from megatron_mtp_rl.rollout.ray_engine import RolloutActor
    from megatron_mtp_rl.rollout.tokenizer import build_tokenizer
    from megatron_mtp_rl.train.builders import model_vocab_size

    world = cfg.ray.ray_num_trainers
    gpus = 1 if cfg.ray.ray_gpus_per_trainer else 0
    tok = build_tokenizer(cfg.data.tokenizer)
    vocab = model_vocab_size(cfg, tok)  # the checkpoint's rows, as the trainers build (≥ the tokenizer's)
    margs = resolve_model_args(cfg, vocab)
    check(cfg, world, margs, cuda=bool(gpus))  # before Ray starts: one line, not a traceback per trainer actor
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto")
        else:
            # A private local cluster bound to loopback (CPU machines, tests).
            ray.init(
                num_cpus=max(2, world + 1),
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=True,
            )
    bundles = [{"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1} for _ in range(world)]
    disaggregated = cfg.ray.ray_rollout_placement == "disaggregated"
    if disaggregated:
        bundles.append({"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1})
    pg = placement_group(bundles, strategy="PACK")
    ray.get(pg.ready())
    try:
        rollout_bundle = world if disaggregated else 0
        share = 0.0 if disaggregated else 0.5  # colocated: shares rank 0's bundle
        rollout = RolloutActor.options(
            num_cpus=1 if disaggregated else share,
            num_gpus=gpus if disaggregated else share * gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rollout_bundle),
        ).remote(margs.__dict__, seed=cfg.seed + 1, speculative=cfg.rollout.local_spec_decode, vocab_size=vocab)
        trainers = [
            TrainerActor.options(
                num_cpus=1 - (share if (i == 0 and not disaggregated) else 0.0),
                num_gpus=gpus * (1 - (share if (i == 0 and not disaggregated) else 0.0)),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote()
            for i in range(world)
        ]
        master = ray.get(trainers[0].node_ip.remote())
        port = ray.get(trainers[0].free_port.remote())
        runs = []
        for i, t in enumerate(trainers):
            env = {
                "RANK": str(i),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(i if gpus == 0 else 0),
                "MASTER_ADDR": master,
                "MASTER_PORT": str(port),
            }
            runs.append(t.run.remote(cfg, env, rollout))
        histories = ray.get(runs)
        return histories[0]
    finally:
        remove_placement_group(pg)
