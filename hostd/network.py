"""Container networking: host mode (shared network namespace, a mysqld port per container from hostd's
range) and bridge mode (a bridge owned by hostd, a veth pair per container, addresses from a pool).

Bridge mode isolates tenants: every container has its own network namespace, its bridge port is
`isolated` (no frame between two containers' ports), and hostd's nftables table for the bridge lets a
container reach the host only where hostd published a host service for it (the control server's agent
and enrollment ports, DNAT from the gateway address) and forwards nothing a container sends elsewhere,
so a neighbour cannot route back in through the host either. The host (and what it routes to the
bridge's network) reaches each instance's mysqld at the instance's own address."""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
from collections.abc import Collection

from reddwarf.common.errors import ResourceExhausted
from reddwarf.common.runner import run

from .settings import BridgeSettings

log = logging.getLogger("reddwarf.hostd.network")

MYSQL_PORT = 3306
# Run by LXC on the host when a container's veth is made (args: name, "net", "up", "veth", bridge, host end):
# the port is isolated before the container's init ever runs.
# (LXC attaches the veth to the bridge only after this hook: the hook attaches it itself, isolated.)
VETH_UP_SCRIPT = """#!/bin/sh
# reddwarf-hostd: isolate a container's bridge port (written by hostd; rewritten at every start)
set -e
PATH=/usr/sbin:/usr/bin:/sbin:/bin
port="${{LXC_NET_PEER:-$6}}"  # args: name net up veth <bridge> <host end>
ip link set dev "$port" master {bridge}
bridge link set dev "$port" isolated on
"""


