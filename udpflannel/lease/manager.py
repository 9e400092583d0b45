"""Lease policy: which subnet this node takes, renewing it, re-acquiring it when lost, and peer events.

Stores only store (lease/store.py); every decision is made here. No clock is read: methods take `now`, the
same Unix time the store stamps expirations with. Allocation follows spec/flannel.md (etcd layout): our
PublicIP's lease, then the previous subnet.env's subnet, then a random pick among the first 100 free subnets.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from udpflannel.lease.model import Event, EventType, IPv4Network, IPv6Network, Lease, LeaseAttrs
from udpflannel.lease.store import Compacted, Conflict, NotFound, Store, StoreError
from udpflannel.subnet import SubnetEnv, count_subnets, iter_subnets, subnet_at

if TYPE_CHECKING:
    from udpflannel.config import NetworkConfig

DEFAULT_TTL = 24 * 3600.0  # flannel's subnet lease TTL
DEFAULT_RENEW_MARGIN = 3600.0  # --subnet-lease-renew-margin default, 60 minutes
# flannel picks at random among the first 100 free subnets so that agents starting together rarely collide.
RANDOM_POOL = 100
# Lost create races are retried with a fresh listing (flannel exits instead, spec/flannel.md); bounded.
MAX_ACQUIRE_TRIES = 10

_log = logging.getLogger(__name__)

Subnet = IPv4Network | IPv6Network


class SubnetsExhausted(StoreError):
    """Every subnet between SubnetMin and SubnetMax is leased or reserved."""


@dataclass
class PeerTracker:
    """The peers' leases as last reported, diffed like flannel's LeaseWatcher (pkg/lease/lease.go).

    Pure: leases and events in, events out. Our own lease (own_key) is never reported. ADDED means a new
    peer or one whose subnet attributes changed; a renewal that changes only the expiry reports nothing.
    """

    own_key: str | None = None
    _peers: dict[str, Lease] = field(default_factory=dict)

    def peers(self) -> list[Lease]:
        return [self._peers[key] for key in sorted(self._peers)]

    def reset(self, leases: Iterable[Lease]) -> list[Event]:
        """Replace the whole picture (after a listing); report what differs from the previous one."""
        fresh = {lease.key: lease for lease in leases if lease.key != self.own_key}
        events = [
            Event(EventType.REMOVED, old, old.revision)
            for key, old in self._peers.items()
            if key not in fresh
        ]
        for key, lease in fresh.items():
            old = self._peers.get(key)
            if old is None or old.attrs != lease.attrs:
                events.append(Event(EventType.ADDED, lease, lease.revision))
        self._peers = fresh
        return events

    def update(self, events: Iterable[Event]) -> list[Event]:
        """Apply store events in order; report the ones that change the picture."""
        out = []
        for event in events:
            key = event.lease.key
            if key == self.own_key:
                continue
            old = self._peers.get(key)
            if event.type is EventType.REMOVED:
                if old is not None:
                    del self._peers[key]
                    out.append(event)
                continue
            self._peers[key] = event.lease
            if old is None or old.attrs != event.lease.attrs:
                out.append(event)
        return out

    def set_own_key(self, key: str | None) -> list[Event]:
        """Our lease moved to `key`; a peer we tracked under that key is gone as far as routing goes."""
        self.own_key = key
        old = self._peers.pop(key, None) if key is not None else None
        return [Event(EventType.REMOVED, old, old.revision)] if old is not None else []


@dataclass(frozen=True)
class _Family:
    """One address family's allocation range, with the net-conf field names used in messages."""

    network: Subnet
    subnet_len: int
    first: Subnet
    last: Subnet
    names: tuple[str, str, str]  # ("Network", "SubnetMin", "SubnetMax") or the IPv6 twins

    @classmethod
    def build(cls, network: Any, subnet_len: int, smin: Any, smax: Any, v6: bool) -> _Family:
        # Defaults as flannel's: the first subnet is never handed out, the last one is.
        first = smin or subnet_at(network, subnet_len, 1)
        last = smax or subnet_at(network, subnet_len, count_subnets(network, subnet_len) - 1)
        names = (
            ("IPv6Network", "IPv6SubnetMin", "IPv6SubnetMax") if v6 else ("Network", "SubnetMin", "SubnetMax")
        )
        return cls(network, subnet_len, first, last, names)

    def in_range(self, net: Subnet) -> bool:
        """Allocatable: our length, between first and last, and never the network's first subnet."""
        return (
            net.version == self.network.version
            and net.prefixlen == self.subnet_len
            and int(self.first.network_address) <= int(net.network_address) <= int(self.last.network_address)
            and net.network_address != self.network.network_address
        )

    def candidates(self) -> Iterator[Subnet]:
        for net in iter_subnets(self.network, self.subnet_len, self.first, self.last):
            if net.network_address != self.network.network_address:
                yield net

    def exhausted(self, held: int) -> SubnetsExhausted:
        net, smin, smax = self.names
        return SubnetsExhausted(
            f"no free subnet: all /{self.subnet_len} subnets of {net} {self.network} between {smin} "
            f"{self.first} and {smax} {self.last} are leased or reserved ({held} leases in the store): "
            f"widen {net} or {smin}/{smax} in net-conf.json, or delete the leases of nodes that are gone"
        )


