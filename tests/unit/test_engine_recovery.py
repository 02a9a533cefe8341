"""A rollout engine killed mid-batch: the batch completes with every sample exactly once, the
engine is restarted and gets the current weights before it serves again (fake SGLang servers)."""

import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import torch

from megatron_mtp_rl.cluster.weight_sync import resync_engine
from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
from megatron_mtp_rl.rollout.sglang.server import SGLangServerConfig
from tests.dist_utils import free_port

FAKE = str(Path(__file__).resolve().parents[1] / "fake_sglang_server.py")


def _state(url):
    import json
    import urllib.request

    with urllib.request.urlopen(url + "/_fake/state", timeout=5) as r:
        return json.loads(r.read())


def test_kill_an_engine_mid_batch(tmp_path):
    base, router = free_port(span=2), free_port()
    cfg = SGLangServerConfig(
        model_path=str(tmp_path),
        num_engines=2,
        port=base,
        port_stride=1,
        router_port=router,
        server_cmd=[sys.executable, FAKE, "--fake-delay", "0.15"],
        router_cmd=[sys.executable, FAKE, "--router"],
        watch_interval_s=0.2,
        startup_timeout_s=60,
        restart_timeout_s=60,
        log_dir=str(tmp_path / "logs"),
    )
    engine = SGLangEngine.launch(cfg, max_retries=6, backoff_s=0.1, backoff_max_s=0.5, max_concurrency=8)
    try:
        sync = types.SimpleNamespace(_last_payload=("tensor", [[("model.layers.0.mlp.w", torch.ones(3))]], 7))
        engine.supervisor.on_restart = lambda url: resync_engine(sync, url)
        prompts = [[i + 1, i + 2, i + 3] for i in range(32)]
        sp = SamplingParams(temperature=1.0, max_new_tokens=4)
        reference, _ = engine.generate(prompts, sp, seed=11)

        victim = engine.supervisor.engines[0]
        pid = victim.popen.pid

        killed_at = []

        def kill():
            time.sleep(0.3)
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            killed_at.append(time.monotonic())

        t = threading.Thread(target=kill)
        t.start()
        outs, stats = engine.generate(prompts, sp, seed=11)
        done_at = time.monotonic()
        t.join()
        assert killed_at and killed_at[0] < done_at  # the engine died while the batch was running
        # Every prompt answered once, in order, with the same completion as without the kill.
        assert [o.response_ids for o in outs] == [o.response_ids for o in reference]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(ev[1] == "restarted" and ev[2] == "engine0" for ev in engine.supervisor.events):
                break
            time.sleep(0.2)
        events = [(what, who) for _, what, who in engine.supervisor.events]
        assert ("died", "engine0") in events and ("resynced", "engine0") in events
        assert events.index(("resynced", "engine0")) < events.index(("restarted", "engine0"))
        assert victim.popen.pid != pid
        st = _state(victim.url)
        assert st["weight_version"] == "7"  # re-synced before serving again
        routes = [r["route"] for r in st["log"] if not r["route"].startswith(("/health", "/_fake"))]
        assert routes[:3] == ["/pause_generation", "/flush_cache", "/begin_weight_update"]
    finally:
        engine.close()


def test_a_hung_engine_is_killed_and_restarted(tmp_path):
    import json
    import urllib.request

    cfg = SGLangServerConfig(
        model_path=str(tmp_path),
        num_engines=1,
        port=free_port(),
        server_cmd=[sys.executable, FAKE],
        watch_interval_s=0.2,
        hung_after=3,
        startup_timeout_s=60,
        restart_timeout_s=60,
        log_dir=str(tmp_path / "logs"),
    )
    engine = SGLangEngine.launch(cfg, max_retries=8, backoff_s=0.2, backoff_max_s=1.0)
    try:
        url = engine.supervisor.engines[0].url
        pid = engine.supervisor.engines[0].popen.pid
        # Make the live engine stop answering /health (as a wedged scheduler would).
        req = urllib.request.Request(
            url + "/_fake/config", json.dumps({"startup_delay": 1e9}).encode(), {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(req, timeout=5).read()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(what == "restarted" for _, what, _ in engine.supervisor.events):
                break
            time.sleep(0.2)
        events = [what for _, what, who in engine.supervisor.events if who == "engine0"]
        assert "hung" in events and "died" in events and "restarted" in events
        assert engine.supervisor.engines[0].popen.pid != pid
        outs, _ = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3), seed=1)
        assert len(outs) == 1 and len(outs[0].response_ids) == 3
    finally:
        engine.close()


def test_servers_die_with_a_killed_trainer():
    """SGLang engines run in sessions of their own (die_with_parent): SIGKILL of the trainer that
    started one — no cleanup code runs — still takes the server down (parent-death signal)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    trainer = subprocess.Popen(
        [sys.executable, "-c", (
            "import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-m', 'megatron_mtp_rl.rollout.die_with_parent', str(os.getpid()),"
            " 'sleep', '60'], start_new_session=True)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        server = psutil.Process(int(trainer.stdout.readline()))
        deadline = time.monotonic() + 10
        while server.cmdline()[:1] != ["sleep"] and time.monotonic() < deadline:  # the wrapper exec'd the command
            time.sleep(0.05)
        assert server.cmdline() == ["sleep", "60"] and server.ppid() == trainer.pid
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        server.wait(10)  # raises psutil.TimeoutExpired if the server outlived its trainer
    finally:
        trainer.kill()
