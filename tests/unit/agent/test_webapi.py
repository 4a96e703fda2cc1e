# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The proxy web API client: facts from /webapi/ping and the HTTPS JSON helper's errors."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from machine_id_agent import webapi

# /webapi/ping of the real v13.3.8 bed (the "auth" section left out), one per listener mode.
PING_MULTIPLEX = json.loads("""{"proxy": {"kube": {"enabled": true, "listen_addr": "127.0.0.1:33291"}, "ssh":
 {"listen_addr": "127.0.0.1:33291", "tunnel_listen_addr": "127.0.0.1:33291", "web_listen_addr": "127.0.0.1:33291",
 "public_addr": "localhost:33291"}, "db": {"postgres_listen_addr": "127.0.0.1:33291", "mysql_listen_addr":
 "127.0.0.1:33291"}, "tls_routing_enabled": true, "assist_enabled": false}, "server_version": "13.3.8",
 "min_client_version": "12.0.0", "cluster_name": "lanyard-testbed", "automatic_upgrades": false}""")
PING_SEPARATE = json.loads("""{"proxy": {"kube": {"enabled": true, "public_addr": "localhost:54843", "listen_addr":
 "127.0.0.1:54843"}, "ssh": {"listen_addr": "127.0.0.1:47347", "tunnel_listen_addr": "127.0.0.1:41317",
 "web_listen_addr": "127.0.0.1:60965", "public_addr": "localhost:60965"}, "db": {}, "tls_routing_enabled": false,
 "assist_enabled": false}, "server_version": "13.3.8", "min_client_version": "12.0.0", "cluster_name":
 "lanyard-testbed", "automatic_upgrades": false}""")


def test_facts_multiplex():
    f = webapi.facts_from_ping(PING_MULTIPLEX, "localhost:33291")
    assert f.tls_routing and f.cluster_name == "lanyard-testbed" and f.server_major == 13
    assert f.kube_public_addr is None and f.kube_listen_addr == "127.0.0.1:33291"
    assert f.tunnel_addr == "localhost:33291" and f.web_addr == "localhost:33291" and f.kube_enabled


def test_facts_separate():
    f = webapi.facts_from_ping(PING_SEPARATE, "localhost:60965")
    assert not f.tls_routing
    assert f.kube_public_addr == "localhost:54843"
    # host of public_addr, port of tunnel_listen_addr
    assert f.tunnel_addr == "localhost:41317"


def test_facts_tunnel_public_addr_wins_and_defaults():
    doc = json.loads(json.dumps(PING_SEPARATE))
    doc["proxy"]["ssh"]["ssh_tunnel_public_addr"] = "tun.example.com:4024"
    assert webapi.facts_from_ping(doc, "p:443").tunnel_addr == "tun.example.com:4024"
    bare = {"proxy": {"ssh": {}, "tls_routing_enabled": False}, "server_version": "17.1.0"}
    f = webapi.facts_from_ping(bare, "proxy.example.com")
    assert f.tunnel_addr == "proxy.example.com:3024" and f.web_addr == "proxy.example.com:443"
    assert f.server_major == 17


def test_facts_not_a_proxy():
    with pytest.raises(webapi.WebAPIError, match="no 'proxy' section"):
        webapi.facts_from_ping({"kind": "x"}, "a:1")


@pytest.mark.parametrize("addr, expected", [
    ("host:3080", ("host", 3080)), ("host", ("host", 443)), ("[::1]:3025", ("::1", 3025)), ("[::1]", ("::1", 443)),
    ("https://h.example.com:8443/", ("h.example.com", 8443)),
])
def test_split_addr(addr, expected):
    assert webapi.split_addr(addr) == expected


def test_version_major():
    assert webapi.version_major("13.3.8") == 13 and webapi.version_major("v17.0.0-dev") == 17
    assert webapi.version_major("") is None and webapi.version_major("x") is None


# --- a local HTTPS server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test web ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d


ROUTES = {}


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        ROUTES.setdefault("seen", []).append((self.command, self.path, body))
        status, payload = ROUTES.get((self.command, self.path), (404, b'{"error":{"message":"not found"}}'))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer


