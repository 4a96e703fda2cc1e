# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The HTTP layer against a real TLS server on 127.0.0.1: request shapes, tls-server-name, client certs from
inline data (0600 temp files, removed afterwards), bearer tokens, and error statuses."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_config as kcfg
from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils._kube_client import KubeAPIError, KubeClient

SNI_NAME = "kube-teleport-proxy-alpn.teleport.cluster.local"


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(ca_key, ca_name, cn, dns=(), ips=(), is_ca=False, key=None, key_ids=True):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if key_ids:  # RFC 5280 key identifiers (Python 3.13's VERIFY_X509_STRICT wants them; see the test without)
        b = (b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key((ca_key or key).public_key()),
                            critical=False))
    if is_ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key or key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), key, name


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = _issue(None, None, "test-ca", is_ca=True)
    ca_pem, ca_key, ca_name = ca[0], ca[2], ca[3]
    srv_pem, srv_key = _issue(ca_key, ca_name, "apiserver", dns=[SNI_NAME])[:2]  # no 127.0.0.1 SAN on purpose
    cli_pem, cli_key = _issue(ca_key, ca_name, "bot-user")[:2]
    for name, data in (("ca.crt", ca_pem), ("srv.crt", srv_pem), ("srv.key", srv_key)):
        (d / name).write_bytes(data)
    return {"dir": d, "ca": ca_pem, "client_cert": cli_pem, "client_key": cli_key}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        peer = self.connection.getpeercert()
        url = urlsplit(self.path)
        self.server.seen.append({
            "method": self.command, "path": url.path, "query": parse_qs(url.query),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": json.loads(body) if body else None,
            "client_cn": dict(x[0] for x in peer["subject"]).get("commonName") if peer else None,
        })
        status, doc = self.server.reply(self.command, url.path)
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_DELETE = _serve


@pytest.fixture
def server(pki):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki["dir"] / "srv.crt"), str(pki["dir"] / "srv.key"))
    ctx.load_verify_locations(cadata=pki["ca"].decode())
    ctx.verify_mode = ssl.CERT_OPTIONAL
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.seen = []
    srv.reply = lambda method, path: (200, {"kind": "Role", "metadata": {"name": "r"}})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = "https://127.0.0.1:%d" % srv.server_address[1]
    yield srv
    srv.shutdown()
    srv.server_close()


def inline_conn(server, pki, sni=SNI_NAME):
    conn = kcfg.Connection(server.url, "test kubeconfig", "c1")
    conn.ca_data = pki["ca"]
    conn.tls_server_name = sni
    conn.client_cert_data = pki["client_cert"]
    conn.client_key_data = pki["client_key"]
    return conn


def test_tls_server_name_client_cert_from_inline_data_and_temp_file_hygiene(server, pki):
    seen_files = {}

    def reply(method, path):
        tmp = client.temp_dir
        seen_files["dir_mode"] = stat.S_IMODE(os.stat(tmp).st_mode)
        seen_files["files"] = {n: stat.S_IMODE(os.stat(os.path.join(tmp, n)).st_mode) for n in os.listdir(tmp)}
        return 200, {"kind": "Role"}
    server.reply = reply
    client = KubeClient(inline_conn(server, pki))
    with client:
        assert client.get("/apis/rbac.authorization.k8s.io/v1/namespaces/demo/roles/r") == {"kind": "Role"}
        tmp = client.temp_dir
    assert server.seen[0]["client_cn"] == "bot-user"
    assert seen_files["dir_mode"] == 0o700
    assert seen_files["files"] == {"ca.crt": 0o600, "client.crt": 0o600, "client.key": 0o600}
    assert not os.path.exists(tmp)


def test_without_tls_server_name_the_certificate_does_not_match(server, pki):
    with KubeClient(inline_conn(server, pki, sni=None)) as api:
        with pytest.raises(KubeAPIError) as err:
            api.get("/api/v1")
    assert err.value.status is None
    assert "TLS with cluster 'c1'" in err.value.msg and "tls-server-name" in err.value.msg
    assert server.seen == []


def test_apply_request_shape_dry_run_and_bearer_token(server, pki):
    conn = kcfg.Connection(server.url, "test")
    conn.ca_data, conn.tls_server_name, conn.token = pki["ca"], SNI_NAME, "tok-secret"
    obj = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "r"}, "rules": []}
    with KubeClient(conn) as api:
        api.apply("/apis/x/roles/r", obj, dry_run=True)
        api.apply("/apis/x/roles/r", obj, force=True)
        api.delete("/apis/x/roles/r", dry_run=True, uid="u-1")
    dry, real, delete = server.seen
    assert dry["method"] == "PATCH" and dry["path"] == "/apis/x/roles/r"
    assert dry["query"] == {"fieldManager": ["lanyard.machine_id"], "force": ["false"], "dryRun": ["All"]}
    assert dry["headers"]["content-type"] == "application/apply-patch+yaml"
    assert dry["headers"]["authorization"] == "Bearer tok-secret"
    assert dry["body"] == obj
    assert real["query"] == {"fieldManager": ["lanyard.machine_id"], "force": ["true"]}
    assert delete["method"] == "DELETE" and delete["query"] == {"dryRun": ["All"]}
    assert delete["body"]["preconditions"] == {"uid": "u-1"} and delete["body"]["dryRun"] == ["All"]
    assert dry["client_cn"] is None


