"""Sans-I/O WireGuard (interoperable with wireguard-go): bytes and `now` in, datagrams, events and timer
deadlines out. Layouts in messages.py, handshake in noise.py, device state machine in session.py."""

from udpflannel.codec.wireguard.batch import OpenedBatch, SealedBatch, open_batch, seal_batch
from udpflannel.codec.wireguard.events import (
    Delivered,
    Drop,
    DropReason,
    Event,
    HandshakeCompleted,
    Queued,
    Reply,
)
from udpflannel.codec.wireguard.session import Device, Peer
from udpflannel.codec.wireguard.timers import Timing

__all__ = [
    "Delivered",
    "Device",
    "Drop",
    "DropReason",
    "Event",
    "HandshakeCompleted",
    "OpenedBatch",
    "Peer",
    "Queued",
    "Reply",
    "SealedBatch",
    "Timing",
    "open_batch",
    "seal_batch",
]