def veth_name(container_name: str) -> str:
    """The host end of a container's veth pair: stable per container, at most 15 characters."""
    return "rdv" + hashlib.sha256(container_name.encode()).hexdigest()[:11]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def port_is_free(port: int, address: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def allocate_port(port_min: int, port_max: int, taken: Collection[int]) -> int:
    """The lowest port in range that no container of ours holds and nothing on the host listens on."""
    for port in range(port_min, port_max + 1):
        if port not in taken and port_is_free(port):
            return port
    raise ResourceExhausted(f"no free mysqld port left in {port_min}-{port_max}", field="container.network_mode")


def allocate_address(cidr: str, taken: Collection[str]) -> tuple[str, int, str]:
    """(address, prefix length, gateway): the gateway is the network's first host (the bridge's own)."""
    net = ipaddress.ip_network(cidr, strict=False)
    hosts = net.hosts()
    gateway = str(next(hosts))
    for ip in hosts:
        if str(ip) not in taken:
            return str(ip), net.prefixlen, gateway
    raise ResourceExhausted(f"no free address left in {cidr}", field="container.network_mode")


class Bridge:
    """hostd's bridge, optionally inside a network namespace (tests make one of their own)."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        net = ipaddress.ip_network(settings.cidr, strict=False)
        self.gateway = str(next(net.hosts()))
        self.prefix_len = net.prefixlen

    @property
    def table(self) -> str:
        return "rd_" + self.settings.name.replace("-", "_")

    def _ns(self) -> list[str]:
        return ["ip", "netns", "exec", self.settings.netns] if self.settings.netns else []

    def _nft(self, script: str, check: bool = True) -> str:
        return run([*self._ns(), "nft", "-f", "-"], input=script, check=check).stdout

    def _ip(self, *args: str) -> str:
        argv = ["ip"] + (["-n", self.settings.netns] if self.settings.netns else []) + list(args)
        return run(argv).stdout

    def exists(self) -> bool:
        argv = ["ip"] + (["-n", self.settings.netns] if self.settings.netns else []) + [
            "link", "show", "dev", self.settings.name]
        return run(argv, check=False).returncode == 0

    def ensure(self) -> None:
        """Creates the bridge with the gateway address and brings it up; idempotent."""
        if not self.exists():
            self._ip("link", "add", "name", self.settings.name, "type", "bridge")
            log.info("bridge created", extra={"bridge": self.settings.name})
        addrs = self._ip("-o", "addr", "show", "dev", self.settings.name)
        if f" {self.gateway}/" not in addrs:
            self._ip("addr", "add", f"{self.gateway}/{self.prefix_len}", "dev", self.settings.name)
        self._ip("link", "set", self.settings.name, "up")
        # DNAT from the gateway to a service on the host's loopback needs loopback routing on the bridge.
        run([*self._ns(), "sysctl", "-q", "-w", f"net.ipv4.conf.{self.settings.name}.route_localnet=1"])
        self._filter()

    def _filter(self) -> None:
        """hostd's nftables table for this bridge (created once, kept while the bridge exists)."""
        if run([*self._ns(), "nft", "list", "table", "inet", self.table], check=False).returncode == 0:
            return
        br = self.settings.name
        self._nft(f"""table inet {self.table} {{
  chain rd_pre {{ type nat hook prerouting priority dstnat; policy accept; }}
  chain rd_post {{ type nat hook postrouting priority srcnat; policy accept; }}
  chain rd_in {{ type filter hook input priority filter; policy accept;
    iifname "{br}" ct state established,related accept
    iifname "{br}" ct status dnat accept
    iifname "{br}" icmp type echo-request accept
    iifname "{br}" counter drop
  }}
  chain rd_fwd {{ type filter hook forward priority filter; policy accept;
    iifname "{br}" counter drop
  }}
}}
""")
        log.info("bridge filter installed", extra={"bridge": br, "table": self.table})

    def publish_host_service(self, port: int, target: str = "127.0.0.1") -> str:
        """Makes a host service listening on target:port reachable from the containers as
        gateway:port (and nothing else of the host); idempotent. Returns the address to dial."""
        rules = run([*self._ns(), "nft", "list", "chain", "inet", self.table, "rd_pre"]).stdout
        if f"tcp dport {port} dnat ip to {target}:{port}" not in rules:
            self._nft(f'add rule inet {self.table} rd_pre iifname "{self.settings.name}" ip daddr {self.gateway} '
                      f"tcp dport {port} dnat ip to {target}:{port}\n")
        return f"{self.gateway}:{port}"

    def reach_host_service(self, address: str) -> str:
        """What a container on this bridge dials for the host service at `address` ("host:port"): a
        loopback service is published on the gateway (DNAT), any other address is let through the
        filter as it is. Idempotent."""
        host, port = split_host_port(address)
        if is_loopback(host):
            return self.publish_host_service(port, "127.0.0.1" if host == "localhost" else host)
        rules = run([*self._ns(), "nft", "list", "chain", "inet", self.table, "rd_in"]).stdout
        if f"ip daddr {host} tcp dport {port} accept" not in rules:
            self._nft(f'insert rule inet {self.table} rd_in iifname "{self.settings.name}" ip daddr {host} '
                      f"tcp dport {port} accept\n")
        return address

    def write_veth_script(self, path: str) -> str:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(VETH_UP_SCRIPT.format(bridge=self.settings.name))
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        return path

    def isolate(self, host_if: str) -> None:
        run([*self._ns(), "bridge", "link", "set", "dev", host_if, "isolated", "on"])

    def add_port(self, host_if: str, peer_if: str, peer_netns: str, address: str) -> None:
        """A veth pair: host_if on the bridge, peer_if moved into peer_netns with `address`."""
        self._ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        self._ip("link", "set", host_if, "master", self.settings.name, "up")
        self.isolate(host_if)
        self._ip("link", "set", peer_if, "netns", peer_netns)
        run(["ip", "-n", peer_netns, "addr", "add", f"{address}/{self.prefix_len}", "dev", peer_if])
        run(["ip", "-n", peer_netns, "link", "set", peer_if, "up"])
        run(["ip", "-n", peer_netns, "route", "replace", "default", "via", self.gateway])

    def remove_port(self, host_if: str) -> None:
        argv = ["ip"] + (["-n", self.settings.netns] if self.settings.netns else []) + [
            "link", "del", host_if]
        run(argv, check=False)  # deleting one end removes the pair; absent is fine

    def destroy(self) -> None:
        """Removes the bridge and hostd's nftables table for it (the route_localnet setting goes with the
        bridge)."""
        run([*self._ns(), "nft", "delete", "table", "inet", self.table], check=False)
        if self.exists():
            self._ip("link", "del", self.settings.name)
            log.info("bridge removed", extra={"bridge": self.settings.name})
