"""perf/udp_flood.py, the packet-rate benchmark's generator and counter: between two namespaces, what the
sender says it sent at a set rate is what the receiver counts, and the rate is kept."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

FLOOD = Path(__file__).resolve().parents[2] / "perf" / "udp_flood.py"


def test_flood_at_a_set_rate_is_counted_whole(lab) -> None:
    a, b = lab.netns("a"), lab.netns("b")
    lab.veth(a, b, "198.18.0.1/16", "198.18.0.2/16")
    recv = b.popen(
        sys.executable,
        str(FLOOD),
        "recv",
        "--port",
        "5300",
        "--seconds",
        "2.5",
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # bound before the first datagram
    sent = json.loads(
        a.exec(
            sys.executable,
            str(FLOOD),
            "send",
            "--dst",
            "198.18.0.2",
            "--port",
            "5300",
            "--seconds",
            "1",
            "--rate",
            "20000",
        )
    )
    got = json.loads(recv.communicate(timeout=30)[0])
    assert 14000 <= sent["sent"] <= 21000, sent  # 20000/s for 1 s, in batches of 64
    assert sent["calls"] * 64 == sent["sent"]
    assert got["received"] == sent["sent"], (got, sent)
    assert 0 < got["last"] - got["first"] <= 1.5
