"""Where a stage's sender serves its weight-update rendezvous (``weight_sync.rendezvous_host``, torchrun).

Engines all on loopback: loopback. An engine at one of this node's own addresses: that address.
An engine elsewhere: this node's address on the route to it. Never the wildcard.
"""

import ipaddress

import psutil
import pytest

from megatron_mtp_rl.train.weight_sync import rendezvous_host


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
