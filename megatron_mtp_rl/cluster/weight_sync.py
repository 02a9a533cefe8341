"""Megatron → SGLang weight sync, MTP (draft) layers included, streamed one parameter at a time.

Every sync reads the model through ``hf/export.iter_hf_tensors``: each parameter is
gathered over its own TP / EP group, named as the HF family SGLang loads (``hf/families``;
``--hf-flavour`` or the model's own: tiny-dense → MiMo ``model.mtp_layers.0``, tiny-moe → GLM-4.5
``model.layers.{L}``), and put in a bucket of at most ``--update-weight-buffer-size`` bytes that is
pushed as soon as it fills. Each pipeline stage's first rank sends its own stage (no stage's tensors
travel to another stage). All inside pause → flush → update → continue, opened and closed by rank 0:

* ``disk``: each stage writes its HF shards (``--max-shard-size``) into one directory, engines reload it.
* ``tensor`` (colocated): each bucket goes to ``/update_weights_from_tensor``.
* ``distributed``: each stage's sender and every engine rank join one process group per stage
  (``/init_weights_update_group``: tcp rendezvous at the sender's own address — its node's IP under
  Ray, :func:`rendezvous_host` under torchrun —, ``PrefixStore(group_name)``,
  engine rank = 1 + offset + its TP rank — SGLang 0.5.23's construction; SGLang keeps several
  named groups) and each bucket is announced with ``/update_weights_from_distributed`` while the
  sender broadcasts its tensors in the same order. NCCL on GPUs; the CPU tests run the same
  protocol over gloo against a fake engine.

The peak extra memory of a push is about two buckets plus the largest single tensor, whatever the
model size. Stale draft weights silently collapse speculative acceptance, so the MTP layers are
always part of the payload; :func:`check_payload` refuses a payload without them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.hf.directory import INDEX_FILE
from megatron_mtp_rl.hf.export import is_stage_sender, iter_hf_tensors
from megatron_mtp_rl.hf.families import family_for, get_family
from megatron_mtp_rl.hf.mapping import gather_full_state, megatron_to_hf
from megatron_mtp_rl.hf.shards import write_hf_shards
from megatron_mtp_rl.models.bucketing import iter_buckets, tensor_nbytes
from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.models.presets import ModelArgs
from megatron_mtp_rl.platform.device import cuda_available
from megatron_mtp_rl.platform.distributed import device as platform_device

#: Default for ``--max-shard-size`` (HF's spelling and default: 10^9 bytes per GB).
DEFAULT_MAX_SHARD_SIZE = "5GB"

SYNC_MODES = ("disk", "tensor", "distributed")
_MTP_LAYER = re.compile(r"mtp\.layers\.(\d+)\.")


def default_flavour(model_args: ModelArgs) -> str:
    """The HF family this model exports as (tiny-dense → mimo, tiny-moe → glm4_moe; see hf/families)."""
    return family_for(model_args).name


def _drop_deep_mtp(full: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Leave out MTP layers ≥ ``depth`` (SGLang's drafts take one layer)."""
    out = {}
    for name, t in full.items():
        m = _MTP_LAYER.match(name)
        if m is None or int(m.group(1)) < depth:
            out[name] = t
    return out


def hf_tensors(
    model,
    model_args: ModelArgs,
    flavour: str,
    *,
    with_copies: bool = False,
    depth: int | None = None,
) -> dict[str, torch.Tensor]:
    """This model's weights as ONE HF state dict of ``flavour``'s family (collective; every rank gets it all).

    The whole-model reference the streamed path (``hf.export.iter_hf_tensors``) is tested against; training,
    exports and weight sync never call it.

    ``depth``: MTP layers to include (default: what the family's SGLang draft takes). The family
    adds tensors its architecture always has and our model may leave out (exact zeros: MiMo's q/k/v
    biases, GLM-4.5 / DeepSeek-V3 routers' ``e_score_correction_bias``).
    """
    gpt = unwrap(model)
    fam = family_for(model_args, flavour)
    depth = fam.export_depth(model_args) if depth is None else depth
    full = _drop_deep_mtp(gather_full_state(gpt), depth)
    fl = fam.flavour
    if fl.mtp_embed_head_copies and not with_copies:
        fl = replace(fl, mtp_embed_head_copies=False)
    hf = megatron_to_hf(full, gpt.config, fl, hf_vocab_size=model_args.vocab_size)
    if fam.writes_explicit_head(model_args):
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    return fam.complete(hf, model_args, depth)


