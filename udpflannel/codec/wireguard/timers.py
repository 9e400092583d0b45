"""WireGuard timer policy (whitepaper 6, wireguard-go device/timers.go): one deadline per named timer.

Hooks are named after the event that calls them (`on_data_sent(now)`); deadlines are floats on the caller's
clock and session.py runs the expiry handlers. Jitter comes from an injected `jitter() -> [0, 1)`.
No clock is read here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from udpflannel.codec.wireguard import messages as m


@dataclass(frozen=True, slots=True)
class Timing:
    """The spec's timer constants; tests pass shortened ones."""

    rekey_after_time: float = m.REKEY_AFTER_TIME
    reject_after_time: float = m.REJECT_AFTER_TIME
    rekey_attempt_time: float = m.REKEY_ATTEMPT_TIME
    rekey_timeout: float = m.REKEY_TIMEOUT
    keepalive_timeout: float = m.KEEPALIVE_TIMEOUT
    rekey_after_messages: int = m.REKEY_AFTER_MESSAGES
    reject_after_messages: int = m.REJECT_AFTER_MESSAGES
    jitter_max: float = m.REKEY_TIMEOUT_JITTER_MAX

    @property
    def max_timer_handshakes(self) -> int:
        return int(self.rekey_attempt_time / self.rekey_timeout)

    @property
    def zero_key_material_after(self) -> float:
        return self.reject_after_time * 3

    @property
    def rekey_on_receive_after(self) -> float:
        # The initiator rekeys on receive before the responder's key would expire (165 s by default).
        return self.reject_after_time - self.keepalive_timeout - self.rekey_timeout


class TimerKind(enum.Enum):
    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEY_MATERIAL = "zero_key_material"
    PERSISTENT_KEEPALIVE = "persistent_keepalive"
    SEND_INITIATION = "send_initiation"  # due at once: send() found no usable keypair, or a rekey is due


@dataclass(slots=True)
class PeerTimers:
    timing: Timing
    jitter: Callable[[], float]
    persistent_keepalive_interval: float = 0.0
    deadlines: dict[TimerKind, float] = field(default_factory=dict)
    handshake_attempts: int = 0
    need_another_keepalive: bool = False
    sent_last_minute_handshake: bool = False

    def _jitter(self) -> float:
        return self.jitter() * self.timing.jitter_max

    def pending(self, kind: TimerKind) -> bool:
        return kind in self.deadlines

    def arm(self, kind: TimerKind, deadline: float) -> None:
        self.deadlines[kind] = deadline

    def disarm(self, kind: TimerKind) -> None:
        self.deadlines.pop(kind, None)

    def next_deadline(self) -> float | None:
        return min(self.deadlines.values()) if self.deadlines else None

    def pop_expired(self, now: float) -> list[TimerKind]:
        """Timers whose deadline is <= now, earliest first; they are disarmed."""
        due = sorted((d, k.value, k) for k, d in self.deadlines.items() if d <= now)
        for _, _, kind in due:
            del self.deadlines[kind]
        return [kind for _, _, kind in due]

    def clear(self) -> None:
        self.deadlines.clear()
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False

    # Hooks: each "should be called after" the event in its name (wireguard-go timers.go).

    def on_data_sent(self, now: float) -> None:
        """Outgoing data (not a keepalive): expect a reply within KEEPALIVE_TIMEOUT + REKEY_TIMEOUT."""
        if not self.pending(TimerKind.NEW_HANDSHAKE):
            t = self.timing
            self.arm(TimerKind.NEW_HANDSHAKE, now + t.keepalive_timeout + t.rekey_timeout + self._jitter())

    def on_data_received(self, now: float) -> None:
        """Incoming data: answer with a keepalive if we send nothing within KEEPALIVE_TIMEOUT."""
        if not self.pending(TimerKind.SEND_KEEPALIVE):
            self.arm(TimerKind.SEND_KEEPALIVE, now + self.timing.keepalive_timeout)
        else:
            self.need_another_keepalive = True

    def on_any_authenticated_packet_sent(self, now: float) -> None:
        self.disarm(TimerKind.SEND_KEEPALIVE)

    def on_any_authenticated_packet_received(self, now: float) -> None:
        self.disarm(TimerKind.NEW_HANDSHAKE)

    def on_handshake_initiated(self, now: float) -> None:
        self.arm(TimerKind.RETRANSMIT_HANDSHAKE, now + self.timing.rekey_timeout + self._jitter())

    def on_handshake_complete(self, now: float) -> None:
        self.disarm(TimerKind.RETRANSMIT_HANDSHAKE)
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def on_session_derived(self, now: float) -> None:
        self.arm(TimerKind.ZERO_KEY_MATERIAL, now + self.timing.zero_key_material_after)

    def on_any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval > 0:
            self.arm(TimerKind.PERSISTENT_KEEPALIVE, now + self.persistent_keepalive_interval)
