"""The replay window table of wireguard-go replay/replay_test.go (ported there from the Linux kernel)."""

from __future__ import annotations

import pytest

from udpflannel.codec.wireguard.replay import WINDOW_SIZE, Filter

REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 4) - 1
T_LIM = WINDOW_SIZE + 1

# (counter, accepted?) in order; numbered as in replay_test.go.
TABLE = [
    (0, True),  # 1
    (1, True),  # 2
    (1, False),  # 3: duplicate
    (9, True),  # 4
    (8, True),  # 5: out of order inside the window
    (7, True),  # 6
    (7, False),  # 7
    (T_LIM, True),  # 8: window slides
    (T_LIM - 1, True),  # 9
    (T_LIM - 1, False),  # 10
    (T_LIM - 2, True),  # 11
    (2, True),  # 12: oldest still inside the window
    (2, False),  # 13
    (T_LIM + 16, True),  # 14
    (3, False),  # 15: now too old
    (T_LIM + 16, False),  # 16
    (T_LIM * 4, True),  # 17: jump clears the whole ring
    (T_LIM * 4 - (T_LIM - 1), True),  # 18
    (10, False),  # 19
    (T_LIM * 4 - T_LIM, False),  # 20
    (T_LIM * 4 - (T_LIM + 1), False),  # 21
    (T_LIM * 4 - (T_LIM - 2), True),  # 22
    (T_LIM * 4 + 1 - T_LIM, False),  # 23
    (0, False),  # 24
    (REJECT_AFTER_MESSAGES, False),  # 25: at the limit
    (REJECT_AFTER_MESSAGES - 1, True),  # 26
    (REJECT_AFTER_MESSAGES, False),  # 27
    (REJECT_AFTER_MESSAGES - 1, False),  # 28
    (REJECT_AFTER_MESSAGES - 2, True),  # 29
    (REJECT_AFTER_MESSAGES + 1, False),  # 30
    (REJECT_AFTER_MESSAGES + 2, False),  # 31
    (REJECT_AFTER_MESSAGES - 2, False),  # 32
    (REJECT_AFTER_MESSAGES - 3, True),  # 33
    (0, False),  # 34
]


def test_window_size_is_8128() -> None:
    assert WINDOW_SIZE == 8128


def test_replay_table() -> None:
    f = Filter()
    for number, (counter, expected) in enumerate(TABLE, start=1):
        assert f.validate_counter(counter, REJECT_AFTER_MESSAGES) is expected, f"case {number}"


def _run(f: Filter, counters: list[int], expected: bool) -> None:
    for c in counters:
        assert f.validate_counter(c, REJECT_AFTER_MESSAGES) is expected, c


@pytest.mark.parametrize(
    ("ascending", "then"),
    [
        (range(1, WINDOW_SIZE + 1), [(0, True), (0, False)]),  # bulk 1
        (range(2, WINDOW_SIZE + 2), [(1, True), (0, False)]),  # bulk 2
        (range(WINDOW_SIZE + 1, 0, -1), []),  # bulk 3
        (range(WINDOW_SIZE + 2, 1, -1), [(0, False)]),  # bulk 4
        (range(WINDOW_SIZE, 0, -1), [(WINDOW_SIZE + 1, True), (0, False)]),  # bulk 5
        (range(WINDOW_SIZE, 0, -1), [(0, True), (WINDOW_SIZE + 1, True)]),  # bulk 6
    ],
)
def test_bulk(ascending: range, then: list[tuple[int, bool]]) -> None:
    f = Filter()
    _run(f, list(ascending), True)
    for counter, expected in then:
        assert f.validate_counter(counter, REJECT_AFTER_MESSAGES) is expected


def test_reset_forgets() -> None:
    f = Filter()
    assert f.validate_counter(5, REJECT_AFTER_MESSAGES)
    assert not f.validate_counter(5, REJECT_AFTER_MESSAGES)
    f.reset()
    assert f.validate_counter(5, REJECT_AFTER_MESSAGES)
