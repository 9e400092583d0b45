"""Subnet arithmetic (property tests), MTU overheads, and subnet.env bytes, atomic write and read-back."""

from __future__ import annotations

import ipaddress
import os
import stat
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpflannel import subnet
from udpflannel.subnet import (
    SubnetEnv,
    backend_overhead,
    count_subnets,
    first_host,
    index_of,
    iter_subnets,
    parse_env_lines,
    pod_mtu,
    prepare_subnet_dir,
    read_subnet_env,
    subnet_at,
    write_subnet_env,
)

N4 = ipaddress.IPv4Network
N6 = ipaddress.IPv6Network
I4 = ipaddress.IPv4Interface
I6 = ipaddress.IPv6Interface


# --- arithmetic -----------------------------------------------------------------------------------------


@st.composite
def network_and_len(draw: st.DrawFn) -> tuple[N4 | N6, int]:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(0, bits))
    subnet_len = draw(st.integers(prefix, bits))
    addr = draw(st.integers(0, (1 << bits) - 1))
    cls = N4 if version == 4 else N6
    return cls((addr, prefix), strict=False), subnet_len


@given(network_and_len(), st.data())
@settings(max_examples=300, deadline=None)
def test_subnet_at_index_of_round_trip(nl: tuple[N4 | N6, int], data: st.DataObject) -> None:
    network, subnet_len = nl
    total = count_subnets(network, subnet_len)
    assert total == 1 << (subnet_len - network.prefixlen)
    index = data.draw(st.integers(0, total - 1))
    sub = subnet_at(network, subnet_len, index)
    assert sub.prefixlen == subnet_len and sub.subnet_of(network)
    assert index_of(network, subnet_len, sub) == index
    with pytest.raises(ValueError):
        subnet_at(network, subnet_len, total)
    with pytest.raises(ValueError):
        subnet_at(network, subnet_len, -1)


@given(network_and_len(), st.data())
@settings(max_examples=300, deadline=None)
def test_iter_matches_count_and_index(nl: tuple[N4 | N6, int], data: st.DataObject) -> None:
    network, subnet_len = nl
    total = count_subnets(network, subnet_len)
    lo = data.draw(st.integers(0, total - 1))
    hi = data.draw(st.integers(lo, min(total - 1, lo + 40)))  # keep the walk short on huge v6 ranges
    first, last = subnet_at(network, subnet_len, lo), subnet_at(network, subnet_len, hi)
    got = list(iter_subnets(network, subnet_len, first, last))
    assert len(got) == count_subnets(network, subnet_len, first, last) == hi - lo + 1
    assert [index_of(network, subnet_len, s) for s in got] == list(range(lo, hi + 1))
    assert got[0] == first and got[-1] == last
    # an inverted range is empty, not an error
    if lo < hi:
        assert list(iter_subnets(network, subnet_len, last, first)) == []
        assert count_subnets(network, subnet_len, last, first) == 0


@given(network_and_len())
@settings(max_examples=100, deadline=None)
def test_iter_agrees_with_ipaddress(nl: tuple[N4 | N6, int]) -> None:
    network, subnet_len = nl
    mine = iter_subnets(network, subnet_len)
    theirs = network.subnets(new_prefix=subnet_len)
    for _ in range(20):  # both are lazy; compare a prefix
        a, b = next(mine, None), next(theirs, None)
        assert a == b
        if a is None:
            break


def test_huge_v6_is_lazy() -> None:
    network = N6("fd00:198::/32")
    gen = iter_subnets(network, 128, subnet_at(network, 128, 5), None)
    assert next(gen) == N6("fd00:198::5/128")
    assert count_subnets(network, 128) == 1 << 96
    assert index_of(network, 128, N6("fd00:198:ffff:ffff:ffff:ffff:ffff:ffff/128")) == (1 << 96) - 1


