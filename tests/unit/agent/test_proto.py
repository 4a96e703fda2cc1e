# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runtime-built protobuf messages put the right bytes on the wire (field numbers, wire types)."""

from __future__ import annotations

import datetime as dt

import pytest

from machine_id_agent import proto


def _varint(buf: bytes, i: int):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def decode(buf: bytes) -> list:
    """A tiny independent protobuf decoder: [(field number, wire type, value bytes|int)]."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        else:
            raise AssertionError(f"unexpected wire type {wt}")
        out.append((num, wt, v))
    return out


def _ld(num: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([(num << 3) | 2, len(payload)]) + payload


WHEN = dt.datetime(2030, 1, 2, 3, 4, 5, 500000, tzinfo=dt.timezone.utc)


def test_renewal_request_v13_uses_field_1_only():
    req = proto.user_certs_request(username="bot-example", expires=WHEN, ssh_public_key=b"ssh-rsa AAAA\n",
                                   tls_public_key=b"-----BEGIN PUBLIC KEY-----", server_major=13)
    fields = decode(req.SerializeToString())
    nums = [f[0] for f in fields]
    assert nums == [1, 2, 3]
    assert fields[0][2] == b"ssh-rsa AAAA\n"
    assert fields[1][2] == b"bot-example"
    ts = dict((n, v) for n, _wt, v in decode(fields[2][2]))
    assert ts[1] == int(WHEN.timestamp()) and ts[2] == 500_000_000


@pytest.mark.parametrize("major", [17, 18])
def test_v17_and_later_use_fields_22_23(major):
    req = proto.user_certs_request(username="bot-x", expires=WHEN, ssh_public_key=b"ssh", tls_public_key=b"pem",
                                   server_major=major)
    fields = {n: v for n, _wt, v in decode(req.SerializeToString())}
    assert 1 not in fields
    assert fields[22] == b"ssh" and fields[23] == b"pem"


def test_impersonation_request_fields():
    req = proto.user_certs_request(username="bot-x", expires=WHEN, ssh_public_key=b"k", tls_public_key=b"t",
                                   server_major=13, route_to_cluster="c1", kubernetes_cluster="k8s",
                                   role_requests=["r1", "r2"], use_role_requests=True)
    fields = decode(req.SerializeToString())
    by = {}
    for n, wt, v in fields:
        by.setdefault(n, []).append(v)
    assert by[5] == [b"c1"]
    assert by[7] == [b"k8s"]
    assert by[12] == [b"r1", b"r2"]
    assert by[14] == [1]


def test_certs_response_parses_upstream_numbers():
    wire = _ld(1, b"SSHCERT") + _ld(2, b"TLSPEM") + _ld(3, b"CA1") + _ld(3, b"CA2") + _ld(4, b"SSHCA") \
        + _ld(9, b"unknown field is skipped")
    certs = proto.Certs.FromString(wire)
    assert certs.ssh == b"SSHCERT" and certs.tls == b"TLSPEM"
    assert list(certs.tls_ca_certs) == [b"CA1", b"CA2"]
    assert list(certs.ssh_ca_certs) == [b"SSHCA"]


def test_role_impersonate_roles_path():
    # RoleV6.Spec(5) -> RoleSpecV6.Allow(2) -> RoleConditions.Impersonate(14) -> ImpersonateConditions.Roles(2)
    imp = _ld(2, b"kube-role") + _ld(2, b"other") + _ld(1, b"someuser")
    cond = _ld(14, imp) + _ld(1, b"logins are skipped")
    spec = _ld(2, cond) + _ld(3, _ld(14, _ld(2, b"deny-side")))
    role = _ld(1, b"role") + _ld(5, spec)
    assert proto.impersonate_roles(proto.RoleV6.FromString(role)) == ["kube-role", "other"]


def test_ca_cert_and_ping_responses():
    assert proto.GetClusterCACertResponse.FromString(_ld(1, b"PEMS")).tls_ca == b"PEMS"
    ping = proto.PingResponse.FromString(_ld(1, b"clu") + _ld(2, b"13.3.8") + _ld(4, b"proxy:443") + _ld(3, b"x"))
    assert (ping.cluster_name, ping.server_version, ping.proxy_public_addr) == ("clu", "13.3.8", "proxy:443")


def test_method_paths():
    assert proto.METHODS["GenerateUserCerts"] == "/proto.AuthService/GenerateUserCerts"
    assert proto.METHODS["GetClusterCACert"] == "/proto.AuthService/GetClusterCACert"


def test_timestamp_needs_aware_datetime():
    with pytest.raises(ValueError):
        proto.timestamp(dt.datetime(2030, 1, 1))
