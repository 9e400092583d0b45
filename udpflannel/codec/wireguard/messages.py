"""WireGuard wire layouts: message types, sizes, offsets and protocol constants (spec/wireguard.md).

Every wire constant of the protocol is defined here once; backend/ and dataplane/ import them from here.
No crypto, no state: decode_* only check sizes and types and return None for anything else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Message types (first byte; the next three bytes are zero).
MESSAGE_INITIATION_TYPE = 1
MESSAGE_RESPONSE_TYPE = 2
MESSAGE_COOKIE_REPLY_TYPE = 3
MESSAGE_TRANSPORT_TYPE = 4

MESSAGE_INITIATION_SIZE = 148
MESSAGE_RESPONSE_SIZE = 92
MESSAGE_COOKIE_REPLY_SIZE = 64
MESSAGE_TRANSPORT_HEADER_SIZE = 16
MESSAGE_TRANSPORT_SIZE = 32  # header + tag: the smallest transport message (a keepalive)
MESSAGE_KEEPALIVE_SIZE = MESSAGE_TRANSPORT_SIZE
MESSAGE_TRANSPORT_OFFSET_RECEIVER = 4
MESSAGE_TRANSPORT_OFFSET_COUNTER = 8
MESSAGE_TRANSPORT_OFFSET_CONTENT = 16
PADDING_MULTIPLE = 16

# Initiation offsets.
INIT_OFFSET_SENDER = 4
INIT_OFFSET_EPHEMERAL = 8
INIT_OFFSET_STATIC = 40
INIT_OFFSET_TIMESTAMP = 88
INIT_OFFSET_MAC1 = 116
INIT_OFFSET_MAC2 = 132
# Response offsets.
RESP_OFFSET_SENDER = 4
RESP_OFFSET_RECEIVER = 8
RESP_OFFSET_EPHEMERAL = 12
RESP_OFFSET_EMPTY = 44
RESP_OFFSET_MAC1 = 60
RESP_OFFSET_MAC2 = 76
# Cookie reply offsets.
COOKIE_OFFSET_RECEIVER = 4
COOKIE_OFFSET_NONCE = 8
COOKIE_OFFSET_COOKIE = 32
MAC_SIZE = 16

# Overhead of one transport message over UDP/IP: the figure flannel uses for MTU (backend MTU overhead 80
# covers IPv6 40 + UDP 8 + header 16 + tag 16).
TRANSPORT_OVERHEAD = MESSAGE_TRANSPORT_HEADER_SIZE + 16
MTU_OVERHEAD = 80

# Protocol constants (wireguard-go device/constants.go; spec/wireguard.md).
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 0.020  # at most one consumed initiation per peer per 20 ms
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
REKEY_TIMEOUT_JITTER_MAX = 0.334
UNDER_LOAD_AFTER_TIME = 1.0
QUEUE_STAGED_SIZE = 128

DEFAULT_PORT = 51820
DEFAULT_PORT_V6 = 51821

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

_HEADER = struct.Struct("<I")  # type byte + 3 reserved zero bytes, read as one little-endian word
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    enc_static: bytes
    enc_timestamp: bytes
    mac1: bytes
    mac2: bytes


@dataclass(frozen=True, slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    enc_empty: bytes
    mac1: bytes
    mac2: bytes


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    enc_cookie: bytes


@dataclass(frozen=True, slots=True)
class TransportHeader:
    receiver: int
    counter: int


def message_type(data: bytes | bytearray | memoryview) -> int | None:
    """The message type, or None when the 4-byte header is short or its reserved bytes are not zero."""
    if len(data) < 4:
        return None
    word = _HEADER.unpack_from(data, 0)[0]
    if word > 0xFF:
        return None
    return word


def encode_initiation(m: Initiation) -> bytes:
    return b"".join(
        (
            _HEADER.pack(MESSAGE_INITIATION_TYPE),
            _U32.pack(m.sender),
            m.ephemeral,
            m.enc_static,
            m.enc_timestamp,
            m.mac1,
            m.mac2,
        )
    )


def decode_initiation(data: bytes | bytearray | memoryview) -> Initiation | None:
    if len(data) != MESSAGE_INITIATION_SIZE or message_type(data) != MESSAGE_INITIATION_TYPE:
        return None
    b = bytes(data)
    return Initiation(
        sender=_U32.unpack_from(b, INIT_OFFSET_SENDER)[0],
        ephemeral=b[INIT_OFFSET_EPHEMERAL:INIT_OFFSET_STATIC],
        enc_static=b[INIT_OFFSET_STATIC:INIT_OFFSET_TIMESTAMP],
        enc_timestamp=b[INIT_OFFSET_TIMESTAMP:INIT_OFFSET_MAC1],
        mac1=b[INIT_OFFSET_MAC1:INIT_OFFSET_MAC2],
        mac2=b[INIT_OFFSET_MAC2:],
    )


def encode_response(m: Response) -> bytes:
    return b"".join(
        (
            _HEADER.pack(MESSAGE_RESPONSE_TYPE),
            _U32.pack(m.sender),
            _U32.pack(m.receiver),
            m.ephemeral,
            m.enc_empty,
            m.mac1,
            m.mac2,
        )
    )


def decode_response(data: bytes | bytearray | memoryview) -> Response | None:
    if len(data) != MESSAGE_RESPONSE_SIZE or message_type(data) != MESSAGE_RESPONSE_TYPE:
        return None
    b = bytes(data)
    return Response(
        sender=_U32.unpack_from(b, RESP_OFFSET_SENDER)[0],
        receiver=_U32.unpack_from(b, RESP_OFFSET_RECEIVER)[0],
        ephemeral=b[RESP_OFFSET_EPHEMERAL:RESP_OFFSET_EMPTY],
        enc_empty=b[RESP_OFFSET_EMPTY:RESP_OFFSET_MAC1],
        mac1=b[RESP_OFFSET_MAC1:RESP_OFFSET_MAC2],
        mac2=b[RESP_OFFSET_MAC2:],
    )


def encode_cookie_reply(m: CookieReply) -> bytes:
    return b"".join((_HEADER.pack(MESSAGE_COOKIE_REPLY_TYPE), _U32.pack(m.receiver), m.nonce, m.enc_cookie))


def decode_cookie_reply(data: bytes | bytearray | memoryview) -> CookieReply | None:
    if len(data) != MESSAGE_COOKIE_REPLY_SIZE or message_type(data) != MESSAGE_COOKIE_REPLY_TYPE:
        return None
    b = bytes(data)
    return CookieReply(
        receiver=_U32.unpack_from(b, COOKIE_OFFSET_RECEIVER)[0],
        nonce=b[COOKIE_OFFSET_NONCE:COOKIE_OFFSET_COOKIE],
        enc_cookie=b[COOKIE_OFFSET_COOKIE:],
    )


def encode_transport_header(receiver: int, counter: int) -> bytes:
    return _HEADER.pack(MESSAGE_TRANSPORT_TYPE) + _U32.pack(receiver) + _U64.pack(counter)


def pack_transport_header_into(buf: bytearray | memoryview, offset: int, receiver: int, counter: int) -> None:
    _TRANSPORT_HEADER.pack_into(buf, offset, MESSAGE_TRANSPORT_TYPE, receiver, counter)


_TRANSPORT_HEADER = struct.Struct("<IIQ")


def decode_transport_header(data: bytes | bytearray | memoryview) -> TransportHeader | None:
    """Header of a transport message; None when shorter than a keepalive or of another type."""
    if len(data) < MESSAGE_TRANSPORT_SIZE:
        return None
    word, receiver, counter = _TRANSPORT_HEADER.unpack_from(data, 0)
    if word != MESSAGE_TRANSPORT_TYPE:
        return None
    return TransportHeader(receiver=receiver, counter=counter)


def padded_length(n: int) -> int:
    """Plaintext length after zero-padding to a multiple of 16 (whitepaper 5.4.6)."""
    return (n + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1)


def transport_size(plaintext_len: int) -> int:
    return MESSAGE_TRANSPORT_HEADER_SIZE + padded_length(plaintext_len) + 16
