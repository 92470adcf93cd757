"""Bridge-mode networking, inside network namespaces this test creates (no traffic leaves them): hostd's
bridge with the pool's gateway address, a veth pair per container with an address from the pool."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from reddwarf.hostd.network import Bridge, allocate_address
from reddwarf.hostd.settings import BridgeSettings

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def namespaces():
    tag = uuid.uuid4().hex[:6]
    host_ns, guest_ns = f"rdh{tag}", f"rdg{tag}"
    sh("ip", "netns", "add", host_ns)
    sh("ip", "netns", "add", guest_ns)
    try:
        yield host_ns, guest_ns
    finally:
        sh("ip", "netns", "del", guest_ns, check=False)
        sh("ip", "netns", "del", host_ns, check=False)


def test_a_container_on_the_bridge_reaches_its_gateway(namespaces):
    host_ns, guest_ns = namespaces
    bridge = Bridge(BridgeSettings(name="rdbr-t", cidr="10.77.9.0/24", netns=host_ns))
    bridge.ensure()
    bridge.ensure()  # idempotent
    address, plen, gateway = allocate_address("10.77.9.0/24", taken=())
    assert (plen, gateway) == (24, "10.77.9.1") and address == "10.77.9.2"
    bridge.add_port("vethrdt0", "eth0", guest_ns, address)
    assert f"inet {address}/24" in sh("ip", "-n", guest_ns, "addr", "show", "dev", "eth0").stdout
    assert "isolated on" in sh("ip", "netns", "exec", host_ns, "bridge", "-d", "link", "show", "dev",
                               "vethrdt0").stdout
    table = sh("ip", "netns", "exec", host_ns, "nft", "list", "table", "inet", bridge.table).stdout
    assert 'iifname "rdbr-t" counter packets' in table and "drop" in table
    assert bridge.reach_host_service("127.0.0.1:8780") == "10.77.9.1:8780"
    assert bridge.reach_host_service("127.0.0.1:8780") == "10.77.9.1:8780"  # idempotent: one rule
    rules = sh("ip", "netns", "exec", host_ns, "nft", "list", "chain", "inet", bridge.table, "rd_pre").stdout
    assert rules.count("dnat ip to 127.0.0.1:8780") == 1
    ping = sh("ip", "netns", "exec", guest_ns, "ping", "-c", "1", "-W", "2", gateway, check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    bridge.remove_port("vethrdt0")
    assert sh("ip", "-n", guest_ns, "link", "show", "eth0", check=False).returncode != 0
    bridge.destroy()
    assert not bridge.exists()
    assert sh("ip", "netns", "exec", host_ns, "nft", "list", "table", "inet", bridge.table,
              check=False).returncode != 0


def test_the_pool_hands_out_each_address_once():
    taken: set[str] = set()
    for _ in range(3):
        addr, _, _ = allocate_address("10.77.8.0/29", taken)
        taken.add(addr)
    assert taken == {"10.77.8.2", "10.77.8.3", "10.77.8.4"}
    from reddwarf.common.errors import ResourceExhausted
    with pytest.raises(ResourceExhausted):
        allocate_address("10.77.8.0/30", {"10.77.8.2"})
