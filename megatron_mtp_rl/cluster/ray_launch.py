"""``mtp-rl train --ray``: trainer ranks (and what generates for them) as Ray actors in one placement group.

The driver (the ``mtp-rl`` process) starts a local Ray cluster — or joins one when
``RAY_ADDRESS`` is set — reserves one placement group and starts one TrainerActor per rank with
the torchrun environment variables set, then waits for them.

* ``--rollout-engine sglang``: the group also holds the SGLang engines' bundles
  (``cluster/placement.py``): engine actors start the servers on their own nodes, the router runs on
  the head node; trainer rank 0 starts them and pushes weights after each step.
* otherwise: one rollout actor (a TP=1 replica of the policy) in its own bundle
  (``--ray-rollout-placement disaggregated``) or in rank 0's (``colocated``); rank 0 pushes full
  tensors to it after each step.

Every actor's place is printed at start-up (``placement: <trainer|engine|router> <index>
node=<id> gpus=<ids>``, trainers with ``pid=``). A trainer that fails or dies ends the job with one
line naming its rank and node; the other ranks are killed, not left waiting in a collective.
"""

from __future__ import annotations

import os
import re
import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from megatron_mtp_rl.cluster.placement import COLOCATED_SHARE, RayEngineGroup, in_bundle, place_engines, placement_line
from megatron_mtp_rl.cluster.placement import plan as plan_layout
from megatron_mtp_rl.cluster.placement import where as actor_where
from megatron_mtp_rl.errors import TrainerFailed


@ray.remote
class TrainerActor:
    def where(self) -> dict:
        return {**actor_where(), "pid": os.getpid()}

    def free_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return s.getsockname()[1]

    def run(self, cfg, env: dict, rollout_actor=None, engines=None) -> list[dict]:
        """One trainer rank; its engine is the rollout actor or the SGLang engine actors."""
        os.environ.update(env)
        from megatron_mtp_rl import platform
        from megatron_mtp_rl.train.loop import run_training

        try:
            return run_training(cfg, rollout_actor=rollout_actor, engines=engines)
        finally:
            platform.destroy()


def _init_ray(cpus: int) -> None:
    """Join ``RAY_ADDRESS``'s cluster, or start a private one on loopback with ``cpus`` CPUs (CPU machines, tests)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    else:
        # address="local": a new cluster even where another one runs on this machine (`ray start`, another
        # job), which a bare ray.init() would join, and then refuse num_cpus.
        ray.init(address="local", num_cpus=max(2, cpus), _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=True)  # fmt: skip


def launch(cfg) -> list[dict]:
    """Run the job on Ray; returns rank 0's metrics history."""
    from megatron_mtp_rl.config import check, resolve_model_args
    from megatron_mtp_rl.models.presets import ModelArgs  # noqa: F401  (imported for pickling)
    from megatron_mtp_rl.rollout.tokenizer import build_tokenizer
    from megatron_mtp_rl.train.builders import model_vocab_size

    world = cfg.ray.ray_num_trainers
    gpus = 1 if cfg.ray.ray_gpus_per_trainer else 0
    tok = build_tokenizer(cfg.data.tokenizer)
    vocab = model_vocab_size(cfg, tok)  # the checkpoint's rows, as the trainers build (≥ the tokenizer's)
    margs = resolve_model_args(cfg, vocab)
    check(cfg, world, margs, cuda=bool(gpus))  # before Ray starts: one line, not a traceback per trainer actor
    sglang = cfg.rollout.rollout_engine == "sglang" and cfg.rollout.rollout_engine_urls is None
    own_bundles = cfg.ray.ray_rollout_placement == "disaggregated"  # engines (or the rollout actor) beside trainers
    _init_ray(world + 1 + (cfg.rollout.rollout_num_engines if sglang and own_bundles else 0))
    if sglang:
        return _launch_with_engines(cfg, world, gpus)
    return _launch_with_rollout_actor(cfg, world, gpus, margs, vocab)


def _trainer_env(i: int, world: int, gpus: int, master: str, port: int) -> dict:
    return {"RANK": str(i), "WORLD_SIZE": str(world), "LOCAL_RANK": str(i if gpus == 0 else 0),
            "MASTER_ADDR": master, "MASTER_PORT": str(port)}  # fmt: skip