@pytest.fixture(scope="module")
def server(tls_files):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(tls_files / "server.pem"))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"localhost:{httpd.server_address[1]}"
    httpd.shutdown()


def test_ping_through_https(server, tls_files):
    ROUTES[("GET", "/webapi/ping")] = (200, json.dumps(PING_MULTIPLEX).encode())
    f = webapi.ping(server, ca_path=tls_files / "ca.pem")
    assert f.tls_routing and f.web_addr == server


def test_untrusted_certificate_is_not_retryable(server):
    with pytest.raises(webapi.WebAPIError) as err:
        webapi.ping(server)
    assert "not trusted" in str(err.value) and "ca_path" in str(err.value)
    assert not err.value.retryable


def test_insecure_skips_verification(server):
    ROUTES[("GET", "/webapi/find")] = (200, json.dumps(PING_SEPARATE).encode())
    assert not webapi.find(server, insecure=True).tls_routing


def test_http_errors_carry_the_server_message(server, tls_files):
    ROUTES[("POST", "/x")] = (400, b'{"error":{"message":"bad thing"}}')
    with pytest.raises(webapi.WebAPIError) as err:
        webapi.request_json(server, "POST", "/x", {"a": 1}, ca_path=tls_files / "ca.pem")
    e = err.value
    assert e.status == 400 and e.server_message == "bad thing" and not e.retryable
    assert "HTTP 400: bad thing" in str(e)
    assert ROUTES["seen"][-1][2] == b'{"a": 1}'
    ROUTES[("GET", "/busy")] = (503, b"upstream down")
    with pytest.raises(webapi.WebAPIError) as err:
        webapi.request_json(server, "GET", "/busy", ca_path=tls_files / "ca.pem")
    assert err.value.retryable and "upstream down" in str(err.value)


def test_not_json(server, tls_files):
    ROUTES[("GET", "/html")] = (200, b"<html>")
    with pytest.raises(webapi.WebAPIError, match="did not return JSON"):
        webapi.request_json(server, "GET", "/html", ca_path=tls_files / "ca.pem")


def test_nothing_listening_is_retryable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(webapi.WebAPIError) as err:
        webapi.ping(f"127.0.0.1:{port}", timeout=3)
    assert err.value.retryable and "cannot connect" in str(err.value) and "\n" not in str(err.value)


def test_bad_ca_path(tmp_path):
    (tmp_path / "ca.pem").write_text("nope")
    with pytest.raises(webapi.WebAPIError, match="ca_path"):
        webapi.ping("localhost:1", ca_path=tmp_path / "ca.pem")


def test_web_context_verifies_unless_insecure(tls_files):
    ctx = webapi.web_ssl_context(tls_files / "ca.pem")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    plain = webapi.web_ssl_context()
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname  # system trust, still verified
    off = webapi.web_ssl_context(tls_files / "ca.pem", insecure=True)  # only the explicit switch turns it off
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname


def test_export_host_cas(server, tls_files):
    ca = (tls_files / "ca.pem").read_bytes()
    ROUTES[("GET", webapi.EXPORT_HOST_CA_PATH)] = (200, ca + ca)
    assert webapi.export_host_cas(server, ca_path=tls_files / "ca.pem") == [ca, ca]
    assert ROUTES["seen"][-1][:2] == ("GET", "/webapi/auth/export?type=tls-host")
    ROUTES[("GET", webapi.EXPORT_HOST_CA_PATH)] = (200, b"<html>")
    with pytest.raises(webapi.WebAPIError, match="no PEM certificate") as err:
        webapi.export_host_cas(server, ca_path=tls_files / "ca.pem")
    assert not err.value.retryable
    with pytest.raises(webapi.WebAPIError, match="not trusted"):
        webapi.export_host_cas(server)


def test_web_context_verifies_without_python_313_strict_x509_checks():
    """Debian 13's Python 3.13 would refuse a proxy certificate without key identifiers; verification itself
    (chain, host name) stays on."""
    ctx = webapi.web_ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert not ctx.verify_flags & getattr(ssl, "VERIFY_X509_STRICT", 0)
