"""Anti-replay sliding window of 8192 bits (8128 usable), RFC 6479 style, as wireguard-go replay/replay.go.

A fresh Filter is ready to use. Filters are not safe for concurrent use.
"""

from __future__ import annotations

BLOCK_BIT_LOG = 6  # 1 << 6 == 64 bits per block
BLOCK_BITS = 1 << BLOCK_BIT_LOG
RING_BLOCKS = 1 << 7
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS
BLOCK_MASK = RING_BLOCKS - 1
BIT_MASK = BLOCK_BITS - 1


class Filter:
    __slots__ = ("last", "ring")

    def __init__(self) -> None:
        self.last = 0
        self.ring = [0] * RING_BLOCKS

    def reset(self) -> None:
        self.last = 0
        self.ring[0] = 0

    def validate_counter(self, counter: int, limit: int) -> bool:
        """True if counter is below limit and has not been seen; marks it seen."""
        if counter >= limit:
            return False
        index_block = counter >> BLOCK_BIT_LOG
        if counter > self.last:
            # Move the window forward, clearing the blocks it passes (at most the whole ring).
            current = self.last >> BLOCK_BIT_LOG
            diff = min(index_block - current, RING_BLOCKS)
            ring = self.ring
            for i in range(current + 1, current + diff + 1):
                ring[i & BLOCK_MASK] = 0
            self.last = counter
        elif self.last - counter > WINDOW_SIZE:
            return False
        index_block &= BLOCK_MASK
        bit = 1 << (counter & BIT_MASK)
        old = self.ring[index_block]
        if old & bit:
            return False
        self.ring[index_block] = old | bit
        return True
