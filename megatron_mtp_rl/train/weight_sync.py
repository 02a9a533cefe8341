"""Megatron → SGLang weight sync, MTP (draft) layers included.

Every sync gathers the full tensors (TP shards, EP experts) with the one Megatron↔HF mapping
(``models/hf_mapping.py``), names them as the HF checkpoint family SGLang loads
(``--hf-flavour``: ``deepseek_v3`` naming puts the MTP layers at ``model.layers.{L+k}``,
``mimo`` at ``model.mtp_layers.{k}``; both are what SGLang's draft models read), and pushes
them inside pause → flush → update → continue:

* ``disk``: rank 0 writes an HF directory (safetensors + config.json), engines reload it.
* ``tensor`` (colocated): buckets of ≤ ``--update-weight-buffer-size`` bytes go to
  ``/update_weights_from_tensor``.
* ``distributed``: the trainer's rank 0 and every engine rank join one process group
  (``/init_weights_update_group``: tcp rendezvous at the trainer, ``PrefixStore(group_name)``,
  engine rank = 1 + offset + its TP rank — SGLang 0.5.23's construction) and each bucket is
  announced with ``/update_weights_from_distributed`` while rank 0 broadcasts its tensors in the
  same order. NCCL on GPUs; the CPU tests run the same protocol over gloo against a fake engine.

Stale draft weights silently collapse speculative acceptance, so the MTP layers are always
part of the payload; :func:`check_payload` refuses a payload without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mtp_rl.models.bucketing import bucket_named_tensors
from megatron_mtp_rl.models.hf_mapping import gather_full_state, get_flavour, megatron_to_hf
from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.models.presets import ModelArgs

SYNC_MODES = ("disk", "tensor", "distributed")


def default_flavour(model_args: ModelArgs) -> str:
    return "deepseek_v3" if model_args.is_moe else "mimo"


def hf_tensors(model, model_args: ModelArgs, flavour: str, *, with_copies: bool = False) -> dict[str, torch.Tensor]:
    """This model's weights as an HF state dict (collective over TP/EP; every rank gets it)."""
    gpt = unwrap(model)
    full = gather_full_state(gpt)
    fl = get_flavour(flavour)
    if not with_copies and fl.mtp_embed_head_copies:
        from dataclasses import replace

        fl = replace(fl, mtp_embed_head_copies=False)
    return megatron_to_hf(full, gpt.config, fl, hf_vocab_size=model_args.vocab_size)


def check_payload(names, model_args: ModelArgs, flavour: str) -> None:
    """Refuse a weight payload that would leave SGLang's draft (MTP) weights stale."""
    if not model_args.mtp_num_layers:
        return
    marker = "mtp_layers." if flavour == "mimo" else f"model.layers.{model_args.num_layers}."
    if not any(marker in n for n in names):
        raise RuntimeError(f"weight sync payload has no MTP layer tensors ({marker}*): the draft model would go stale")


def hf_config(model_args: ModelArgs, flavour: str) -> dict:
    """A config.json for the HF family SGLang loads this model as (best effort, see README)."""
    m = model_args
    cfg = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": 1e-5,
        "rope_theta": float(m.rotary_base),
        "hidden_act": "silu",
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "torch_dtype": "bfloat16" if m.params_dtype == "bf16" else "float32",
    }
    if flavour == "mimo":
        cfg.update(architectures=["MiMoForCausalLM"], model_type="mimo", num_nextn_predict_layers=m.mtp_num_layers)
    else:
        cfg.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_nextn_predict_layers=m.mtp_num_layers,
            n_routed_experts=m.num_experts or 0,
            num_experts_per_tok=m.moe_router_topk,
            moe_intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
            first_k_dense_replace=0 if m.num_experts else m.num_layers,
        )
    return cfg


