"""dataplane/counters.py: per-worker rows in shared memory, summed; visible across a fork."""

from __future__ import annotations

import os

from udpflannel.dataplane.counters import COUNTER_NAMES, INDEX, SLOTS, Counters


def test_rows_sum_and_names_fit():
    assert len(COUNTER_NAMES) <= SLOTS and len(set(COUNTER_NAMES)) == len(COUNTER_NAMES)
    c = Counters(2)
    try:
        c.row(0)[INDEX["tx_packets"]] += 3
        c.row(1)[INDEX["tx_packets"]] += 4
        c.row(1)[INDEX["drop_bad_vni"]] += 1
        t = c.totals()
        assert t["tx_packets"] == 7 and t["drop_bad_vni"] == 1 and t["rx_packets"] == 0
    finally:
        c.close()


def test_another_process_writes_through_the_fd():
    c = Counters(1)
    try:
        pid = os.fork()
        if pid == 0:
            child = Counters(1, fd=c.fd)
            child.row(0)[INDEX["rx_bytes"]] += 1234
            os._exit(0)
        os.waitpid(pid, 0)
        assert c.totals()["rx_bytes"] == 1234
    finally:
        c.close()
