"""Container networking: host mode (shared network namespace, a mysqld port per container from hostd's
range) and bridge mode (a bridge owned by hostd, a veth pair per container, addresses from a pool)."""
from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Collection

from reddwarf.common.errors import ResourceExhausted
from reddwarf.common.runner import run

from .settings import BridgeSettings

log = logging.getLogger("reddwarf.hostd.network")

MYSQL_PORT = 3306


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

    def add_port(self, host_if: str, peer_if: str, peer_netns: str, address: str) -> None:
        """A veth pair: host_if on the bridge, peer_if moved into peer_netns with `address`."""
        self._ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        self._ip("link", "set", host_if, "master", self.settings.name, "up")
        self._ip("link", "set", peer_if, "netns", peer_netns)
        run(["ip", "-n", peer_netns, "addr", "add", f"{address}/{self.prefix_len}", "dev", peer_if])
        run(["ip", "-n", peer_netns, "link", "set", peer_if, "up"])
        run(["ip", "-n", peer_netns, "route", "replace", "default", "via", self.gateway])

    def remove_port(self, host_if: str) -> None:
        argv = ["ip"] + (["-n", self.settings.netns] if self.settings.netns else []) + [
            "link", "del", host_if]
        run(argv, check=False)  # deleting one end removes the pair; absent is fine

    def destroy(self) -> None:
        if self.exists():
            self._ip("link", "del", self.settings.name)
