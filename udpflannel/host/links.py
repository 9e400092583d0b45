"""Links, addresses and routes of the namespace the agent runs in; every change is recorded so undo()
removes exactly what we added and nothing else (the TUN itself vanishes with the worker's fd). The
netlink requests themselves run in a child process (host/netlink.py), for the agent's memory.

Backends decide what the host needs; this module only applies it. No iptables here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from dataclasses import asdict, dataclass, field

from udpflannel.host.netlink import Netlink, NetlinkError

log = logging.getLogger(__name__)


class HostError(RuntimeError):
    """A netlink change failed; the message names the object and the kernel's error."""


@dataclass(frozen=True, slots=True)
class Route:
    dst: str  # CIDR
    dev: str
    gateway: str | None = None
    onlink: bool = False
    src: str | None = None


@dataclass
class HostConfig:
    """Applies link/address/route changes and remembers them for undo(). Requests share one netlink child
    until close(); callers close once they are done configuring, and undo() opens a new one."""

    _addresses: list[tuple[str, str]] = field(default_factory=list)
    _routes: list[Route] = field(default_factory=list)
    _blackholes: list[str] = field(default_factory=list)
    _netlink: Netlink | None = None

    def connect(self) -> None:
        """Start the netlink child now: its pyroute2 import (~0.3 s) then overlaps other work, such as
        the datapath workers starting. Requests start it when needed otherwise."""
        if self._netlink is None:
            self._netlink = Netlink()

    def _call(self, op: str, **args: object) -> object:
        self.connect()
        assert self._netlink is not None
        return self._netlink.call(op, **args)

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None

    def link_index(self, name: str, wait: float = 0.0) -> int:
        """Index of link `name`; waits up to `wait` seconds for it to appear (a TUN opened by a worker)."""
        try:
            return int(self._call("link_index", name=name, wait=wait))  # type: ignore[call-overload]
        except NetlinkError as exc:
            raise HostError(str(exc)) from exc

    def link_mtu(self, name: str) -> int:
        try:
            return int(self._call("link_mtu", name=name))  # type: ignore[call-overload]
        except NetlinkError as exc:
            raise HostError(f"reading the MTU of {name}: {exc}") from exc

    def route_to(self, ip: str) -> dict[str, str | None]:
        """How the kernel reaches `ip`: {"dev": link name, "gateway": address or None}; {} without a route."""
        try:
            got = self._call("route_via", dst=ip)
        except NetlinkError as exc:
            raise HostError(f"looking up the route to {ip}: {exc}") from exc
        if not isinstance(got, dict) or got.get("oif") is None:
            return {}
        try:
            dev: str | None = socket.if_indextoname(int(got["oif"]))
        except OSError:
            dev = None
        return {"dev": dev, "gateway": got.get("gateway")}

    def set_link(
        self,
        name: str,
        *,
        mtu: int | None = None,
        up: bool = True,
        txqlen: int | None = None,
    ) -> None:
        """MTU, queue length and state."""
        attrs: dict[str, int] = {}
        if mtu is not None:
            attrs["mtu"] = mtu
        if txqlen is not None:
            attrs["txqlen"] = txqlen
        try:
            self._call("set_link", name=name, attrs=attrs, up=up)
        except NetlinkError as exc:
            raise HostError(f"setting link {name} {attrs} up={up}: {exc}") from exc

    def no_link_local(self, name: str) -> None:
        """No IPv6 link-local address on `name` (addr_gen_mode none), so the kernel sends no router
        solicitations or MLD reports into a tunnel that has no use for them. Set before the link goes up;
        harmless where IPv6 is disabled."""
        path = f"/proc/sys/net/ipv6/conf/{name}/addr_gen_mode"
        try:
            with open(path, "w") as f:
                f.write("1\n")
        except OSError as exc:
            log.info("could not turn off IPv6 link-local on %s: %s", name, exc)

    def add_address(self, dev: str, cidr: str) -> None:
        try:
            self._call("address", cmd="add", name=dev, cidr=cidr)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise HostError(f"adding address {cidr} to {dev}: {exc}") from exc
            return  # already there (a restart): not ours to remove later
        self._addresses.append((dev, cidr))

    def add_route(self, route: Route) -> None:
        try:
            self._call("route", cmd="replace", **asdict(route))
        except NetlinkError as exc:
            raise HostError(f"adding route {route}: {exc}") from exc
        if route not in self._routes:
            self._routes.append(route)

    def del_route(self, route: Route) -> None:
        try:
            self._call("route", cmd="del", **asdict(route))
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENODEV, errno.ENOENT):
                raise HostError(f"removing route {route}: {exc}") from exc
        if route in self._routes:
            self._routes.remove(route)

    def add_blackhole(self, cidr: str) -> bool:
        """A blackhole route for cidr (--ip-blackhole-route); False, changing nothing, when a route to that
        prefix exists already (a cni0 bridge's own, or ours from before a restart)."""
        try:
            self._call("blackhole", cmd="add", dst=cidr)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise HostError(f"adding blackhole route {cidr}: {exc}") from exc
            return False
        self._blackholes.append(cidr)
        return True

    def undo(self) -> None:
        """Remove every route and address we added, newest first. A link that is gone took its routes and
        addresses with it (as a TUN does when its last fd closes): nothing to ask netlink for those."""
        self._routes = [r for r in self._routes if _link_exists(r.dev)]
        self._addresses = [(dev, cidr) for dev, cidr in self._addresses if _link_exists(dev)]
        for route in reversed(list(self._routes)):
            try:
                self.del_route(route)
            except HostError:
                self._routes.remove(route)
        for cidr in reversed(self._blackholes):
            with contextlib.suppress(NetlinkError):
                self._call("blackhole", cmd="del", dst=cidr)
        self._blackholes.clear()
        for dev, cidr in reversed(self._addresses):
            # A link that went away took its addresses with it: nothing left to remove.
            with contextlib.suppress(NetlinkError):
                self._call("address", cmd="del", name=dev, cidr=cidr)
        self._addresses.clear()
        self.close()


def _link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
