"""The ``distributed`` sync's update group, in one process.

Where a stage's sender serves its rendezvous (``weight_sync.rendezvous_host``, torchrun): engines all
on loopback, loopback; an engine at one of this node's own addresses, that address; an engine
elsewhere, this node's address on the route to it; never the wildcard. And an engine that refuses
to join ends the push with its error at once instead of leaving the sender at the rendezvous.
"""

import ipaddress
import threading
import time

import psutil
import pytest

from megatron_mtp_rl.cluster.weight_sync import rendezvous_host


def _own_ipv4() -> list[tuple[str, str]]:
    """(address, netmask) of this machine's non-loopback IPv4 interfaces."""
    return [
        (a.address, a.netmask)
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback
    ]


def test_loopback_engines_keep_the_rendezvous_on_loopback():
    assert rendezvous_host(["http://127.0.0.1:30000", "http://127.0.0.1:30010"]) == "127.0.0.1"
    assert rendezvous_host(["http://localhost:30000"]) == "127.0.0.1"
    assert rendezvous_host(["http://[::1]:30000"]) == "::1"


def test_an_engine_at_this_nodes_address_gets_that_address():
    own = _own_ipv4()
    if not own:
        pytest.fail("this machine has no non-loopback IPv4 address to test with")
    for ip, _ in own:
        assert rendezvous_host([f"http://{ip}:30000"]) == ip
        # a loopback engine beside it reaches that address too
        assert rendezvous_host(["http://127.0.0.1:30000", f"http://{ip}:30010"]) == ip


def test_an_engine_on_another_node_gets_the_address_that_routes_to_it():
    own = _own_ipv4()
    ip, mask = own[0]
    ours = [a for a, _ in own]
    net = ipaddress.ip_network(f"{ip}/{mask}", strict=False)
    peer = next(str(h) for h in net.hosts() if str(h) not in ours)  # on this node's subnet, not this node
    assert rendezvous_host([f"http://{peer}:30000"]) == ip  # its interface's address, reachable from the peer
    host = rendezvous_host(["http://127.0.0.1:30000", f"http://{peer}:30000"])  # the remote one decides
    assert host == ip


def test_an_engine_that_refuses_to_join_fails_the_push_at_once(tmp_path, monkeypatch):
    from megatron_mtp_rl.cluster.weight_sync import WeightSync
    from megatron_mtp_rl.models import get_preset
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
    from megatron_mtp_rl.rollout.sglang.server import SGLangServerError
    from tests.fake_sglang_server import FakeServer

    async def keep(self, name):  # leave the engine's group of that name in place: it refuses a second one
        return None

    monkeypatch.setattr(WeightSync, "_drop_on_engines", keep)
    # the sender's own join gives up soon after the refusal (not after 600 s), so the test ends its thread
    monkeypatch.setattr("megatron_mtp_rl.cluster.weight_sync.RENDEZVOUS_TIMEOUT_S", 3.0)
    with FakeServer() as srv, SGLangEngine(srv.url) as engine:
        sync = WeightSync(engine, None, get_preset("tiny-moe"), mode="distributed", bucket_bytes=1,
                          export_dir=str(tmp_path))  # fmt: skip
        srv.state.update_groups[sync.group_name] = object()  # an earlier trainer's group
        t0 = time.monotonic()
        with pytest.raises(SGLangServerError, match="did not join weight-update group mtp_rl_weight_sync"):
            sync._ensure_group()
        assert time.monotonic() - t0 < 30  # the store would have waited 600 s for the engine's rank
        assert sync._group is None
    for t in threading.enumerate():  # the sender's join, still waiting at the rendezvous, gives up
        if t.name == "weight-sync-join":
            t.join(timeout=30)
            assert not t.is_alive()
