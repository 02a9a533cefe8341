"""Dead SGLang engines come back before a generation, re-synced before the router sees them.

With ``--ray`` the engines are Ray actors in the job's placement group (cluster/placement.py). Every
trainer rank enters each generation (rollout or evaluation) together, so that is where a dead
engine is dealt with, as one collective:

1. trainer rank 0 asks every engine actor whether it is alive (``RayEngineGroup.recover``): a dead
   actor is started again in its bundle (same node and GPUs; after a node loss, wherever Ray puts
   the bundle back), out of the router; one its bundle cannot take back in
   ``--ray-engine-replace-timeout`` seconds is left out and the run goes on with the others;
2. every rank learns the engines' URLs (each stage's sender pushes to all of them);
3. the current weights are pushed again (``WeightSync.resync``: same version), so the restarted
   engine serves the weights every generate request asks for;
4. only then does the router get it back.

An engine that dies during a generation costs no sample: the router drops it and the client asks
again (rollout/sglang/client.py), the other engines answer; the restart happens at the next one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

from megatron_mtp_rl.cluster.colocated import generation_phase
from megatron_mtp_rl.train import faults


class RecoveringEngine:
    """A remote engine whose every generation starts by bringing dead engines back (all ranks enter)."""

    remote = True

    def __init__(self, inner, group, sync, *, log=print):
        self.inner = inner  # RemoteEngine or ColocatedEngine
        self.group = group  # RayEngineGroup on trainer rank 0, else None
        self.sync = sync  # WeightSync (every rank)
        self.log = log
        self.restarts = 0  # engines restarted over the run
        self._fault_fired = False

    @property
    def client(self):
        return self.inner.client

    @property
    def version(self) -> int:
        return self.inner.version

    def recover(self) -> dict:
        """The collective of the module docstring; the metrics of what it did (empty when nothing)."""
        event = [None]
        if self.group is not None:
            kill = faults.active("kill_engine_actor") and not self._fault_fired
            self._fault_fired |= kill
            r = self.group.recover(fault_kill=kill)
            event[0] = (self.group.generate_url if self.group.engine_urls else None, list(self.group.engine_urls),
                        r.resync, r.lines, r.dropped)  # fmt: skip
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(event, src=0)
        generate_url, urls, resync, lines, dropped = event[0]
        if not resync and not dropped:
            return {}
        for line in lines if self.group is not None else []:
            self.log(line)
        client = self.inner.client
        if client is not None:
            client.set_engines(generate_url if client.generate_url is not None else None, urls)
        if not urls:
            from megatron_mtp_rl.rollout.sglang.server import SGLangServerError

            raise SGLangServerError("no SGLang engine is left: every engine actor died and none could be re-placed")
        metrics = dict(self.sync.resync()) if resync else {}
        if self.group is not None:
            self.group.route(resync)
            self.log(f"engines: {len(urls)} serving (weights version {self.sync.version} re-pushed to {len(resync)})")
        self.restarts += len(resync)
        metrics.pop("rollout/weight_version", None)  # unchanged: the same version went out again
        metrics["rollout/engine_restarts"] = float(self.restarts)
        metrics["rollout/engines_serving"] = float(len(urls))
        return metrics

    @contextlib.contextmanager
    def generation(self) -> Iterator[dict]:
        recovered = self.recover()
        with generation_phase(self.inner) as m:
            m.update(recovered)
            yield m

    def generate(self, prompts, params, *, seed: int):
        return self.inner.generate(prompts, params, seed=seed)

    def sync_weights(self) -> dict:
        return self.inner.sync_weights()

    def close(self) -> None:
        self.inner.close()
