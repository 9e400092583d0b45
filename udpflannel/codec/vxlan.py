"""VXLAN (RFC 7348) as kernel flannel.1 speaks it: encode/decode of the 8-byte VXLAN header plus the inner
Ethernet header, per packet and for whole numpy batches. The wire constants live in codec/wire.py (no
numpy, for the control plane) and are re-exported here. Sans-I/O: no sockets, no clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from udpflannel.codec.wire import (  # noqa: F401  (wire constants, re-exported for the datapath)
    ETH_HEADER_LEN,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    OUTER_IPV4_UDP_LEN,
    OUTER_IPV6_UDP_LEN,
    VNI_MAX,
    VXLAN_DEFAULT_VNI,
    VXLAN_FLAGS_I,
    VXLAN_HEADER,
    VXLAN_HEADER_LEN,
    VXLAN_HEADROOM,
    VXLAN_OVERHEAD,
    VXLAN_OVERHEAD_V6,
    VXLAN_PORT,
    format_mac,
    parse_mac,
)

# Result codes of decode_batch; the dataplane maps them to its DropReason members.
OK = 0
BAD_HEADER = 1  # shorter than VXLAN + Ethernet, or the I flag missing / reserved flags set
BAD_VNI = 2
WRONG_DST_MAC = 3
BAD_ETHERTYPE = 4  # not IPv4/IPv6, or the inner IP version disagrees with the ethertype


@dataclass(frozen=True, slots=True)
class VxlanFrame:
    """One decoded VXLAN payload: the inner IP packet and the inner Ethernet addresses."""

    vni: int
    dst_mac: bytes
    src_mac: bytes
    ethertype: int
    inner: bytes


def encode_vxlan(inner: bytes, vni: int, src_mac: bytes, dst_mac: bytes) -> bytes:
    """VXLAN header + inner Ethernet + the inner IP packet (the UDP payload kernel flannel.1 expects)."""
    if not 0 <= vni <= VNI_MAX:
        raise ValueError(f"VNI {vni} out of range")
    ethertype = ETHERTYPE_IPV6 if inner and inner[0] >> 4 == 6 else ETHERTYPE_IPV4
    return (
        VXLAN_HEADER.pack(VXLAN_FLAGS_I, vni << 8) + dst_mac + src_mac + struct.pack("!H", ethertype) + inner
    )


def decode_vxlan(data: bytes, vni: int, our_mac: bytes) -> VxlanFrame | int:
    """Validate one UDP payload as flannel.1 would; returns the frame or a result code (BAD_HEADER, ...)."""
    if len(data) < VXLAN_HEADROOM + 1:
        return BAD_HEADER
    flags, vni_field = VXLAN_HEADER.unpack_from(data)
    # RFC 7348 says receivers ignore reserved bits, but Linux drops frames with flags it does not know
    # (vxlan_rcv: unparsed flags -> drop); we match the kernel peer so both ends agree on what is accepted.
    if flags != VXLAN_FLAGS_I or vni_field & 0xFF:
        return BAD_HEADER
    if vni_field >> 8 != vni:
        return BAD_VNI
    dst_mac = data[8:14]
    if dst_mac != our_mac:
        return WRONG_DST_MAC
    (ethertype,) = struct.unpack_from("!H", data, 20)
    version = data[VXLAN_HEADROOM] >> 4
    if (ethertype, version) not in ((ETHERTYPE_IPV4, 4), (ETHERTYPE_IPV6, 6)):
        return BAD_ETHERTYPE
    return VxlanFrame(vni, dst_mac, data[14:20], ethertype, data[VXLAN_HEADROOM:])


def vxlan_header_template(vni: int, src_mac: bytes) -> np.ndarray:
    """The 22 header bytes with dst MAC and ethertype zeroed, as a uint8 row to broadcast over a batch."""
    return np.frombuffer(encode_vxlan(b"", vni, src_mac, bytes(6))[:VXLAN_HEADROOM], dtype=np.uint8).copy()


def encode_batch(
    buf: np.ndarray, lengths: np.ndarray, offset: int, template: np.ndarray, dst_macs: np.ndarray
) -> None:
    """Write VXLAN + Ethernet headers into the headroom in front of each inner packet, in place.

    buf is uint8 [n, stride] with inner packet i at buf[i, offset:offset + lengths[i]]; dst_macs is uint8
    [n, 6] (each packet's peer VtepMAC). After this, datagram i is buf[i, offset - 22:offset + lengths[i]].
    """
    if offset < VXLAN_HEADROOM:
        raise ValueError(f"headroom {offset} < {VXLAN_HEADROOM}")
    n = len(lengths)
    if n == 0:
        return
    start = offset - VXLAN_HEADROOM
    hdr = buf[:n, start:offset]
    hdr[:] = template
    hdr[:, 8:14] = dst_macs[:n]
    is_v6 = (buf[:n, offset] >> 4) == 6
    hdr[:, 20] = np.where(is_v6, ETHERTYPE_IPV6 >> 8, ETHERTYPE_IPV4 >> 8)
    hdr[:, 21] = np.where(is_v6, ETHERTYPE_IPV6 & 0xFF, ETHERTYPE_IPV4 & 0xFF)


def expected_prefix(vni: int, our_mac: bytes) -> np.ndarray:
    """The first 14 bytes every valid frame to us starts with (flags, VNI, our MAC as inner destination)."""
    return np.frombuffer(encode_vxlan(b"", vni, bytes(6), our_mac)[:14], dtype=np.uint8).copy()


# Which of the first 23 bytes of a frame expected_headers() pins down: flags, VNI, our MAC (not the
# sender's MAC), the ethertype and the inner IP version nibble.
EXPECTED_MASK = np.array([0xFF] * 14 + [0] * 6 + [0xFF, 0xFF, 0xF0], dtype=np.uint8)


def expected_headers(vni: int, our_mac: bytes) -> np.ndarray:
    """uint8 [2, 23]: the first 23 bytes of a valid frame to us carrying IPv4 (row 0) or IPv6 (row 1),
    compared under EXPECTED_MASK, for decode_batch's fast path."""
    rows = np.zeros((2, VXLAN_HEADROOM + 1), dtype=np.uint8)
    rows[:, :14] = expected_prefix(vni, our_mac)
    rows[0, 20:23] = (ETHERTYPE_IPV4 >> 8, ETHERTYPE_IPV4 & 0xFF, 0x40)
    rows[1, 20:23] = (ETHERTYPE_IPV6 >> 8, ETHERTYPE_IPV6 & 0xFF, 0x60)
    return rows


def decode_batch(
    buf: np.ndarray,
    lengths: np.ndarray,
    offset: int,
    vni: int,
    our_mac: bytes,
    prefix: np.ndarray | None = None,
    expected: np.ndarray | None = None,
) -> np.ndarray:
    """Validate a batch of UDP payloads (datagram i at buf[i, offset:offset + lengths[i]]).

    `prefix` (from expected_prefix) enables a fast path when every frame is valid; `expected` (from
    expected_headers) a faster one, when every frame is valid and of one IP version.
    Returns uint8 result codes [n] (OK or the first failing check, in decode_vxlan's order). For OK rows the
    inner IP packet is at buf[i, offset + 22:offset + lengths[i]].
    """
    n = len(lengths)
    codes = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return codes
    if buf.shape[1] < offset + VXLAN_HEADROOM + 1:
        codes[:] = BAD_HEADER
        return codes
    hdr = buf[:n, offset : offset + VXLAN_HEADROOM + 1]
    short = lengths[:n] < VXLAN_HEADROOM + 1
    if expected is not None and not short.any():
        # Every frame equal to the expected bytes where the mask says so: three array operations.
        for row in expected:
            diff = hdr ^ row
            diff &= EXPECTED_MASK
            if not diff.any():
                return codes
    if prefix is not None:
        # Fast path for the common case (every frame valid): two comparisons over the batch.
        ethertype_ok = ((hdr[:, 20] == 0x08) & (hdr[:, 21] == 0x00) & (hdr[:, VXLAN_HEADROOM] >> 4 == 4)) | (
            (hdr[:, 20] == 0x86) & (hdr[:, 21] == 0xDD) & (hdr[:, VXLAN_HEADROOM] >> 4 == 6)
        )
        if ethertype_ok.all() and not short.any() and (hdr[:, :14] == prefix).all():
            return codes
    bad_flags = (hdr[:, 0] != VXLAN_FLAGS_I) | (hdr[:, 7] != 0)
    got_vni = (
        (hdr[:, 4].astype(np.uint32) << 16) | (hdr[:, 5].astype(np.uint32) << 8) | hdr[:, 6].astype(np.uint32)
    )
    bad_vni = got_vni != vni
    mac = np.frombuffer(our_mac, dtype=np.uint8)
    wrong_mac = (hdr[:, 8:14] != mac).any(axis=1)
    ethertype = (hdr[:, 20].astype(np.uint16) << 8) | hdr[:, 21]
    version = hdr[:, VXLAN_HEADROOM] >> 4
    good_type = ((ethertype == ETHERTYPE_IPV4) & (version == 4)) | (
        (ethertype == ETHERTYPE_IPV6) & (version == 6)
    )
    # Later checks first, so the earliest failing check wins (same order as decode_vxlan).
    codes[~good_type] = BAD_ETHERTYPE
    codes[wrong_mac] = WRONG_DST_MAC
    codes[bad_vni] = BAD_VNI
    codes[bad_flags | short] = BAD_HEADER
    return codes
