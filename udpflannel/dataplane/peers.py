"""The peer table: peer subnets -> (PublicIP, VtepMAC), with longest-prefix match for a whole batch of
destination addresses at once (numpy searchsorted per prefix length). Immutable: updates build a new table,
so the worker swaps tables between batches and traffic never stops.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np

from udpflannel.dataplane.spec import Peer

NO_PEER = -1
_FEW_SOURCES = 64  # strangers: up to this many rows are compared as bytes first


@dataclass(frozen=True, slots=True)
class _Level:
    """All prefixes of one length in one family: sorted masked network keys and their peer indices."""

    prefixlen: int
    mask: object  # np.uint32 for v4, 16-byte np.ndarray for v6
    keys: np.ndarray
    index: np.ndarray


def _v6_key(raw: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> 'S16' keys; byte strings of equal length sort as big-endian numbers do."""
    return np.ascontiguousarray(raw).view("S16").reshape(-1)


class PeerTable:
    """Longest-prefix match over peer subnets, both families; also the set of known peer source IPs."""

    def __init__(self, peers: list[Peer] = ()) -> None:  # type: ignore[assignment]
        self.peers: list[Peer] = list(peers)
        self.macs = np.zeros((max(len(self.peers), 1), 6), dtype=np.uint8)
        self.public_ips: list[str] = [p.public_ip for p in self.peers]
        self.sources: frozenset[str] = frozenset(self.public_ips)
        # Known outer sources as sorted uint32, for a vectorised np.isin over a receive batch.
        self.source_set = frozenset(int(ipaddress.IPv4Address(ip)) for ip in self.sources if ":" not in ip)
        self.source_v4 = np.array(sorted(self.source_set), dtype=np.uint32)
        self.source6_set = frozenset(ipaddress.IPv6Address(ip).packed for ip in self.sources if ":" in ip)
        # Which peers are reached over the IPv6 underlay (their outer destination is an IPv6 address).
        self.outer_v6 = np.array([":" in ip for ip in self.public_ips] or [False], dtype=bool)
        by_len: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, peer in enumerate(self.peers):
            net = ipaddress.ip_network(peer.subnet, strict=False)
            self.macs[i] = np.frombuffer(bytes.fromhex(peer.vtep_mac.replace(":", "")), dtype=np.uint8)
            by_len.setdefault((net.version, net.prefixlen), []).append((int(net.network_address), i))
        self._v4: list[_Level] = []
        self._v6: list[_Level] = []
        # The same prefixes as (prefix length, {network: peer index}), longest first, for lookup_one.
        self._one: dict[int, list[tuple[int, dict[int, int]]]] = {4: [], 6: []}
        for (version, plen), rows in sorted(by_len.items(), key=lambda kv: -kv[0][1]):
            rows.sort()
            nets: dict[int, int] = {}
            for key, i in rows:
                nets.setdefault(key, i)  # as searchsorted: the first of equal keys
            self._one[version].append((plen, nets))
            index = np.array([i for _, i in rows], dtype=np.int32)
            if version == 4:
                mask = np.uint32((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF)
                keys = np.array([k for k, _ in rows], dtype=np.uint32)
                self._v4.append(_Level(plen, mask, keys, index))
            else:
                mask_int = ((1 << 128) - 1) ^ ((1 << (128 - plen)) - 1)
                mask = np.frombuffer(mask_int.to_bytes(16, "big"), dtype=np.uint8)
                raw = np.array([list(k.to_bytes(16, "big")) for k, _ in rows], dtype=np.uint8)
                self._v6.append(_Level(plen, mask, _v6_key(raw), index))

    def __len__(self) -> int:
        return len(self.peers)

    def strangers(self, src_addr: np.ndarray) -> np.ndarray:
        """Rows whose outer source (uint8 [n, 4] IPv4 or [n, 16] IPv6) is no peer's PublicIP(v6)."""
        if src_addr.shape[1] == 16:
            known6 = self.source6_set
            if (src_addr == src_addr[0]).all():
                return np.full(len(src_addr), src_addr[0].tobytes() not in known6)
            return np.fromiter(
                (row.tobytes() not in known6 for row in src_addr), dtype=bool, count=len(src_addr)
            )
        n = len(src_addr)
        if n == 0:
            return np.zeros(0, dtype=bool)
        one = _one_v4_source(src_addr)
        if one is not None:
            return np.full(n, one not in self.source_set)
        known = self.source_v4
        src = np.ascontiguousarray(src_addr).view(">u4").reshape(-1)
        if len(known) == 0:
            return np.ones(len(src), dtype=bool)
        first = src[0]
        if (src == first).all():  # a GRO train, or one peer talking: one lookup
            return np.full(len(src), int(first) not in self.source_set)
        pos = np.minimum(np.searchsorted(known, src), len(known) - 1)
        return known[pos] != src

    def any_stranger(self, src_addr: np.ndarray) -> bool:
        """strangers(src_addr).any(), without arrays when the rows are one IPv4 source (a GRO train's
        stride-0 view, or the few trains of one receive): a receive of one superpacket asks this."""
        one = _one_v4_source(src_addr) if len(src_addr) and src_addr.shape[1] == 4 else None
        if one is not None:
            return one not in self.source_set
        return bool(self.strangers(src_addr).any())

    def lookup_one(self, packet: bytes) -> int:
        """lookup_packets for one packet (`packet`: its IP header at least) in plain Python, for a lone
        packet (a ping, a first SYN), which would otherwise pay some ten array calls."""
        if not packet:
            return NO_PEER
        version = packet[0] >> 4
        if version == 4 and len(packet) >= 20:
            dst, bits = int.from_bytes(packet[16:20], "big"), 32
        elif version == 6 and len(packet) >= 40:
            dst, bits = int.from_bytes(packet[24:40], "big"), 128
        else:
            return NO_PEER
        for plen, nets in self._one[version]:
            hit = nets.get(dst >> (bits - plen) << (bits - plen))
            if hit is not None:
                return hit
        return NO_PEER

    def lookup_v4(self, dst: np.ndarray) -> np.ndarray:
        """dst: uint32 [n] host-order addresses -> int32 [n] peer index or NO_PEER."""
        out = np.full(len(dst), NO_PEER, dtype=np.int32)
        for level in self._v4:
            todo = out == NO_PEER
            if not todo.any():
                break
            masked = dst & level.mask
            pos = np.searchsorted(level.keys, masked)
            pos = np.minimum(pos, len(level.keys) - 1)
            hit = todo & (level.keys[pos] == masked)
            out[hit] = level.index[pos[hit]]
        return out

    def lookup_v6(self, dst: np.ndarray) -> np.ndarray:
        """dst: uint8 [n, 16] addresses -> int32 [n] peer index or NO_PEER."""
        out = np.full(len(dst), NO_PEER, dtype=np.int32)
        for level in self._v6:
            todo = out == NO_PEER
            if not todo.any():
                break
            masked = _v6_key(dst & level.mask)
            pos = np.searchsorted(level.keys, masked)
            pos = np.minimum(pos, len(level.keys) - 1)
            hit = todo & (level.keys[pos] == masked)
            out[hit] = level.index[pos[hit]]
        return out

    def lookup_packets(self, buf: np.ndarray, offset: int, n: int) -> np.ndarray:
        """Peer index for each IP packet buf[i, offset:] by its destination address (NO_PEER otherwise)."""
        out = np.full(n, NO_PEER, dtype=np.int32)
        if n == 0 or not self.peers:
            return out
        version = buf[:n, offset] >> 4
        is_v4 = version == 4
        is_v6 = version == 6
        if is_v4.any():
            d = buf[:n, offset + 16 : offset + 20][is_v4]
            dst = np.ascontiguousarray(d).view(">u4").reshape(-1).astype(np.uint32)
            out[is_v4] = self.lookup_v4(dst)
        if is_v6.any():
            out[is_v6] = self.lookup_v6(buf[:n, offset + 24 : offset + 40][is_v6])
        return out


def _one_v4_source(src_addr: np.ndarray) -> int | None:
    """The one IPv4 source (host order) of rows (uint8 [n, 4], n >= 1) found without arrays: a GRO train's
    stride-0 view, or up to _FEW_SOURCES rows (the trains of one receive) whose bytes repeat the first's;
    None otherwise (the rows may still share one; the array path tells)."""
    if src_addr.strides[0] == 0:
        return int.from_bytes(src_addr[0].tobytes(), "big")
    if len(src_addr) <= _FEW_SOURCES:
        raw = src_addr.tobytes()
        if raw == raw[:4] * len(src_addr):
            return int.from_bytes(raw[:4], "big")
    return None
