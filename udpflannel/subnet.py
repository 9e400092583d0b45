"""Subnet arithmetic on ipaddress objects, the backends' MTU overheads, and subnet.env (flannel's
WriteSubnetFile format, written atomically; read back tolerantly to keep the same subnet across restarts).

Arithmetic is index based (subnet i of a network = network address + i * subnet size), so a /32 of /64s costs
the same as a /16 of /24s: nothing is ever materialised.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network
IPv4Interface = ipaddress.IPv4Interface
IPv6Interface = ipaddress.IPv6Interface

Net = TypeVar("Net", IPv4Network, IPv6Network)

# Bytes of encapsulation each backend adds to a pod packet on an IPv4 underlay (spec/flannel.md, subnet.env):
# vxlan = outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14; udp = outer IPv4 20 + UDP 8;
# wireguard = flannel's 80 (outer IPv6 40 + UDP 8 + WireGuard data header 16 + tag 16, so v6 underlays fit);
# host-gw routes without encapsulation. The codecs' own constants must agree (tests check).
BACKEND_OVERHEAD: dict[str, int] = {"vxlan": 50, "udp": 28, "wireguard": 80, "host-gw": 0}

SUBNET_ENV_MODE = 0o644  # flannel's mode for a new subnet.env (an existing file keeps its mode)
SUBNET_DIR_MODE = 0o755


def backend_overhead(backend_type: str) -> int:
    """MTU overhead of a backend type; ValueError for a type flannel does not know."""
    try:
        return BACKEND_OVERHEAD[backend_type]
    except KeyError:
        raise ValueError(
            f"unknown backend type {backend_type!r}: use one of {sorted(BACKEND_OVERHEAD)}"
        ) from None


def pod_mtu(backend_type: str, iface_mtu: int, backend_mtu: int | None = None) -> int:
    """FLANNEL_MTU: the Backend MTU option (else the underlay interface's MTU) minus the backend overhead."""
    return (backend_mtu or iface_mtu) - backend_overhead(backend_type)


# --- arithmetic -----------------------------------------------------------------------------------------


def _check_len(network: IPv4Network | IPv6Network, subnet_len: int) -> int:
    """Bits of the subnet index; ValueError when subnet_len does not fit in the network."""
    if not network.prefixlen <= subnet_len <= network.max_prefixlen:
        raise ValueError(
            f"subnet length /{subnet_len} does not fit in {network}: "
            f"use {network.prefixlen}..{network.max_prefixlen}"
        )
    return subnet_len - network.prefixlen


def subnet_at(network: Net, subnet_len: int, index: int) -> Net:
    """The index-th subnet of length subnet_len in network (0 = the one at the network address)."""
    bits = _check_len(network, subnet_len)
    if not 0 <= index < (1 << bits):
        raise ValueError(
            f"index {index} is outside 0..{(1 << bits) - 1} for /{subnet_len} subnets of {network}"
        )
    size = 1 << (network.max_prefixlen - subnet_len)
    addr = int(network.network_address) + index * size
    return type(network)((addr, subnet_len))


def index_of(network: Net, subnet_len: int, subnet: Net) -> int:
    """Inverse of subnet_at: ValueError if subnet is not a /subnet_len subnet inside network."""
    _check_len(network, subnet_len)
    if (
        subnet.version != network.version or subnet.prefixlen != subnet_len or not subnet.subnet_of(network)  # type: ignore[arg-type]
    ):
        raise ValueError(f"{subnet} is not a /{subnet_len} subnet of {network}")
    size = 1 << (network.max_prefixlen - subnet_len)
    return (int(subnet.network_address) - int(network.network_address)) // size


def _bounds(network: Net, subnet_len: int, first: Net | None, last: Net | None) -> tuple[int, int]:
    lo = 0 if first is None else index_of(network, subnet_len, first)
    hi = (1 << _check_len(network, subnet_len)) - 1 if last is None else index_of(network, subnet_len, last)
    return lo, hi


def count_subnets(network: Net, subnet_len: int, first: Net | None = None, last: Net | None = None) -> int:
    """How many /subnet_len subnets lie from first to last inclusive (default: the whole network)."""
    lo, hi = _bounds(network, subnet_len, first, last)
    return max(0, hi - lo + 1)


def iter_subnets(
    network: Net, subnet_len: int, first: Net | None = None, last: Net | None = None
) -> Iterator[Net]:
    """Yield the /subnet_len subnets from first to last inclusive, in address order, lazily."""
    lo, hi = _bounds(network, subnet_len, first, last)
    size = 1 << (network.max_prefixlen - subnet_len)
    base = int(network.network_address)
    cls = type(network)
    index = lo
    while index <= hi:
        yield cls((base + index * size, subnet_len))
        index += 1


def first_host(subnet: IPv4Network | IPv6Network) -> IPv4Interface | IPv6Interface:
    """flannel's FLANNEL_SUBNET form: the subnet's first host address with the subnet's prefix."""
    cls = IPv4Interface if subnet.version == 4 else IPv6Interface
    return cls((int(subnet.network_address) + 1, subnet.prefixlen))


def _ip_interface(text: str, version: int) -> IPv4Interface | IPv6Interface:
    iface = ipaddress.ip_interface(text)
    if iface.version != version:
        raise ValueError(f"{text} is not IPv{version}")
    return iface  # type: ignore[return-value]


# --- subnet.env -----------------------------------------------------------------------------------------


@dataclass
class SubnetEnv:
    """The contents of subnet.env. Every field is optional so a partly readable file can still be returned;
    write_subnet_env needs mtu, ipmasq and at least one of subnet / ipv6_subnet."""

    network: IPv4Network | None = None
    subnet: IPv4Interface | None = None  # first host address / lease prefix, e.g. 198.19.1.1/24
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Interface | None = None
    mtu: int | None = None
    ipmasq: bool | None = None

    def render(self) -> bytes:
        """The exact bytes flannel's WriteSubnetFile writes (IPv4 lines, IPv6 lines, MTU, IPMASQ)."""
        if self.mtu is None or self.ipmasq is None:
            raise ValueError("subnet.env needs mtu and ipmasq")
        if self.subnet is None and self.ipv6_subnet is None:
            raise ValueError("subnet.env needs an IPv4 or an IPv6 subnet")
        if (self.subnet is not None and self.network is None) or (
            self.ipv6_subnet is not None and self.ipv6_network is None
        ):
            raise ValueError("subnet.env needs the network of every subnet it holds")
        lines = []
        if self.subnet is not None:
            lines.append(f"FLANNEL_NETWORK={self.network}")
            lines.append(f"FLANNEL_SUBNET={self.subnet}")
        if self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_NETWORK={self.ipv6_network}")
            lines.append(f"FLANNEL_IPV6_SUBNET={self.ipv6_subnet}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}")  # Go's %v of a bool
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def for_lease(
        cls,
        network: IPv4Network | None,
        subnet: IPv4Network | None,
        ipv6_network: IPv6Network | None,
        ipv6_subnet: IPv6Network | None,
        mtu: int,
        ipmasq: bool,
    ) -> SubnetEnv:
        """Build the env for a lease: the lease subnets become their first host addresses."""
        return cls(
            network=network,
            subnet=first_host(subnet) if subnet is not None else None,  # type: ignore[arg-type]
            ipv6_network=ipv6_network,
            ipv6_subnet=first_host(ipv6_subnet) if ipv6_subnet is not None else None,  # type: ignore[arg-type]
            mtu=mtu,
            ipmasq=ipmasq,
        )


def prepare_subnet_dir(path: str | os.PathLike[str]) -> None:
    """Make the subnet file's directory (0755) and check that a file can be written there, before anything
    is leased or set up; OSError when not (read-only, not a directory, an empty path)."""
    path = os.fspath(path)
    if not os.path.basename(path) or os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a directory, not a file", path)
    _, fd, tmp = _temp_beside(path)
    os.close(fd)
    os.unlink(tmp)


def _temp_beside(path: str) -> tuple[str, int, str]:
    """The file's directory (made 0755 when missing) and a new temp file in it: (directory, fd, name)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=SUBNET_DIR_MODE, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    return directory, fd, tmp


def write_subnet_env(path: str | os.PathLike[str], env: SubnetEnv) -> None:
    """Write subnet.env atomically: temp file in the same directory, fsync, rename, fsync the directory.

    Readers (the CNI plugin) see the old file or the new one, never a torn one. The parent directory is
    created (0755). A new file is 0644; an existing file keeps its mode, as flannel does.
    """
    data = env.render()
    path = os.fspath(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:  # (its directory too, maybe: _temp_beside makes that)
        mode = SUBNET_ENV_MODE
    directory, fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)  # mkstemp makes 0600; the CNI plugin may run as another user
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable, so a crash cannot bring back the old file.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def parse_env_lines(text: str) -> dict[str, str]:
    """KEY=VALUE lines as godotenv (flannel's reader) takes them: blank lines, # comments, `export `
    prefixes and matching quotes are allowed; lines without '=' are ignored."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def read_subnet_env(path: str | os.PathLike[str]) -> SubnetEnv | None:
    """Read subnet.env back, tolerantly: it only serves as a hint to keep the same subnet after a restart.

    Returns None when the file is missing, unreadable or not text. Otherwise returns a SubnetEnv whose fields
    are None where the key is absent or its value does not parse; unknown lines are ignored. Never raises
    for bad content (a corrupt hint must not stop the agent).
    """
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode()
    except (OSError, UnicodeDecodeError):
        return None
    kv = parse_env_lines(text)

    def field(key: str, parse):  # type: ignore[no-untyped-def]
        value = kv.get(key)
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError:
            return None

    def parse_bool(value: str) -> bool:
        # Go's strconv.ParseBool spellings
        if value in ("1", "t", "T", "true", "TRUE", "True"):
            return True
        if value in ("0", "f", "F", "false", "FALSE", "False"):
            return False
        raise ValueError(value)

    return SubnetEnv(
        network=field("FLANNEL_NETWORK", lambda v: IPv4Network(v, strict=False)),
        subnet=field("FLANNEL_SUBNET", lambda v: _ip_interface(v, 4)),
        ipv6_network=field("FLANNEL_IPV6_NETWORK", lambda v: IPv6Network(v, strict=False)),
        ipv6_subnet=field("FLANNEL_IPV6_SUBNET", lambda v: _ip_interface(v, 6)),
        mtu=field("FLANNEL_MTU", lambda v: int(v, 10)),
        ipmasq=field("FLANNEL_IPMASQ", parse_bool),
    )
