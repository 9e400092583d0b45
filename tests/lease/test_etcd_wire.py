"""The etcd wire helpers: endpoint URLs, range ends and flanneld's lease value layout."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from udpflannel.lease.etcd_wire import b64, flannel_value, parse_endpoint, prefix_end, unb64
from udpflannel.lease.model import LeaseAttrs


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("http://198.18.0.1:2379", ("http", "198.18.0.1", 2379)),
        ("https://198.18.0.1", ("https", "198.18.0.1", 2379)),
        ("198.18.0.1:4001", ("http", "198.18.0.1", 4001)),
        ("https://[fd00:198::1]:2380", ("https", "fd00:198::1", 2380)),
    ],
)
def test_endpoint_forms(url, parsed):
    assert parse_endpoint(url) == parsed


@pytest.mark.parametrize(
    "url", ["::::", "ftp://198.18.0.1:2379", "http://198.18.0.1:65536", "http://:2379", "\\", "http://x y:1"]
)
def test_bad_endpoint_says_what_is_expected(url):
    with pytest.raises(ValueError, match=r"is not http\(s\)://host:port"):
        parse_endpoint(url)


def test_prefix_end_is_the_prefix_with_its_last_byte_incremented() -> None:
    assert base64.b64decode(prefix_end("/coreos.com/network/subnets/")) == b"/coreos.com/network/subnets0"
    assert unb64(b64("/coreos.com/network/config")) == b"/coreos.com/network/config"


def test_the_lease_value_is_laid_out_as_flanneld_writes_it() -> None:
    """spec/flannel.md: PublicIP first, then PublicIPv6 (null when unset), then the rest, no spaces."""
    attrs = LeaseAttrs(
        public_ip=ipaddress.IPv4Address("198.18.0.1"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": "02:00:00:00:00:01"},
    )
    value = flannel_value(attrs)
    assert value.startswith('{"PublicIP":"198.18.0.1","PublicIPv6":null,')
    assert " " not in value