def mtp_marker(model_args: ModelArgs, flavour: str) -> str:
    """A name prefix only the family's MTP (draft) tensors carry."""
    style = get_family(flavour).flavour.mtp_style
    return {"mimo": "model.mtp_layers.", "qwen3": "mtp."}.get(style, f"model.layers.{model_args.num_layers}.")


def check_payload(names, model_args: ModelArgs, flavour: str) -> None:
    """Refuse a weight payload that would leave SGLang's draft (MTP) weights stale."""
    if not model_args.mtp_num_layers or not get_family(flavour).draft_depth:
        return  # no MTP layers, or SGLang has no draft for the family (nothing of it goes stale)
    marker = mtp_marker(model_args, flavour)
    if not any(n.startswith(marker) for n in names):
        raise RuntimeError(f"weight sync payload has no MTP layer tensors ({marker}*): the draft model would go stale")


def hf_config(model_args: ModelArgs, flavour: str, depth: int | None = None) -> dict:
    """The config.json of ``flavour``'s family for this model (``AutoConfig`` parses it; SGLang loads it)."""
    fam = family_for(model_args, flavour)
    return fam.hf_config(model_args, fam.export_depth(model_args) if depth is None else depth)


def export_note(model_args: ModelArgs, flavour: str, depth: int) -> str:
    """One line saying what an export carries, e.g. that SGLang's draft takes only the first MTP layer."""
    fam = get_family(flavour)
    note = f"{fam.architecture}: {depth} of {model_args.mtp_num_layers} MTP layer(s)"
    if depth < model_args.mtp_num_layers and fam.draft_class is None:
        note += " (SGLang 0.5.23 has no MTP draft for it: rollouts run without MTP speculation)"
    elif depth < model_args.mtp_num_layers:
        note += f" ({fam.draft_class} takes {fam.draft_depth}; the deeper ones are trained, not exported)"
    return note


def shard_names(out: Path) -> list[str]:
    """Every tensor name of an HF directory (from the index, or the single file's header)."""
    index = out / INDEX_FILE
    if index.is_file():
        return list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as h:
        return list(h.keys())


