"""codec/vxlan.py against the golden kernel-flannel capture, scapy's dissection, and its own batch twin."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from udpflannel.codec import vxlan

TESTDATA = pathlib.Path(os.environ["UDPFLANNEL_TESTDATA"])  # set by tests/conftest.py
PCAP = TESTDATA / "vxlan-kernel-flannel.pcap"

scapy_all = pytest.importorskip("scapy.all")


def _golden():
    if not PCAP.exists():
        pytest.skip(f"golden capture {PCAP} not present")
    meta = json.loads((TESTDATA / "vxlan-kernel-flannel.json").read_text())
    macs = {n["public_ip"]: vxlan.parse_mac(n["vtep_mac"]) for n in meta["nodes"]}
    frames = []
    for pkt in scapy_all.rdpcap(str(PCAP)):
        ip, udp = pkt[scapy_all.IP], pkt[scapy_all.UDP]
        frames.append((ip.src, ip.dst, udp.dport, bytes(udp.payload)))
    return meta, macs, frames


def test_constants_match_flannel():
    assert vxlan.VXLAN_PORT == 8472
    assert vxlan.VXLAN_OVERHEAD == 50
    assert vxlan.VXLAN_HEADROOM == 22


def test_decode_every_golden_frame_and_reencode_bytes():
    meta, macs, frames = _golden()
    assert len(frames) >= 20
    for src, dst, dport, payload in frames:
        assert dport == meta["port"]
        got = vxlan.decode_vxlan(payload, meta["vni"], macs[dst])
        assert isinstance(got, vxlan.VxlanFrame), got
        assert got.src_mac == macs[src] and got.dst_mac == macs[dst]
        # Cross-check with scapy's own VXLAN/Ether/IP dissection of the same bytes.
        sc = scapy_all.VXLAN(payload)
        assert sc.vni == meta["vni"] and sc.flags == 0x08
        assert sc[scapy_all.Ether].dst == vxlan.format_mac(macs[dst])
        assert sc[scapy_all.Ether].src == vxlan.format_mac(macs[src])
        assert bytes(sc[scapy_all.IP]) == got.inner
        assert vxlan.encode_vxlan(got.inner, meta["vni"], macs[src], macs[dst]) == payload


def test_golden_frames_rejected_by_the_wrong_receiver():
    meta, macs, frames = _golden()
    src, dst, _, payload = frames[0]
    assert vxlan.decode_vxlan(payload, meta["vni"], macs[src]) == vxlan.WRONG_DST_MAC
    assert vxlan.decode_vxlan(payload, meta["vni"] + 1, macs[dst]) == vxlan.BAD_VNI


def test_batch_decode_and_encode_match_per_packet():
    meta, macs, frames = _golden()
    offset, stride = 32, 2048
    n = len(frames)
    buf = np.zeros((n, stride), dtype=np.uint8)
    lengths = np.array([len(f[3]) for f in frames], dtype=np.int32)
    for i, (*_, payload) in enumerate(frames):
        buf[i, offset : offset + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    mac_a = macs[meta["nodes"][0]["public_ip"]]
    codes = vxlan.decode_batch(buf, lengths, offset, meta["vni"], mac_a)
    expected = [vxlan.decode_vxlan(f[3], meta["vni"], mac_a) for f in frames]
    expected_codes = [vxlan.OK if isinstance(e, vxlan.VxlanFrame) else e for e in expected]
    assert codes.tolist() == expected_codes
    assert vxlan.OK in expected_codes and vxlan.WRONG_DST_MAC in expected_codes

    # Re-encode: strip the headers, write them back in batch, compare every byte.
    inner_off = offset + vxlan.VXLAN_HEADROOM
    out = np.zeros_like(buf)
    out[:, inner_off:] = buf[:, inner_off:]
    dst_macs = np.array([list(macs[f[1]]) for f in frames], dtype=np.uint8)
    src_mac = macs[meta["nodes"][0]["public_ip"]]
    from_a = [f[0] == meta["nodes"][0]["public_ip"] for f in frames]
    tmpl = vxlan.vxlan_header_template(meta["vni"], src_mac)
    vxlan.encode_batch(out, lengths - vxlan.VXLAN_HEADROOM, inner_off, tmpl, dst_macs)
    for i, (*_, payload) in enumerate(frames):
        if from_a[i]:
            assert out[i, offset : offset + lengths[i]].tobytes() == payload


def _frame(inner: bytes = bytes([0x45]) + bytes(39)) -> bytes:
    return vxlan.encode_vxlan(inner, 1, bytes.fromhex("020000000001"), bytes.fromhex("020000000002"))


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b: b[:21], vxlan.BAD_HEADER),
        (lambda b: b"\x0c" + b[1:], vxlan.BAD_HEADER),
        (lambda b: b[:7] + b"\x01" + b[8:], vxlan.BAD_HEADER),
        (lambda b: b[:6] + b"\x02" + b[7:], vxlan.BAD_VNI),
        (lambda b: b[:8] + b"\xff" + b[9:], vxlan.WRONG_DST_MAC),
        (lambda b: b[:20] + b"\x08\x06" + b[22:], vxlan.BAD_ETHERTYPE),
        (lambda b: b[:20] + b"\x86\xdd" + b[22:], vxlan.BAD_ETHERTYPE),
        (lambda b: b, vxlan.OK),
    ],
)
def test_each_check_per_packet_and_batch(mutate, code):
    data = mutate(_frame())
    our = bytes.fromhex("020000000002")
    single = vxlan.decode_vxlan(data, 1, our)
    assert (vxlan.OK if isinstance(single, vxlan.VxlanFrame) else single) == code
    buf = np.full((1, 128), 0xAA, dtype=np.uint8)  # garbage after the datagram must not matter
    buf[0, 16 : 16 + len(data)] = np.frombuffer(data, dtype=np.uint8)
    lengths = np.array([len(data)], dtype=np.int32)
    assert vxlan.decode_batch(buf, lengths, 16, 1, our).tolist() == [code]
    fast = vxlan.expected_prefix(1, our)
    assert vxlan.decode_batch(buf, lengths, 16, 1, our, fast).tolist() == [code]
    expected = vxlan.expected_headers(1, our)
    assert vxlan.decode_batch(buf, lengths, 16, 1, our, fast, expected).tolist() == [code]


def test_expected_headers_fast_path_agrees_on_mixed_batches():
    """Valid IPv4 and IPv6 frames together, a wrong MAC among valid ones, another sender MAC: the
    masked-compare fast path gives what the check-by-check path gives."""
    our = bytes.fromhex("020000000002")
    v4 = vxlan.encode_vxlan(bytes([0x45]) + bytes(39), 1, bytes.fromhex("02000000000a"), our)
    v6 = vxlan.encode_vxlan(bytes([0x60]) + bytes(39), 1, bytes.fromhex("02000000000b"), our)
    bad = vxlan.encode_vxlan(bytes([0x45]) + bytes(39), 1, bytes(6), bytes(6))
    expected = vxlan.expected_headers(1, our)
    for frames in ([v4, v4], [v6, v6], [v4, v6], [v4, bad, v4], [v6[:22]]):
        buf = np.zeros((len(frames), 96), dtype=np.uint8)
        for i, f in enumerate(frames):
            buf[i, 8 : 8 + len(f)] = np.frombuffer(f, dtype=np.uint8)
        lengths = np.array([len(f) for f in frames], dtype=np.int32)
        want = vxlan.decode_batch(buf, lengths, 8, 1, our).tolist()
        assert vxlan.decode_batch(buf, lengths, 8, 1, our, None, expected).tolist() == want
        assert want == [
            vxlan.OK if isinstance(r, vxlan.VxlanFrame) else r
            for r in (vxlan.decode_vxlan(f, 1, our) for f in frames)
        ]


def test_every_truncated_prefix_is_a_code_not_an_exception():
    data = _frame()
    our = bytes.fromhex("020000000002")
    for cut in range(len(data)):
        got = vxlan.decode_vxlan(data[:cut], 1, our)
        assert isinstance(got, vxlan.VxlanFrame) or got != vxlan.OK


def test_encode_sets_ipv6_ethertype_and_rejects_bad_vni():
    frame = vxlan.encode_vxlan(bytes([0x60]) + bytes(39), 7, bytes(6), bytes(6))
    assert frame[20:22] == b"\x86\xdd" and frame[4:7] == b"\x00\x00\x07"
    with pytest.raises(ValueError):
        vxlan.encode_vxlan(b"", 1 << 24, bytes(6), bytes(6))
    with pytest.raises(ValueError):
        vxlan.parse_mac("02:00:00:00:00")