def export_hf(model, model_args: ModelArgs, out_dir: str | Path, flavour: str | None = None) -> Path:
    """Write the model as an HF directory (collective; rank 0 writes). Returns the directory."""
    from safetensors.torch import save_file

    flavour = flavour or default_flavour(model_args)
    tensors = hf_tensors(model, model_args, flavour)
    check_payload(tensors, model_args, flavour)
    out = Path(out_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        # clone: per-layer copies alias their source and safetensors refuses shared storage
        owned = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
        save_file(owned, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(hf_config(model_args, flavour), indent=1))
    if dist.is_initialized():
        dist.barrier()
    return out


class WeightSync:
    """Pushes the trainer's weights to an SGLangEngine after each RL step."""

    def __init__(self, engine, model, model_args: ModelArgs, *, mode: str, bucket_bytes: int, export_dir: str,
                 flavour: str | None = None, engine_tp: int = 1, num_engines: int = 1,
                 master_address: str = "127.0.0.1"):  # fmt: skip
        if mode not in SYNC_MODES:
            raise ValueError(f"--weight-sync-mode must be one of {SYNC_MODES}")
        self.engine, self.model, self.model_args = engine, model, model_args
        self.mode, self.bucket_bytes = mode, bucket_bytes
        self.export_dir = Path(export_dir)
        self.flavour = flavour or default_flavour(model_args)
        self.version = 0
        self.engine_tp = engine_tp
        self.num_engines = num_engines
        self.master_address = master_address
        self.group_name = "mtp_rl_weight_sync"
        self._group = None
        self.last_buckets: list[list[str]] = []
        self._last_payload = None  # rank 0: what the engines hold now (for a restarted engine)

    def __call__(self) -> dict:
        self.version += 1
        is_sender = not dist.is_initialized() or dist.get_rank() == 0
        if self.mode == "disk":
            path = export_hf(self.model, self.model_args, self.export_dir / f"v{self.version}", self.flavour)
            if is_sender:
                self.engine.pause_flush_update_continue(
                    lambda clients: _gather(
                        c.update_weights_from_disk(str(path), weight_version=str(self.version)) for c in clients
                    ),  # fmt: skip
                    weight_update_session=False,
                )
                self._last_payload = ("disk", path, self.version)
            return {"rollout/weight_version": float(self.version)}
        tensors = hf_tensors(self.model, self.model_args, self.flavour)
        check_payload(tensors, self.model_args, self.flavour)
        buckets = bucket_named_tensors(list(tensors.items()), self.bucket_bytes)
        self.last_buckets = [[n for n, _ in b] for b in buckets]
        if self.mode == "distributed":
            if is_sender:
                self._broadcast(buckets)
                # A restarted engine is not in the broadcast group; it gets this payload over
                # /update_weights_from_tensor (colocated engines only, see README).
                self._last_payload = ("tensor", buckets, self.version)
            return {"rollout/weight_version": float(self.version), "rollout/weight_buckets": float(len(buckets))}
        if is_sender:
            version = str(self.version)

            async def push(clients):
                for i, bucket in enumerate(buckets):
                    last = i == len(buckets) - 1
                    await _gather(
                        c.update_weights_from_tensor(bucket, flush_cache=last, weight_version=version) for c in clients
                    )

            self.engine.pause_flush_update_continue(push)
            self._last_payload = ("tensor", buckets, self.version)
        return {"rollout/weight_version": float(self.version), "rollout/weight_buckets": float(len(buckets))}

    # -- distributed mode ---------------------------------------------------------------
    def _ensure_group(self):
        """Create the trainer ↔ engines group once: engines join via HTTP while rank 0 joins here."""
        if self._group is not None:
            return self._group
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        world = 1 + self.num_engines * self.engine_tp
        backend = "nccl" if torch.cuda.is_available() else "gloo"

        async def engines_join(clients):
            import asyncio

            return await asyncio.gather(
                *(
                    c.init_weights_update_group(
                        self.master_address,
                        port,
                        1 + i * self.engine_tp,
                        world,
                        group_name=self.group_name,
                        backend=backend,
                    )  # fmt: skip
                    for i, c in enumerate(clients)
                )
            )

        async def with_clients():
            _, clients = await self.engine._clients()
            return await engines_join(clients)

        fut = self.engine.submit(with_clients())
        self._group = join_update_group(self.master_address, port, world, self.group_name, backend)
        fut.result(timeout=600)
        return self._group

    def _broadcast(self, buckets) -> None:
        """Announce each bucket to the engines and broadcast its tensors, inside the sync frame."""
        import threading

        group = self._ensure_group()
        announced = [threading.Event() for _ in buckets]
        version = str(self.version)

        async def update(clients):
            import asyncio

            for i, bucket in enumerate(buckets):
                names = [n for n, _ in bucket]
                dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
                shapes = [list(t.shape) for _, t in bucket]
                calls = asyncio.gather(
                    *(
                        c.update_weights_from_distributed(
                            names,
                            dtypes,
                            shapes,
                            group_name=self.group_name,
                            flush_cache=i == len(buckets) - 1,
                            weight_version=version,
                        )  # fmt: skip
                        for c in clients
                    )
                )
                announced[i].set()
                await calls  # returns once every engine has received the bucket

        fut = self.engine.submit(self.engine.apause_flush_update_continue(update))
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        for i, bucket in enumerate(buckets):
            while not announced[i].wait(0.1):
                if fut.done():
                    fut.result()  # the frame failed before announcing: raise its error
                    raise RuntimeError("weight sync frame ended before every bucket was announced")
            for _, t in bucket:
                t = t.detach().contiguous()
                dist.broadcast(t.to(device) if device is not None else t, src=0, group=group)
        fut.result(timeout=600)


async def _gather(coros):
    import asyncio

    return await asyncio.gather(*coros)


def join_update_group(master_address: str, port: int, world_size: int, group_name: str, backend: str):
    """Rank 0 of the weight-update group, built the way SGLang's engines build theirs.

    The engines construct the group with a tcp rendezvous, a ``PrefixStore(group_name)`` and
    torch's process-group helper; joining it needs the same construction on this side (a plain
    ``new_group`` would need the engines inside our default group).
    """
    import datetime

    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = datetime.timedelta(seconds=600)
    store, rank, world = next(rendezvous(f"tcp://{master_address}:{port}", 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world, rank, [], backend, PrefixStore(group_name, store), group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}
    return pg


def resync_engine(sync: WeightSync, url: str) -> None:
    """Push the weights the other engines hold to one (restarted) engine, paused meanwhile.

    Runs on the supervisor's watcher thread with a private event loop and client. Before the
    first sync the engines hold the initial export the restart loaded, so there is nothing to do.
    """
    import asyncio

    from megatron_mtp_rl.rollout.sglang_client import SGLangClient

    payload = sync._last_payload
    if payload is None:
        return
    kind, data, version = payload

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