def write_hf_metadata(out: Path, shards: list[str], model_args: ModelArgs, flavour: str, depth: int,
                      dtype_name: str | None = None) -> None:  # fmt: skip
    """config.json (+ the family's own files, e.g. MiMo's configuration_mimo.py) beside written shards.

    Checks first that the shards carry the MTP (draft) layers SGLang's draft needs.
    """
    check_payload(shard_names(out), model_args, flavour)
    cfg = hf_config(model_args, flavour, depth)
    if dtype_name:
        cfg["torch_dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for fname, text in get_family(flavour).extra_files(model_args).items():
        (out / fname).write_text(text)


def write_hf_dir(out: Path, tensors: dict[str, torch.Tensor], model_args: ModelArgs, flavour: str, depth: int,
                 dtype_name: str | None = None) -> None:  # fmt: skip
    """model.safetensors + config.json from an in-memory dict (small models and tests; exports stream)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # clone: per-layer copies alias their source and safetensors refuses shared storage
    owned = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    save_file(owned, str(out / "model.safetensors"))
    write_hf_metadata(out, ["model.safetensors"], model_args, flavour, depth, dtype_name)


def export_hf(model, model_args: ModelArgs, out_dir: str | Path, flavour: str | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:  # fmt: skip
    """Write the model as an HF directory SGLang loads (collective; each stage writes its own shards).

    Shards of at most ``max_shard_size`` as they fill (``model-0000k-of-0000n.safetensors`` + index);
    rank 0 writes config.json. Returns the directory.
    """
    from megatron_mtp_rl.hf.shards import parse_size

    flavour = flavour or default_flavour(model_args)
    depth = family_for(model_args, flavour).export_depth(model_args)
    out = Path(out_dir)
    shards = write_hf_shards(model, model_args, flavour, out, max_shard_bytes=parse_size(max_shard_size), depth=depth)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_hf_metadata(out, shards, model_args, flavour, depth)
        if depth < model_args.mtp_num_layers:
            print(f"export {out}: {export_note(model_args, flavour, depth)}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return out


# how long a stage's sender waits at its update group's rendezvous for the engines' ranks
RENDEZVOUS_TIMEOUT_S = 600.0


class WeightSync:
    """Pushes the trainer's weights to the SGLang engines after each RL step (a collective on every rank).

    ``engine`` is this rank's SGLangEngine client: global rank 0 opens and closes the update frame,
    and each stage's sender (:func:`~megatron_mtp_rl.hf.export.is_stage_sender`) pushes its
    own stage through it; other ranks pass ``None``.
    """

    def __init__(self, engine, model, model_args: ModelArgs, *, mode: str, bucket_bytes: int, export_dir: str,
                 flavour: str | None = None, engine_tp: int = 1, master_address: str | None = None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):  # fmt: skip
        if mode not in SYNC_MODES:
            raise ValueError(f"--weight-sync-mode must be one of {SYNC_MODES}")
        self.engine, self.model, self.model_args = engine, model, model_args
        self.mode, self.bucket_bytes = mode, bucket_bytes
        self.export_dir = Path(export_dir)
        self.flavour = flavour or default_flavour(model_args)
        self.max_shard_size = max_shard_size
        self.version = 0
        self.engine_tp = engine_tp
        # where this sender's update-group store listens (None: rendezvous_host's rule at the first push)
        self.master_address = master_address
        self.stage = parallel_state.get_pipeline_model_parallel_rank() if dist.is_initialized() else 0
        self._generation = 0  # update groups built so far; reset_group() moves to the next name
        self.group_name = self._name()
        self._group = None
        self.last_buckets: list[list[str]] = []  # this sender's buckets (names) of the last push
        self.last_bucket_bytes: list[int] = []
        # what the engines hold now, for a restarted engine (disk mode only: the pushed buckets are
        # not kept, so a restarted engine in tensor/distributed mode catches up at the next sync)
        self._last_payload = None
        # set on rank 0 by the local supervisor's restart hook (resync_engine): in ``distributed`` mode the
        # restarted engine has no update group, so the next push builds a new one (every rank learns it)
        self.engines_restarted = False

    @property
    def is_opener(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0

    def __call__(self) -> dict:
        self.version += 1
        return self._push()

    def resync(self) -> dict:
        """Push the current version again (collective): a restarted engine came back with the initial weights.

        Every engine gets it (the survivors' copies are unchanged); in ``distributed`` mode the
        update group is built anew over the engines there are now. Nothing to do before the first push.
        """
        if self.version == 0:
            return {}
        if self.mode == "distributed":
            self.reset_group()
        return self._push()

    def _name(self) -> str:
        """This stage's group name; rebuilt groups get ``_g{n}`` (an engine keeps a group per name)."""
        base = "mtp_rl_weight_sync" if self.stage == 0 else f"mtp_rl_weight_sync_pp{self.stage}"
        return base if self._generation == 0 else f"{base}_g{self._generation}"

    def reset_group(self) -> None:
        """Tear down this sender's update group: the next push builds one, under a new name, over the engines
        the client lists then (call it on every rank after an engine restart; non-senders only move the name).

        The engines still holding the old group are asked to drop it (SGLang 0.5.23's
        ``/destroy_weights_update_group``; a restarted engine has none and its refusal is ignored).
        """
        old, group = self.group_name, self._group
        self._group = None
        self._generation += 1
        self.group_name = self._name()
        if group is None:
            return
        with contextlib.suppress(ValueError, RuntimeError):  # already gone (the default group was torn down)
            dist.destroy_process_group(group)
        with contextlib.suppress(TimeoutError):  # an engine that hangs keeps a stale group: harmless, new name
            self.engine.submit(self._drop_on_engines(old)).result(timeout=120)

    def close(self) -> None:
        """Destroy this sender's update group (at the run's end, before the engine client closes).

        Left registered, its name could not be made again in this process (an in-process run after
        this one) and its gloo threads would idle until exit. Engines that outlive the run (external
        ones) are asked to drop their end; a later trainer's first push drops it anyway.
        """
        group, self._group = self._group, None
        if group is None:
            return
        with contextlib.suppress(ValueError, RuntimeError):  # already gone with the default group
            dist.destroy_process_group(group)
        if self.engine is not None and not getattr(self.engine, "_closed", False):
            with contextlib.suppress(Exception):  # best effort: the engines may be stopping already
                self.engine.submit(self._drop_on_engines(self.group_name)).result(timeout=10)

    async def _drop_on_engines(self, name: str) -> None:
        """Every listed engine drops its update group ``name``, if it has one (failures are not errors)."""
        import asyncio

        _, clients = await self.engine._clients()
        await asyncio.gather(*(c.destroy_weights_update_group(name) for c in clients), return_exceptions=True)

    def stage_weights(self) -> tuple[Callable[[], None], dict]:
        """The next version's push in two parts (disk mode): the export now (all ranks call it, collective), and
        ``send()``, the engines' reload, to run later (rank 0; the off-policy queue runs it behind the batch in
        generation, rollout/async_rollout.py). The copy lives on disk, not in memory, whatever the model's size."""
        if self.mode != "disk":
            raise ValueError(f"--weight-sync-mode {self.mode}: a push streams from the live weights, it is not staged")
        self.version += 1
        return self._disk(self.version)

    def _disk(self, version: int) -> tuple[Callable[[], None], dict]:
        path = export_hf(self.model, self.model_args, self.export_dir / f"v{version}", self.flavour,
                         self.max_shard_size)  # fmt: skip

        def send() -> None:
            if not self.is_opener:
                return
            self.engine.pause_flush_update_continue(
                lambda clients: _gather(
                    c.update_weights_from_disk(str(path), weight_version=str(version)) for c in clients
                ),  # fmt: skip
                weight_update_session=False,
            )
            self._last_payload = ("disk", path, version)
            self._drop_exports_before(version)

        return send, {"rollout/weight_version": float(version)}

    def _drop_exports_before(self, version: int) -> None:
        """Delete the exports of older versions once the engines hold ``version`` (one full copy of the model per
        step otherwise piles up on disk); a restarted engine reloads the one kept."""
        for old in self.export_dir.glob("v*"):
            if old.name[1:].isdigit() and int(old.name[1:]) < version:
                shutil.rmtree(old, ignore_errors=True)

    def _push(self) -> dict:
        """Push ``self.version`` to every engine (all ranks call it)."""
        if self.mode == "disk":
            send, metrics = self._disk(self.version)
            send()
            return metrics
        if self.mode == "distributed" and self._any_engine_restarted():
            self.reset_group()
        if self.is_opener:
            self.engine.open_update_frame()
        _barrier()
        try:
            buckets = self._push_stage()
        finally:
            _barrier()
            if self.is_opener:
                self.engine.close_update_frame()
        if self.is_opener:
            self._last_payload = ("stale", None, self.version)
        total = torch.tensor([float(buckets)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return {"rollout/weight_version": float(self.version), "rollout/weight_buckets": float(total.item())}

    def _any_engine_restarted(self) -> bool:
        """Rank 0's ``engines_restarted``, on every rank (a collective), cleared."""
        flag = [self.engines_restarted]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(flag, src=0)
        self.engines_restarted = False
        return bool(flag[0])

    def _push_stage(self) -> int:
        """Stream this stage's tensors; the sender pushes each bucket as it fills. Returns buckets sent."""
        sender = is_stage_sender()
        version = str(self.version)
        self.last_buckets, self.last_bucket_bytes = [], []
        seen_mtp = [False]
        marker = mtp_marker(self.model_args, self.flavour)

        def named():
            for name, t in iter_hf_tensors(self.model, self.model_args, self.flavour):
                seen_mtp[0] |= name.startswith(marker)
                yield name, t

        pushed = 0
        if self.mode == "distributed" and sender:
            self._ensure_group()
        for bucket in iter_buckets(named(), self.bucket_bytes):
            if not sender:
                continue
            bucket = [(n, t.detach().contiguous()) for n, t in bucket]
            self.last_buckets.append([n for n, _ in bucket])
            size = sum(tensor_nbytes(t) for _, t in bucket)
            self.last_bucket_bytes.append(size)
            if self.mode == "distributed":
                self._broadcast(bucket, version)
            else:
                self.engine.push_bucket(bucket, version)
            pushed += 1
            del bucket
        last_stage = not dist.is_initialized() or parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if sender and last_stage and not seen_mtp[0]:
            check_payload([], self.model_args, self.flavour)  # the last stage holds the MTP layers
        return pushed

    # -- distributed mode ---------------------------------------------------------------
    def _ensure_group(self):
        """This stage's sender ↔ engines group, created once: engines join via HTTP while the sender joins here.

        The store listens on this sender's own address (:func:`rendezvous_host`). An engine that
        refuses to join (its error comes back over HTTP) ends the push with that error at once,
        where waiting for its rank at the rendezvous would hang until the store's timeout.
        """
        if self._group is not None:
            return self._group
        import asyncio
        import datetime
        import threading

        from megatron_mtp_rl.platform.distributed import bound_tcp_store
        from megatron_mtp_rl.rollout.sglang.server import SGLangServerError

        host = self.master_address or rendezvous_host(self.engine.engine_urls)
        name, tp = self.group_name, self.engine_tp
        world = 1 + len(self.engine.engine_urls) * tp
        store = bound_tcp_store(host, 0, world, datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
        port = store.port
        backend = "nccl" if cuda_available() else "gloo"
        if backend == "nccl":
            self.engine.refuse_on_cpu("an NCCL weight-update group (--weight-sync-mode distributed from GPUs)")

        async def engines_join():
            _, clients = await self.engine._clients()
            # An engine that outlived an earlier trainer (a restart, or the bench's next run) still holds a
            # group of this name, and SGLang refuses to create a second one: drop it first.
            await self._drop_on_engines(name)
            return await asyncio.gather(
                *(c.init_weights_update_group(host, port, 1 + i * tp, world, group_name=name, backend=backend)
                  for i, c in enumerate(clients))
            )  # fmt: skip

        fut = self.engine.submit(engines_join())
        joined: dict = {}

        def join():
            try:
                joined["pg"] = join_update_group(host, port, world, name, backend, store=store)
            except BaseException as e:  # handed to the caller below
                joined["error"] = e

        thread = threading.Thread(target=join, name="weight-sync-join", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if fut.done() and fut.exception() is not None:  # the join thread gives up at the store's timeout
                raise SGLangServerError(
                    f"an SGLang engine did not join weight-update group {name} at {host}:{port}: {fut.exception()}"
                )
        if "error" in joined:
            raise joined["error"]
        fut.result(timeout=600)
        self._group = joined["pg"]
        return self._group

    def _broadcast(self, bucket, version: str) -> None:
        """Announce one bucket to the engines and broadcast its tensors (inside the open frame)."""
        import threading

        group = self._group
        announced = threading.Event()

        async def update():
            import asyncio

            _, clients = await self.engine._clients()
            names = [n for n, _ in bucket]
            dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
            shapes = [list(t.shape) for _, t in bucket]
            calls = asyncio.gather(
                *(
                    c.update_weights_from_distributed(
                        names, dtypes, shapes, group_name=self.group_name, flush_cache=False, weight_version=version
                    )
                    for c in clients
                )
            )
            announced.set()
            await calls  # returns once every engine has received the bucket

        fut = self.engine.submit(update())
        device = platform_device() if cuda_available() else None
        while not announced.wait(0.1):
            if fut.done():
                fut.result()  # the announcement failed: raise its error
                raise RuntimeError("weight sync bucket was not announced")
        for _, t in bucket:
            dist.broadcast(t.to(device) if device is not None else t, src=0, group=group)
        fut.result(timeout=600)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


async def _gather(coros):
    import asyncio

    return await asyncio.gather(*coros)


def rendezvous_host(engine_urls: Sequence[str]) -> str:
    """The address a stage's sender serves its update-group rendezvous on (torchrun; Ray passes the node's IP).

    Loopback when every engine is reached at a loopback address (all on this node). Otherwise this
    node's address on the route to the first remote engine (a UDP ``connect`` sends nothing): an engine
    on this node is then reached at that very address, one on another node across the cluster network.
    Never the wildcard: the store must not listen on every interface.
    """
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    def loopback(host: str) -> bool:
        try:
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    hosts = [urlsplit(u).hostname or "" for u in engine_urls]
    remote = [h for h in hosts if not loopback(h)]
    if not remote:
        return "::1" if hosts and hosts[0] == "::1" else "127.0.0.1"
    family, _, _, _, sockaddr = socket.getaddrinfo(remote[0], 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(sockaddr)
            ip = s.getsockname()[0]
        except OSError as e:
            raise RuntimeError(f"no route from this node to SGLang engine host {remote[0]}: {e}") from None
    if ipaddress.ip_address(ip).is_unspecified:
        raise RuntimeError(f"no address of this node routes to SGLang engine host {remote[0]}")
    return ip


def join_update_group(master_address: str, port: int, world_size: int, group_name: str, backend: str, store=None):
    """Rank 0 of the weight-update group, built the way SGLang's engines build theirs.

    The engines construct the group with a tcp rendezvous, a ``PrefixStore(group_name)`` and
    torch's process-group helper; joining it needs the same construction on this side (a plain
    ``new_group`` would need the engines inside our default group). The helper's empty rank list
    means "not a subgroup of the default group": nothing collective runs over the trainer ranks,
    except that a default group bound to a device would make NCCL split the new communicator from
    the trainers' one, so that binding is lifted meanwhile.
    """
    import datetime

    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world

    from megatron_mtp_rl.platform.distributed import bound_tcp_store

    timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    if store is None:  # rank 0 serves the rendezvous on master_address only
        store = bound_tcp_store(master_address, port, world_size, timeout)
    store.set_timeout(timeout)
    rank, world = 0, world_size
    default = dist.group.WORLD if dist.is_initialized() else None
    bound = getattr(default, "bound_device_id", None)
    if bound is not None:
        default.bound_device_id = None
    try:
        pg, _ = _new_process_group_helper(
            world, rank, [], backend, PrefixStore(group_name, store), group_name=group_name, timeout=timeout
        )
    finally:
        if bound is not None:
            default.bound_device_id = bound
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}
    return pg


def resync_engine(sync: WeightSync, url: str) -> None:
    """Push the weights the other engines hold to one (restarted) engine, paused meanwhile.

    Runs on the supervisor's watcher thread with a private event loop and client. Before the
    first sync the engines hold the initial export the restart loaded, so there is nothing to do.
    """
    import asyncio

    from megatron_mtp_rl.rollout.sglang.client import SGLangClient

    if getattr(sync, "mode", None) == "distributed":
        sync.engines_restarted = True  # it has no update group: the next push builds one with it
    payload = sync._last_payload
    if payload is None:
        return
    kind, data, version = payload
    if kind == "stale":
        return  # tensor/distributed pushes are not kept: it catches up at the next sync (see WeightSync)

    async def go():
        async with SGLangClient(url) as c:
            await c.pause_generation("abort")
            try:
                await c.flush_cache(60.0)
                if kind == "disk":
                    await c.update_weights_from_disk(str(data), weight_version=str(version))
                    return
                await c.begin_weight_update()
                try:
                    for i, bucket in enumerate(data):
                        await c.update_weights_from_tensor(
                            bucket, flush_cache=i == len(data) - 1, weight_version=str(version)
                        )
                finally:
                    await c.end_weight_update()
            finally:
                await c.continue_generation()

    asyncio.run(go())
