"""The fake SGLang engine answers as the real SGLang 0.5.23 does, for every request the bridge sends.

One request script (``tests/sglang_contract.py``: generate with ids and log-probs, health, model and
server info, flush, abort (a running request, by its rid and by a pause: the tokens decoded so far come
back), pause/continue, the weight-update session with tensor, distributed (gloo) and disk updates,
update-group init/destroy, the version relabel, malformed requests) goes to the session's real engine
and to ``tests/fake_sglang_server.py``; status codes and answer keys (recursively inside ``meta_info``)
must be the same step for step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.real_sglang import export_family
from tests.sglang_contract import run_script

ROOT = Path(__file__).resolve().parents[2]
FAKE = str(ROOT / "tests" / "fake_sglang_server.py")


def run_on_fake(model_dir: Path, device: str) -> list:
    from tests.dist_utils import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            FAKE,
            "--port",
            str(port),
            "--model-path",
            str(model_dir),
            "--device",
            device,
            "--skip-tokenizer-init",
            "--fake-delay",
            "1.0",  # a request decodes for a while, as on the real engine: long enough to abort it
        ],  # as the real engine is started (tests/real_sglang.py)
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("the fake SGLang engine did not start") from None
                time.sleep(0.1)
        return run_script(url, model_dir)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.sglang
def test_the_fake_answers_every_bridge_request_as_the_real_sglang(single_process, real_sglang, tmp_path):
    model_dir = export_family(tmp_path, "glm4_moe")[0]
    real_sglang.serve(model_dir)
    real = run_script(real_sglang.url, model_dir)
    device = next(shape for step, _, shape in real if step == "server_info device")
    fake = run_on_fake(model_dir, device)
    diffs = [f"{r[0]}: real {r[1:]} | fake {f[1:]}" for r, f in zip(real, fake, strict=True) if r != f]
    assert not diffs, "the fake disagrees with the real SGLang:\n" + "\n".join(diffs)
    assert real_sglang.alive()  # no request of the script hurt the engine