def test_error_status_is_parsed_and_404_get_is_none(server, pki):
    def reply(method, path):
        if path.endswith("/missing"):
            return 404, {"kind": "Status", "reason": "NotFound", "message": "not found"}
        return 422, {"kind": "Status", "reason": "Invalid", "message": "Role \"r\" is invalid",
                     "details": {"causes": [{"field": "rules[0].verbs", "message": "Required value"}]}}
    server.reply = reply
    with KubeClient(inline_conn(server, pki)) as api:
        assert api.get("/apis/x/roles/missing") is None
        with pytest.raises(KubeAPIError) as err:
            api.apply("/apis/x/roles/r", {"kind": "Role"})
    assert err.value.status == 422 and err.value.reason == "Invalid"
    assert err.value.status_details["causes"][0]["field"] == "rules[0].verbs"


def test_aggregated_discovery_with_fallback(server, pki):
    def aggregated(method, path):
        if path == "/api":
            return 200, {"kind": "APIGroupDiscoveryList", "items": [
                {"metadata": {}, "versions": [{"version": "v1", "resources": [{"resource": "pods"}]}]}]}
        return 200, {"kind": "APIGroupDiscoveryList", "items": [
            {"metadata": {"name": "apps"}, "versions": [{"version": "v1", "resources": [
                {"resource": "deployments"}]}]}]}
    server.reply = aggregated
    with KubeClient(inline_conn(server, pki)) as api:
        assert api.discovery() == {"pods": [""], "deployments": ["apps"]}
    assert "apidiscovery.k8s.io" in server.seen[0]["headers"]["accept"]

    def legacy(method, path):
        return {
            "/api": (200, {"kind": "APIVersions", "versions": ["v1"]}),
            "/api/v1": (200, {"resources": [{"name": "pods"}, {"name": "pods/log"}]}),
            "/apis": (200, {"kind": "APIGroupList", "groups": [
                {"name": "apps", "preferredVersion": {"groupVersion": "apps/v1"}},
                {"name": "metrics.k8s.io", "preferredVersion": {"groupVersion": "metrics.k8s.io/v1beta1"}}]}),
            "/apis/apps/v1": (200, {"resources": [{"name": "deployments"}]}),
        }.get(path, (503, {"kind": "Status", "message": "service unavailable"}))
    server.reply = legacy
    with KubeClient(inline_conn(server, pki)) as api:
        assert api.discovery() == {"pods": [""], "deployments": ["apps"]}


def test_unreachable_server_and_missing_files(tmp_path):
    conn = kcfg.Connection("https://127.0.0.1:1", "test", "gone")
    with KubeClient(conn, timeout=5) as api:
        with pytest.raises(KubeAPIError) as err:
            api.get("/api")
    assert "cannot reach cluster 'gone'" in err.value.msg
    conn.ca_file = str(tmp_path / "nope.crt")
    with pytest.raises(LanyardError, match="does not exist"):
        KubeClient(conn).__enter__()


def test_session_proxies_follow_proxy_option_kubeconfig_env_and_no_proxy(monkeypatch):
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:3128")
    conn = kcfg.Connection("https://api.example.com:6443", "test")
    with KubeClient(conn) as api:
        assert api._session.proxies.get("https") == "http://env-proxy:3128"  # like kubectl: $HTTPS_PROXY
    conn.proxy_url = "http://user:pw@opt-proxy:3128"  # option proxy / kubeconfig proxy-url beat the environment
    with KubeClient(conn) as api:
        assert api._session.proxies == {"https": conn.proxy_url, "http": conn.proxy_url}
    conn.no_proxy = kcfg.parse_no_proxy("10.0.0.0/8, .example.com")
    with KubeClient(conn) as api:
        assert api._session.proxies == {}


def test_a_dead_proxy_is_one_line_without_its_password():
    conn = kcfg.Connection("https://127.0.0.1:6443", "test")
    with socket_closed_port() as port:
        conn.proxy_url = "http://user:pw-secret@127.0.0.1:%d" % port
        with KubeClient(conn, timeout=5) as api:
            with pytest.raises(KubeAPIError) as err:
                api.get("/api")
    msg = str(err.value)
    assert msg.startswith("the proxy http://127.0.0.1:%d failed to connect to the cluster at" % port), msg
    assert "pw-secret" not in msg and "\n" not in msg


@contextlib.contextmanager
def socket_closed_port():
    """A 127.0.0.1 port that nothing listens on (bound, never listened, released on exit)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_a_ca_without_key_identifiers_is_verified_like_kubectl_does(tmp_path):
    """Python 3.13 turns on VERIFY_X509_STRICT, which refuses certificates without RFC 5280 key identifiers; the
    client drops only that check (run by the controller matrix on Python 3.13): the chain is still verified, so
    a server from another CA is refused."""
    ca_pem, _k, ca_key, ca_name = _issue(None, None, "old-ca", is_ca=True, key_ids=False)
    srv_pem, srv_key = _issue(ca_key, ca_name, "apiserver", ips=["127.0.0.1"], key_ids=False)[:2]
    (tmp_path / "srv.crt").write_bytes(srv_pem)
    (tmp_path / "srv.key").write_bytes(srv_key)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tmp_path / "srv.crt"), str(tmp_path / "srv.key"))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.seen = []
    srv.reply = lambda method, path: (200, {"kind": "Role"})
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        conn = kcfg.Connection("https://127.0.0.1:%d" % srv.server_address[1], "test kubeconfig", "c1")
        conn.ca_data = ca_pem
        with KubeClient(conn) as client:
            assert client.get("/apis/rbac.authorization.k8s.io/v1/namespaces/demo/roles/r") == {"kind": "Role"}
        conn.ca_data = _issue(None, None, "other-ca", is_ca=True, key_ids=False)[0]
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            with KubeClient(conn) as client:
                client.get("/apis/rbac.authorization.k8s.io/v1/namespaces/demo/roles/r")
    finally:
        srv.shutdown()
        srv.server_close()