BAD = [
    (lambda: subnet_at(N4("198.19.0.0/16"), 15, 0), "does not fit"),
    (lambda: subnet_at(N4("198.19.0.0/16"), 33, 0), "does not fit"),
    (lambda: index_of(N4("198.19.0.0/16"), 24, N4("198.19.0.0/25")), "is not a /24 subnet"),
    (lambda: index_of(N4("198.19.0.0/16"), 24, N4("198.18.0.0/24")), "is not a /24 subnet"),
    (lambda: index_of(N4("198.19.0.0/16"), 24, N6("fd00::/24")), "is not a /24 subnet"),
    (lambda: list(iter_subnets(N4("198.19.0.0/16"), 24, N4("198.20.0.0/24"))), "is not a /24 subnet"),
]


@pytest.mark.parametrize(("call", "message"), BAD)
def test_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_first_host() -> None:
    assert first_host(N4("198.19.1.0/24")) == I4("198.19.1.1/24")
    assert first_host(N6("fd00:198:0:1::/64")) == I6("fd00:198:0:1::1/64")
    assert first_host(N6("::/64")) == I6("::1/64")  # a small integer must stay IPv6


# --- overheads ------------------------------------------------------------------------------------------


def test_backend_overheads() -> None:
    assert {t: backend_overhead(t) for t in ("vxlan", "udp", "wireguard", "host-gw")} == {
        "vxlan": 50,
        "udp": 28,
        "wireguard": 80,
        "host-gw": 0,
    }
    with pytest.raises(ValueError, match="unknown backend type 'ipip'"):
        backend_overhead("ipip")


def test_overheads_agree_with_codecs() -> None:
    # The codecs define their own header sizes; one number per backend must come out of both.
    from udpflannel.codec import udp, vxlan

    assert subnet.BACKEND_OVERHEAD["vxlan"] == vxlan.VXLAN_OVERHEAD
    assert subnet.BACKEND_OVERHEAD["udp"] == udp.UDP_OVERHEAD


def test_pod_mtu() -> None:
    assert pod_mtu("vxlan", 1500) == 1450
    assert pod_mtu("udp", 1500) == 1472
    assert pod_mtu("wireguard", 1500) == 1420
    assert pod_mtu("host-gw", 9000) == 9000
    assert pod_mtu("vxlan", 1500, backend_mtu=9000) == 8950  # the Backend MTU option replaces the iface MTU


# --- subnet.env -----------------------------------------------------------------------------------------

# What flannel's WriteSubnetFile writes (pkg/subnet/subnetfile_unix.go), line for line.
GOLDEN_V4 = (
    b"FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
)
GOLDEN_DUAL = (
    b"FLANNEL_NETWORK=198.19.0.0/16\n"
    b"FLANNEL_SUBNET=198.19.7.1/24\n"
    b"FLANNEL_IPV6_NETWORK=fd00:198::/48\n"
    b"FLANNEL_IPV6_SUBNET=fd00:198:0:7::1/64\n"
    b"FLANNEL_MTU=1420\n"
    b"FLANNEL_IPMASQ=false\n"
)
GOLDEN_V6 = (
    b"FLANNEL_IPV6_NETWORK=fd00:198::/48\nFLANNEL_IPV6_SUBNET=fd00:198:0:2::1/64\nFLANNEL_MTU=1472\n"
    b"FLANNEL_IPMASQ=false\n"
)

ENVS = [
    pytest.param(
        SubnetEnv.for_lease(N4("198.19.0.0/16"), N4("198.19.1.0/24"), None, None, 1450, True),
        GOLDEN_V4,
        id="v4",
    ),
    pytest.param(
        SubnetEnv.for_lease(
            N4("198.19.0.0/16"),
            N4("198.19.7.0/24"),
            N6("fd00:198::/48"),
            N6("fd00:198:0:7::/64"),
            1420,
            False,
        ),
        GOLDEN_DUAL,
        id="dual",
    ),
    pytest.param(
        SubnetEnv.for_lease(None, None, N6("fd00:198::/48"), N6("fd00:198:0:2::/64"), 1472, False),
        GOLDEN_V6,
        id="v6-only",
    ),
]


