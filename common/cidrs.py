"""Trove's `access.allowed_cidrs`: networks written as CIDRs, checked, and turned into the host patterns
MariaDB matches account hosts with (`10.0.0.0/255.255.255.0`; IPv4 netmasks only, IPv6 exactly)."""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from .errors import InvalidArgument

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_CIDRS = 64


def parse_cidr(cidr: str, field: str) -> Network:
    """One network; refused (naming `field`) unless MariaDB can match exactly it as an account host."""
    if not isinstance(cidr, str) or not cidr or len(cidr) > 64 or cidr != cidr.strip():
        raise InvalidArgument("must be a network in CIDR form, like 10.0.0.0/24", field=field)
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"{cidr!r} is not a network in CIDR form ({exc})", field=field) from None
    if net.version == 6 and net.prefixlen != 128:
        raise InvalidArgument("MariaDB matches IPv6 client addresses only exactly: give one address as /128",
                              field=field)
    return net


def parse_cidrs(cidrs: Sequence[str], field: str = "access.allowed_cidrs") -> tuple[Network, ...]:
    if len(cidrs) > MAX_CIDRS:
        raise InvalidArgument(f"at most {MAX_CIDRS} networks", field=field)
    nets: list[Network] = []
    for i, c in enumerate(cidrs):
        net = parse_cidr(c, f"{field}[{i}]")
        if net not in nets:
            nets.append(net)
    return tuple(nets)


def host_pattern(net: Network) -> str:
    """The account host that matches exactly the clients in `net`."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    if net.prefixlen == 0:
        return "%"
    return f"{net.network_address}/{net.netmask}"


def host_within(host: str, nets: Sequence[Network]) -> bool:
    """Whether every client an account host matches lies in one of `nets` (a host name, a `%` pattern or
    `localhost` cannot be shown to: False)."""
    addr, _, mask = host.partition("/")
    try:
        net = ipaddress.ip_network(f"{addr}/{mask}" if mask else addr, strict=True)
    except ValueError:
        return False
    for n in nets:
        if isinstance(net, ipaddress.IPv4Network) and isinstance(n, ipaddress.IPv4Network) and net.subnet_of(n):
            return True
        if isinstance(net, ipaddress.IPv6Network) and isinstance(n, ipaddress.IPv6Network) and net.subnet_of(n):
            return True
    return False