def _run_trainers(cfg, trainers, infos, world, gpus, **kw) -> list[dict]:
    """Run every rank; the first failure ends the job: the other ranks are killed (they would wait on
    the failed one in a collective forever) and it is raised as one line naming the rank and node."""
    master = infos[0]["ip"]
    port = ray.get(trainers[0].free_port.remote())
    runs = [t.run.remote(cfg, _trainer_env(i, world, gpus, master, port), **kw) for i, t in enumerate(trainers)]
    pending = list(runs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except ray.exceptions.RayError as err:
            rank = runs.index(done[0])
            _kill(trainers)
            raise _failure(err, rank, infos[rank]) from None
    return ray.get(runs[0])


def _kill(actors) -> None:
    """End the actors now (a rank blocked in a collective never returns by itself)."""
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # already gone
            pass


def _failure(err: Exception, rank: int, info: dict) -> Exception:
    """A trainer's failure as one line: a user mistake keeps its type, anything else is TrainerFailed."""
    from megatron_mtp_rl.errors import ConfigError, DataError, EngineStartError

    cause = getattr(err, "cause", None)
    if isinstance(cause, (ConfigError, DataError, EngineStartError)):
        return type(cause)(str(cause))
    if isinstance(err, ray.exceptions.RayActorError):  # the process died (killed, OOM, node lost)
        # Ray says "... Worker exit type: T Worker exit detail: D Some common causes ..."
        m = re.search(r"Worker exit type: (\S+) Worker exit detail: (.+?)(?: Some common causes|$)", str(err), re.S)
        how = f"{m[1]}, {' '.join(m[2].split())}" if m else _first_line(err)
        what = f"its actor process (pid {info.get('pid', '?')}) died ({how})"
    elif cause is not None:
        what = f"{type(cause).__name__}: {_first_line(cause)}"
    else:
        what = type(err).__name__
    return TrainerFailed(f"trainer rank {rank} on node {info['node']} failed: {what}")


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _trainer_lines(infos: list[dict]) -> list[str]:
    """Placement lines of the trainers, with each actor's pid (to find, inspect or kill the process)."""
    return [f"{placement_line('trainer', i, info)} pid={info['pid']}" for i, info in enumerate(infos)]


def _print_placement(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stdout, flush=True)


def _launch_with_engines(cfg, world: int, gpus: int) -> list[dict]:
    ro = cfg.rollout
    layout = plan_layout(world, ro.rollout_num_engines, ro.rollout_engine_tp, cfg.ray.ray_rollout_placement, bool(gpus))
    pg = placement_group(layout.bundles, strategy="PACK")
    ray.get(pg.ready())
    group = None
    try:
        share = COLOCATED_SHARE if layout.colocated else 0.0
        trainers = [
            TrainerActor.options(num_cpus=1, num_gpus=gpus * (1 - share), scheduling_strategy=in_bundle(pg, b)).remote()
            for b in layout.trainer_bundles
        ]
        infos = ray.get([t.where.remote() for t in trainers])
        engines, router, lines = place_engines(pg, layout, infos, with_router=ro.rollout_num_engines > 1)
        _print_placement(_trainer_lines(infos) + lines)
        group = RayEngineGroup(engines, router, colocated=layout.colocated, pg=pg,
                               layout=layout, trainer_infos=infos,
                               replace_timeout_s=cfg.ray.ray_engine_replace_timeout)  # fmt: skip
        return _run_trainers(cfg, trainers, infos, world, gpus, engines=group)
    finally:
        if group is not None:
            group.close()  # rank 0 stopped the servers already; this reaps what a failure left
            if group.router is not None:
                ray.kill(group.router)
        remove_placement_group(pg)


def _launch_with_rollout_actor(cfg, world: int, gpus: int, margs, vocab: int) -> list[dict]:
    from megatron_mtp_rl.rollout.ray_engine import RolloutActor

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
            scheduling_strategy=in_bundle(pg, rollout_bundle),
        ).remote(margs.__dict__, seed=cfg.seed + 1, speculative=cfg.rollout.local_spec_decode, vocab_size=vocab)
        trainers = [
            TrainerActor.options(
                num_cpus=1 - (share if (i == 0 and not disaggregated) else 0.0),
                num_gpus=gpus * (1 - (share if (i == 0 and not disaggregated) else 0.0)),
                scheduling_strategy=in_bundle(pg, i),
            ).remote()
            for i in range(world)
        ]
        infos = ray.get([t.where.remote() for t in trainers])
        _print_placement(_trainer_lines(infos))
        return _run_trainers(cfg, trainers, infos, world, gpus, rollout_actor=rollout)
    finally:
        remove_placement_group(pg)