class _Taken:
    """Subnets held by leases, for fast "is this candidate free?" checks."""

    def __init__(self, held: Iterable[Subnet | None], subnet_len: int) -> None:
        held = [net for net in held if net is not None]
        self._same_len = {net for net in held if net.prefixlen == subnet_len}
        # Reservations may be of another length; those need a real overlap test.
        self._other = [net for net in held if net.prefixlen != subnet_len]

    def free(self, net: Subnet) -> bool:
        if net in self._same_len:
            return False
        return not any(net.overlaps(other) for other in self._other)  # type: ignore[arg-type]


class LeaseManager:
    """Holds this node's lease in `store` for `config`, publishing `attrs`.

    Drive it with acquire(now) once, renew(now) when renew_due(now) has passed or `lost` is set, and
    watch_peers(timeout) in a loop for peer events. `subnet_file_hint` is the previous subnet.env
    (subnet.SubnetEnv: its .subnet and .ipv6_subnet interfaces are used).
    """

    def __init__(
        self,
        store: Store,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        *,
        subnet_file_hint: SubnetEnv | None = None,
        ttl: float = DEFAULT_TTL,
        renew_margin: float = DEFAULT_RENEW_MARGIN,
        rng: random.Random | None = None,
        log: logging.Logger = _log,
    ) -> None:
        if not 0 <= renew_margin < ttl:
            raise ValueError(f"renew margin {renew_margin}s must be at least 0 and less than the TTL {ttl}s")
        self._store = store
        self._config = config
        self._attrs = attrs
        self._hint = subnet_file_hint
        self._ttl = ttl
        self._renew_margin = renew_margin
        self._rng = rng or random.Random()
        self._log = log
        self._lease: Lease | None = None
        self._lost = False
        self._next_renew = 0.0
        self._tracker = PeerTracker()
        self._watch_rev: int | None = None
        self._pending: list[Event] = []
        self._v4 = (
            _Family.build(config.network, config.subnet_len, config.subnet_min, config.subnet_max, False)
            if config.enable_ipv4 and config.network is not None
            else None
        )
        self._v6 = (
            _Family.build(
                config.ipv6_network,
                config.ipv6_subnet_len,
                config.ipv6_subnet_min,
                config.ipv6_subnet_max,
                True,
            )
            if config.enable_ipv6 and config.ipv6_network is not None
            else None
        )
        if self._v4 is None and self._v6 is None:
            raise ValueError("the network config enables neither IPv4 nor IPv6")

    @property
    def lease(self) -> Lease | None:
        return self._lease

    @property
    def lost(self) -> bool:
        """Our lease was deleted, expired or taken over: call renew(now) to re-acquire."""
        return self._lost

    def peers(self) -> list[Lease]:
        return self._tracker.peers()

    # -- acquiring ---------------------------------------------------------------------------------------

    def acquire(self, now: float) -> Lease:
        """Take a lease: ours by PublicIP, else the previous subnet.env's, else a random free one."""
        assigned = self._store.assigned_subnets()
        for _ in range(MAX_ACQUIRE_TRIES):
            snap = self._store.list()
            try:
                if assigned is not None:
                    lease = self._take_assigned(snap.leases, *assigned)
                else:
                    lease = (
                        self._reuse(snap.leases) or self._take_hint(snap.leases) or self._take_random(snap)
                    )
            except (Conflict, NotFound) as exc:
                # Another agent won the race for that subnet (or our old lease expired meanwhile): re-list.
                self._log.info("lost a race for a subnet (%s), retrying with a fresh listing", exc)
                continue
            self._set_lease(lease, now)
            return lease
        raise StoreError(
            f"could not acquire a subnet lease in {MAX_ACQUIRE_TRIES} tries: other agents took every subnet "
            "we picked; check for agents restarting in a loop"
        )

    def _is_ours(self, lease: Lease) -> bool:
        if self._attrs.public_ip is not None:
            return lease.attrs.public_ip == self._attrs.public_ip
        return self._attrs.public_ipv6 is not None and lease.attrs.public_ipv6 == self._attrs.public_ipv6

    def _fits(self, lease: Lease) -> bool:
        """Whether a lease matches the current config's families and ranges (a reservation: its Network)."""
        for fam, net in ((self._v4, lease.subnet), (self._v6, lease.ipv6_subnet)):
            if (fam is None) != (net is None):
                return False
            if fam is None or net is None:
                continue
            if lease.is_reservation:
                if not net.subnet_of(fam.network):  # type: ignore[arg-type]
                    return False
            elif not fam.in_range(net):
                return False
        return True

    def _reuse(self, leases: list[Lease]) -> Lease | None:
        # Reservations first: an admin's choice beats a lease we happened to hold.
        for lease in sorted((x for x in leases if self._is_ours(x)), key=lambda x: not x.is_reservation):
            if self._fits(lease):
                renewed = self._store.renew(lease, self._attrs, self._ttl)
                self._log.info("reusing %s %s of our PublicIP", _kind(lease), lease.key)
                return renewed
            if not lease.is_reservation:
                # flannel does the same: a lease of ours from an older config would only block a subnet.
                self._log.info("deleting our lease %s: it does not fit the current network config", lease.key)
                # Gone or changed meanwhile: either way it is not ours to clean up any more.
                with contextlib.suppress(NotFound, Conflict):
                    self._store.delete(lease)
        return None

    def _take_hint(self, leases: list[Lease]) -> Lease | None:
        hint = self._hint
        if hint is None:
            return None
        self._hint = None  # tried at most once: after a lost race or a mismatch, fall through to random
        wanted: list[Subnet | None] = []
        for fam, iface in (
            (self._v4, getattr(hint, "subnet", None)),
            (self._v6, getattr(hint, "ipv6_subnet", None)),
        ):
            if fam is None:
                wanted.append(None)
                continue
            net = iface.network if iface is not None else None
            if net is None or not fam.in_range(net):
                self._log.info("previous subnet %s is not in the current range, not reusing it", net)
                return None
            held = [x.subnet if fam.network.version == 4 else x.ipv6_subnet for x in leases]
            if not _Taken(held, fam.subnet_len).free(net):
                self._log.info("previous subnet %s is taken, not reusing it", net)
                return None
            wanted.append(net)
        lease = self._store.create(wanted[0], wanted[1], self._attrs, self._ttl)  # type: ignore[arg-type]
        self._log.info("took %s again, the subnet of the previous subnet.env", lease.key)
        return lease

    def _take_random(self, snap: Any) -> Lease:
        leases: list[Lease] = snap.leases
        picked: list[Subnet | None] = []
        for fam in (self._v4, self._v6):
            if fam is None:
                picked.append(None)
                continue
            held = [x.subnet if fam.network.version == 4 else x.ipv6_subnet for x in leases]
            taken = _Taken(held, fam.subnet_len)
            pool: list[Subnet] = []
            for net in fam.candidates():
                if taken.free(net):
                    pool.append(net)
                    if len(pool) == RANDOM_POOL:
                        break
            if not pool:
                raise fam.exhausted(len(leases))
            picked.append(self._rng.choice(pool))
        lease = self._store.create(picked[0], picked[1], self._attrs, self._ttl)  # type: ignore[arg-type]
        self._log.info("leased new subnet %s", lease.key)
        return lease

    def _take_assigned(self, leases: list[Lease], v4: IPv4Network | None, v6: IPv6Network | None) -> Lease:
        # Kubernetes mode: the node's podCIDR is the subnet, no choice (spec/flannel.md, Kubernetes mode).
        for fam, net in ((self._v4, v4), (self._v6, v6)):
            if fam is not None and net is not None and not net.subnet_of(fam.network):  # type: ignore[arg-type]
                name = fam.names[0]
                raise StoreError(
                    f"the node's podCIDR {net} is outside {name} {fam.network}: fix net-conf.json"
                )
        key = Lease(subnet=v4, ipv6_subnet=v6, attrs=self._attrs).key
        for lease in leases:
            if lease.key == key:
                return self._store.renew(lease, self._attrs, self._ttl)
        return self._store.create(v4, v6, self._attrs, self._ttl)

    def _set_lease(self, lease: Lease, now: float) -> None:
        self._lease = lease
        self._lost = False
        # A reservation never expires; we still renew it on the TTL's rhythm to publish our attributes
        # and to notice if an admin removed it.
        expiration = lease.expiration if lease.expiration is not None else now + self._ttl
        self._next_renew = expiration - self._renew_margin
        self._pending.extend(self._tracker.set_own_key(lease.key))

    # -- keeping it --------------------------------------------------------------------------------------

    def renew_due(self, now: float) -> float:
        """When renew(now) should run next: the renew margin before expiry, or now if we hold nothing."""
        if self._lease is None or self._lost:
            return now
        return self._next_renew

    def renew(self, now: float) -> Lease:
        """Extend our lease; if it is gone or was taken, re-acquire (and say so) and return the new one."""
        if self._lease is None:
            return self.acquire(now)
        if self._lost:
            self._log.warning("lease lost, re-acquiring: %s was deleted, expired or taken", self._lease.key)
            return self._reacquire(now)
        try:
            lease = self._store.renew(self._lease, self._attrs, self._ttl)
        except (NotFound, Conflict) as exc:
            self._log.warning("lease lost, re-acquiring: %s", exc)
            return self._reacquire(now)
        self._set_lease(lease, now)
        return lease

    def _reacquire(self, now: float) -> Lease:
        # Pods on this node hold addresses in the lost subnet: take it again while it is free, as flanneld's
        # restart would through subnet.env; only a taken subnet makes us move.
        lost = self._lease
        if lost is not None:
            v4 = ipaddress.IPv4Interface(str(lost.subnet)) if lost.subnet is not None else None
            v6 = ipaddress.IPv6Interface(str(lost.ipv6_subnet)) if lost.ipv6_subnet is not None else None
            self._hint = SubnetEnv(subnet=v4, ipv6_subnet=v6)
        return self.acquire(now)

    def release(self) -> None:
        """Delete our lease (clean shutdown, only when asked: flannel keeps it for the next start)."""
        if self._lease is None:
            return
        # Gone already, or expired and taken by another node: either way nothing of ours is left to delete.
        with contextlib.suppress(NotFound, Conflict):
            self._store.delete(self._lease)
        self._lease = None
        self._tracker.set_own_key(None)

    # -- peers -------------------------------------------------------------------------------------------

    def watch_peers(self, timeout: float) -> list[Event]:
        """Peer events since the last call (the first call lists everything), waiting up to `timeout`."""
        if self._pending:
            pending, self._pending = self._pending, []
            return pending
        if self._watch_rev is None:
            return self._relist()
        try:
            events = self._store.watch(after=self._watch_rev, timeout=timeout)
        except Compacted as exc:
            self._log.info("peer watch fell behind (%s): re-listing", exc)
            return self._relist()
        if not events:
            return []
        self._watch_rev = events[-1].revision
        own = self._lease
        if own is not None:
            for event in events:
                newer = event.lease.key == own.key and event.revision > own.revision
                if newer and (event.type is EventType.REMOVED or not self._is_ours(event.lease)):
                    self._note_lost(own)
        return self._tracker.update(events)

    def _relist(self) -> list[Event]:
        snap = self._store.list()
        self._watch_rev = snap.revision
        own = self._lease
        if own is not None and snap.revision >= own.revision:
            held = {lease.key: lease for lease in snap.leases}.get(own.key)
            if held is None or not self._is_ours(held):
                self._note_lost(own)
        return self._tracker.reset(snap.leases)

    def _note_lost(self, own: Lease) -> None:
        if not self._lost:
            self._log.warning("our lease %s was removed or taken: will re-acquire", own.key)
        self._lost = True


def _kind(lease: Lease) -> str:
    return "reservation" if lease.is_reservation else "lease"
