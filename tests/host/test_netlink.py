"""host/netlink.py and its child (host/netlink_ops.py): answers as plain data, failures as NetlinkError with
the errno, a child that dies or is closed reported, never waited on forever. Reading links needs no root."""

from __future__ import annotations

import errno
import io
import json

import pytest

from udpflannel.host import netlink_ops
from udpflannel.host.netlink import Netlink, NetlinkError


class _Msg(dict):
    """Just enough of a pyroute2 message: header fields by key, attributes by get_attr."""

    def __init__(self, attrs: dict[str, object], **fields: object) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> object:
        return self.attrs.get(name)


class _FakeIPRoute:
    def __init__(self) -> None:
        self.changes: list[tuple] = []

    def get_links(self, *index: int) -> list[_Msg]:
        return [_Msg({"IFLA_IFNAME": "eth1", "IFLA_MTU": 1400}, index=3)]

    def get_addr(self) -> list[_Msg]:
        return [
            _Msg({"IFA_ADDRESS": "198.18.0.1"}, index=3, family=2),
            _Msg({"IFA_ADDRESS": "fe80::1"}, index=3, family=10),  # link-local: not a public address
            _Msg({"IFA_ADDRESS": "fd00:198::1"}, index=3, family=10),
        ]

    def get_default_routes(self, family: int) -> list[_Msg]:
        return [_Msg({"RTA_OIF": 3})] if family == 2 else []

    def link_lookup(self, ifname: str) -> list[int]:
        return [3] if ifname == "eth1" else []

    def route(self, cmd: str, **args: object) -> None:
        self.changes.append(("route", cmd, args))


def _serve(ipr: _FakeIPRoute, *requests: dict) -> list[dict]:
    out = io.StringIO()
    netlink_ops.serve(ipr, io.StringIO("".join(json.dumps(r) + "\n" for r in requests)), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_serve_answers_plain_data_and_errors_with_their_errno() -> None:
    ipr = _FakeIPRoute()
    answers = _serve(
        ipr,
        {"op": "interfaces", "args": {}},
        {"op": "link_index", "args": {"name": "eth9"}},
        {
            "op": "route",
            "args": {
                "cmd": "replace",
                "dst": "198.19.0.0/16",
                "dev": "eth1",
                "gateway": None,
                "onlink": False,
                "src": "198.19.1.0",
            },
        },
        {"op": "no_such_op", "args": {}},
    )
    assert answers[0] == {
        "ok": {"links": [[3, "eth1", 1400, ["198.18.0.1"], ["fd00:198::1"]]], "default_oif": 3}
    }
    assert answers[1] == {"error": "link eth9 does not exist", "code": errno.ENODEV}
    assert answers[2] == {"ok": None}
    assert ipr.changes == [
        ("route", "replace", {"dst": "198.19.0.0/16", "oif": 3, "family": 2, "prefsrc": "198.19.1.0"})
    ]
    assert "no_such_op" in answers[3]["error"] and answers[3]["code"] is None


def test_child_answers_then_exits_on_close() -> None:
    nl = Netlink()
    proc = nl._proc
    assert proc is not None
    assert nl.call("link_index", name="lo") == 1
    with pytest.raises(NetlinkError) as err:
        nl.call("link_index", name="udpfl-none")
    assert err.value.code == errno.ENODEV and "does not exist" in str(err.value)
    nl.close()
    assert proc.returncode is not None  # closing waited for it
    with pytest.raises(NetlinkError, match="closed"):
        nl.call("link_index", name="lo")


def test_a_dead_child_is_an_error_not_a_hang() -> None:
    with Netlink() as nl:
        assert nl._proc is not None
        nl._proc.kill()
        nl._proc.wait()
        with pytest.raises(NetlinkError, match="netlink helper"):
            nl.call("link_index", name="lo")
