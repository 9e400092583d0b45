"""`udpflannel trace --pcap`: frames of a capture dissected; a file that is no capture, a bad --backend or
--count are one line on stderr with an exit code, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from udpflannel.trace.cli import main

VXLAN_PCAP = Path(os.environ["UDPFLANNEL_TESTDATA"]) / "vxlan-kernel-flannel.pcap"


def test_pcap_frames_dissected(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--pcap", str(VXLAN_PCAP), "--count", "2"]) == 0
    out = capsys.readouterr().out
    assert "frame 1 " in out and "frame 2 " in out and "frame 3 " not in out
    assert "VXLAN" in out


@pytest.mark.parametrize("content", [b"", b"not a capture at all, just text\n" * 10, bytes(range(256))])
def test_a_file_that_is_no_capture_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "x.pcap"
    path.write_bytes(content)
    assert main(["--pcap", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"udpflannel trace: cannot read {path}:") and "pcap or pcapng" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--backend", '{"Type":'], "udpflannel trace: --backend:"),
        (["--backend", '{"Type":"vxlan","Port":"x"}'], "Backend.Port must be a whole number"),
        (["--count", "0"], "argument --count: 0 frames: show at least 1"),
    ],
)
def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert main(["--pcap", str(VXLAN_PCAP), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in err
