"""What the WireGuard codec hands back to its caller: frozen events and the named drop reasons.

Values of DropReason are the /metrics labels. Nothing here reads a socket or a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Endpoint = tuple  # (host: str, port: int), as a socket returns it


class DropReason(enum.Enum):
    BAD_HEADER = "bad_header"  # short, unknown type, reserved bytes set
    BAD_SIZE = "bad_size"  # a handshake or cookie message of the wrong length
    BAD_MAC1 = "bad_mac1"
    BAD_MAC2 = "bad_mac2"
    COOKIE_REQUIRED = "cookie_required"  # under load without a valid mac2: answered with a cookie reply
    RATE_LIMITED = "rate_limited"
    UNKNOWN_INDEX = "unknown_index"
    UNKNOWN_PEER = "unknown_peer"  # initiation from a static key we have no peer for
    DECRYPT_FAILED = "decrypt_failed"
    HANDSHAKE_FAILED = "handshake_failed"  # a low-order point or a response that does not match our state
    STALE_TIMESTAMP = "stale_timestamp"  # TAI64N not strictly greater than the last one accepted
    INITIATION_FLOOD = "initiation_flood"  # second initiation from one peer within 20 ms
    BAD_COOKIE_REPLY = "bad_cookie_reply"
    REPLAY = "replay"
    KEY_EXPIRED = "key_expired"  # keypair older than REJECT_AFTER_TIME or counter at REJECT_AFTER_MESSAGES
    BAD_INNER_PACKET = "bad_inner_packet"  # decrypted payload is not an IPv4/IPv6 packet that fits
    NOT_ALLOWED_IP = "not_allowed_ip"  # inner source address outside the peer's allowed IPs
    NO_SESSION = "no_session"  # nothing to send with and the staging queue is full
    TOO_BIG = "too_big"  # payload larger than the output buffer allows


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    peer: bytes  # the peer's static public key
    initiator: bool


@dataclass(frozen=True, slots=True)
class Delivered:
    peer: bytes
    payload: bytes  # the inner IP packet with WireGuard's zero padding removed


@dataclass(frozen=True, slots=True)
class Reply:
    """A datagram to send: handshake messages, cookie replies, keepalives, flushed staged packets."""

    data: bytes
    endpoint: Endpoint | None


@dataclass(frozen=True, slots=True)
class Drop:
    reason: DropReason


@dataclass(frozen=True, slots=True)
class Queued:
    """send() staged the packet until a handshake completes (it went out in a later Reply)."""

    peer: bytes


Event = HandshakeCompleted | Delivered | Reply | Drop | Queued
