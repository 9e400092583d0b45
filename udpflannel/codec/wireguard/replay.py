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
# accept_run: runs spanning less than half the ring never wrap onto their own first block.
MAX_RUN = RING_BLOCKS // 2 * BLOCK_BITS


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

    def accept_run(self, first: int, count: int, limit: int) -> bool:
        """Mark counters first .. first+count-1 seen, as `count` validate_counter calls in order would, when
        every one of them lies past the newest counter seen (a sender's consecutive batch: all accepted).
        Returns False, changing nothing, otherwise: then check each counter with validate_counter."""
        end = first + count - 1
        if count <= 0 or first <= self.last or end >= limit or count > MAX_RUN:
            return False
        ring = self.ring
        current = self.last >> BLOCK_BIT_LOG
        for i in range(current + 1, current + min((end >> BLOCK_BIT_LOG) - current, RING_BLOCKS) + 1):
            ring[i & BLOCK_MASK] = 0
        # Set the run's bits block by block (a 64-counter batch touches at most two blocks).
        c = first
        while c <= end:
            block_end = min(end, c | BIT_MASK)
            bits = ((1 << (block_end - c + 1)) - 1) << (c & BIT_MASK)
            ring[(c >> BLOCK_BIT_LOG) & BLOCK_MASK] |= bits
            c = block_end + 1
        self.last = end
        return True
