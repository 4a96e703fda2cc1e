# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The diagnostics listener serves no credential and changes no state: GET of the three documented paths only,
every other method refused, nothing from the storage or the outputs in any answer, idle clients dropped."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time

import pytest

from machine_id_agent import diag

SECRET_MARKERS = ("PRIVATE KEY", "BEGIN CERTIFICATE", "client-key-data", "secret-token")


class Snap:
    """A snapshot source that counts reads and whose state a request could only change through it."""

    def __init__(self):
        self.reads = 0
        self.state = {"alive": True, "ready": True, "renewals": 7, "failures": 1,
                      "outputs": [{"destination": "/var/lib/out", "kubernetes_cluster": "k",
                                   "seconds_to_expiry": 100, "valid": True, "error": None}],
                      "identity_seconds_to_expiry": 3000, "last_success_unix": 1.0}

    def __call__(self):
        self.reads += 1
        return json.loads(json.dumps(self.state))  # a copy, as the service hands out


@pytest.fixture
def server():
    snap = Snap()
    srv = diag.DiagServer("127.0.0.1:0", snap, request_timeout=0.5)
    srv.start()
    yield srv, snap
    srv.stop()


def _req(srv, method, path, body=None):
    c = http.client.HTTPConnection(*srv.address, timeout=5)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return r.status, r.read().decode(), dict(r.getheaders())
    finally:
        c.close()


def test_only_get_is_served_and_state_is_unchanged(server):
    srv, snap = server
    before = json.dumps(snap.state, sort_keys=True)
    for path in ("/livez", "/readyz", "/metrics", "/", "/renew", "/../../etc/passwd"):
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "HEAD"):
            code, body, headers = _req(srv, method, path, body=b"x" if method in ("POST", "PUT", "PATCH") else None)
            assert code == 405 and headers.get("Allow") == "GET", (method, path, code)
    assert snap.reads == 0  # a refused request does not even read the snapshot
    assert json.dumps(snap.state, sort_keys=True) == before


def test_get_answers_hold_no_credential(server):
    srv, snap = server
    answers = {}
    for path in ("/livez", "/readyz", "/metrics", "/", "/identity", "/../bot/identity", "/readyz?x=/etc/shadow"):
        answers[path] = _req(srv, "GET", path)
    assert answers["/livez"][0] == 200 and answers["/readyz"][0] == 200 and answers["/metrics"][0] == 200
    assert "machine_id_agent_renewals_total 7" in answers["/metrics"][1]
    for path in ("/", "/identity", "/../bot/identity"):
        assert answers[path][0] == 404
    for code, body, _h in answers.values():
        assert not any(m in body for m in SECRET_MARKERS), body


def test_tls_and_http2_probes_get_nowhere(server):
    """What the boundary test's attacker sends: a TLS ClientHello and an HTTP/2 preface. The listener is plain
    HTTP/1.x: no TLS handshake completes and no HTTP/2 SETTINGS frame comes back."""
    srv, _snap = server
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(srv.address, timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw, server_hostname="teleport.cluster.local")
    with socket.create_connection(srv.address, timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        got = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except socket.timeout:
            pass
    assert len(got) < 9 or got[3] != 0x04  # not an HTTP/2 SETTINGS frame
    assert got == b"" or b"505" in got  # http.server refuses the HTTP/2.0 request line


def test_idle_client_is_dropped(server):
    srv, _snap = server
    with socket.create_connection(srv.address, timeout=5) as s:
        t0 = time.monotonic()
        assert s.recv(10) == b""  # closed by the server after request_timeout
        assert time.monotonic() - t0 < 4