@pytest.mark.parametrize(("env", "golden"), ENVS)
def test_subnet_env_golden_and_round_trip(tmp_path, env: SubnetEnv, golden: bytes) -> None:
    path = tmp_path / "run" / "flannel" / "subnet.env"  # parent dirs are created
    write_subnet_env(path, env)
    assert path.read_bytes() == golden
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(path.parent)) == ["subnet.env"]  # no temp file left behind
    assert read_subnet_env(path) == env


def test_overwrite_is_atomic_and_keeps_mode(tmp_path) -> None:
    path = tmp_path / "subnet.env"
    envs = [
        SubnetEnv.for_lease(N4("198.19.0.0/16"), N4(f"198.19.{i}.0/24"), None, None, 1450, True)
        for i in range(1, 4)
    ]
    write_subnet_env(path, envs[0])
    path.chmod(0o640)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(path.read_bytes())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            write_subnet_env(path, envs[i % 3])
    finally:
        stop.set()
        thread.join(timeout=10)
    # a reader only ever sees a complete old or new file
    assert seen <= {e.render() for e in envs}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # flannel keeps an existing file's mode
    assert os.listdir(tmp_path) == ["subnet.env"]


def test_failed_write_leaves_no_temp(tmp_path, monkeypatch) -> None:
    path = tmp_path / "subnet.env"

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(subnet.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_subnet_env(
            path, SubnetEnv.for_lease(N4("198.19.0.0/16"), N4("198.19.1.0/24"), None, None, 1450, True)
        )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            SubnetEnv(network=N4("198.19.0.0/16"), subnet=I4("198.19.1.1/24"), ipmasq=True),
            "needs mtu and ipmasq",
        ),
        (SubnetEnv(mtu=1450, ipmasq=True), "needs an IPv4 or an IPv6 subnet"),
        (SubnetEnv(subnet=I4("198.19.1.1/24"), mtu=1450, ipmasq=True), "needs the network"),
    ],
)
def test_render_refuses_incomplete(tmp_path, env: SubnetEnv, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_subnet_env(tmp_path / "subnet.env", env)
    assert not (tmp_path / "subnet.env").exists()


def test_read_missing_and_unreadable(tmp_path) -> None:
    assert read_subnet_env(tmp_path / "nope.env") is None
    assert read_subnet_env(tmp_path) is None  # a directory
    (tmp_path / "bin.env").write_bytes(b"\xff\xfe")
    assert read_subnet_env(tmp_path / "bin.env") is None


def test_read_tolerates_garbage(tmp_path) -> None:
    path = tmp_path / "subnet.env"
    path.write_text(
        "# written by hand\n"
        "\n"
        "export FLANNEL_NETWORK=198.19.0.0/16\n"
        'FLANNEL_SUBNET="198.19.4.1/24"\n'
        "FLANNEL_IPV6_SUBNET=not-an-address\n"
        "FLANNEL_MTU=fourteen-fifty\n"
        "FLANNEL_IPMASQ=T\n"
        "SOMETHING_ELSE=1\n"
        "no equals sign here\n"
    )
    env = read_subnet_env(path)
    assert env == SubnetEnv(network=N4("198.19.0.0/16"), subnet=I4("198.19.4.1/24"), ipmasq=True)
    assert env.subnet.network == N4("198.19.4.0/24")  # the subnet to ask for again


def test_read_wrong_family_is_none(tmp_path) -> None:
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_SUBNET=fd00::1/64\nFLANNEL_IPV6_SUBNET=198.19.1.1/24\nFLANNEL_IPMASQ=maybe\n")
    assert read_subnet_env(path) == SubnetEnv()


def test_parse_env_lines() -> None:
    assert parse_env_lines("A=1\n  B = 'x y' \nexport C=\"3\"\n#D=4\nE\n=5\n") == {
        "A": "1",
        "B": "x y",
        "C": "3",
        "": "5",
    }


def test_prepare_subnet_dir_makes_the_directory_and_leaves_no_file(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"
    prepare_subnet_dir(path)
    assert path.parent.is_dir() and list(path.parent.iterdir()) == []


@pytest.mark.parametrize("name", ["", "dir/", "plain/subnet.env", "."])
def test_prepare_subnet_dir_refuses_what_cannot_be_the_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain").write_text("")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        prepare_subnet_dir(name)
