# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Joining: the request body, CA pins, and join() against a local stand-in for the proxy's web API."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import ssl
import threading
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from machine_id_agent import identity as ident
from machine_id_agent import join
from machine_id_agent.errors import JoinError

NOW = dt.datetime.now(dt.timezone.utc)  # import time: only for the CAs; leaves use _now()


def _now():
    """Issue time. Not the import time: the whole suite runs for more than an hour before these tests."""
    return dt.datetime.now(dt.timezone.utc)


CLUSTER = "unit-cluster"


class CA:
    def __init__(self, name=CLUSTER, days=1, start=None):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                               x509.NameAttribute(NameOID.COMMON_NAME, name)])
        start = start or NOW - dt.timedelta(hours=1)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, public_pem: bytes, cn: str, generation: int = 1, sans=None) -> bytes:
        pub = serialization.load_pem_public_key(public_pem)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                             x509.NameAttribute(ident.OID_RENEWABLE, "true"),
                             x509.NameAttribute(ident.OID_GENERATION, str(generation))])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=1))
             .not_valid_after(_now() + dt.timedelta(hours=1)))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def user_ca():
    return CA()


@pytest.fixture(scope="module")
def host_ca():
    return CA()


def test_register_request_shape():
    key = ident.generate_key()
    body = join.register_request("tok", key, dt.datetime(2030, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc))
    assert body["token"] == "tok" and body["role"] == "Bot"
    assert body["expires"] == "2030-05-06T07:08:09Z"
    assert base64.b64decode(body["public_tls_key"]) == ident.tls_public_key(key)
    assert base64.b64decode(body["public_ssh_key"]) == ident.ssh_public_key(key)
    assert set(body) == {"token", "role", "public_tls_key", "public_ssh_key", "expires"}


def test_check_pins(host_ca):
    pin = ident.spki_pin(host_ca.pem)
    join.check_pins([host_ca.pem], [pin.upper().replace("SHA256", "sha256")], "auth")  # case-insensitive hex
    other = CA()
    with pytest.raises(JoinError) as err:
        join.check_pins([host_ca.pem, other.pem], [pin], "the auth server a:3025")
    msg = str(err.value)
    assert ident.spki_pin(other.pem) in msg and "tctl status" in msg and "\n" not in msg  # EVERY CA must match
    old = CA(start=NOW - dt.timedelta(days=3), days=1)
    with pytest.raises(JoinError, match="not valid now"):
        join.check_pins([old.pem], [ident.spki_pin(old.pem)], "auth")


def joined(user_ca, *cas, signer=None):
    """An Identity as a join returns it: a bot certificate signed by ``signer`` (default the user CA) and
    the TLS CA list ``cas``."""
    key = ident.generate_key()
    tls = (signer or user_ca).issue(ident.tls_public_key(key), "bot-unit")
    return ident.Identity.from_certs(key, b"ssh-rsa-cert-v01@openssh.com AAAA", tls, [c.pem for c in cas], [])


def test_check_joined_cas_accepts_pinned_host_ca_and_the_issuer(host_ca, user_ca):
    idt = joined(user_ca, user_ca, host_ca)
    kept = join.check_joined_cas(idt, [ident.spki_pin(host_ca.pem)], "the proxy p:443")
    # the user CA signed our certificate: accepted, but not kept as a trust anchor for servers
    assert kept.tls_ca_pems == [host_ca.pem] and kept.tls_cert_pem == idt.tls_cert_pem
    both = join.check_joined_cas(idt, [ident.spki_pin(host_ca.pem), ident.spki_pin(user_ca.pem)], "p")
    assert both.tls_ca_pems == [user_ca.pem, host_ca.pem]  # pinned too: kept


def test_check_joined_cas_refuses_any_unpinned_member(host_ca, user_ca):
    pin = ident.spki_pin(host_ca.pem)
    extra = CA()  # same cluster name, another key: what a man in the middle would add
    with pytest.raises(JoinError) as err:
        join.check_joined_cas(joined(user_ca, user_ca, host_ca, extra), [pin], "the proxy p:443")
    msg = str(err.value)
    assert ident.spki_pin(extra.pem) in msg and "not stored" in msg and "tctl status" in msg and "\n" not in msg
    # a host CA rotation: two host CAs returned, only the old one pinned -> refused; both pinned -> accepted
    new_host = CA()
    with pytest.raises(JoinError, match="rotating"):
        join.check_joined_cas(joined(user_ca, user_ca, host_ca, new_host), [pin], "p")
    ok = join.check_joined_cas(joined(user_ca, user_ca, host_ca, new_host), [pin, ident.spki_pin(new_host.pem)], "p")
    assert ok.tls_ca_pems == [host_ca.pem, new_host.pem]


def test_check_joined_cas_other_refusals(host_ca, user_ca):
    pin = ident.spki_pin(host_ca.pem)
    with pytest.raises(JoinError, match="matches the configured ca_pins"):  # nothing pinned at all
        join.check_joined_cas(joined(user_ca, user_ca, host_ca), ["sha256:" + "1" * 64], "p")
    with pytest.raises(JoinError, match="signed by none"):  # the issuer is not in the set
        join.check_joined_cas(joined(user_ca, host_ca), [pin], "p")
    other_cluster = CA(name="other-cluster")
    with pytest.raises(JoinError, match="other-cluster"):  # issuer of another cluster than the pinned host CA
        join.check_joined_cas(joined(user_ca, other_cluster, host_ca, signer=other_cluster), [pin], "p")
    broken = joined(user_ca, user_ca, host_ca)
    broken.tls_ca_pems.append(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(JoinError, match="does not parse"):
        join.check_joined_cas(broken, [pin], "p")
    # the pinned CA also signed the certificate (a single-CA cluster): fine
    assert join.check_joined_cas(joined(user_ca, host_ca, signer=host_ca), [pin], "p").tls_ca_pems == [host_ca.pem]


# --- a stand-in proxy ------------------------------------------------------------------------------
class FakeProxy:
    def __init__(self, tmp_path, user_ca: CA, host_ca: CA):
        self.requests = []
        self.gets = []
        self.answer = None  # (status, dict) to force an error
        self.export = host_ca.pem  # what /webapi/auth/export?type=tls-host serves
        self.extra_cas = []  # CA certificates added to the join answer
        web = CA("web")
        key = ec.generate_private_key(ec.SECP256R1())
        kpem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (tmp_path / "web.pem").write_bytes(web.issue(kpem, "localhost", sans=["localhost"]) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.ca_path = tmp_path / "web-ca.pem"
        self.ca_path.write_bytes(web.pem)
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.gets.append(self.path)
                if self.path == "/webapi/auth/export?type=tls-host":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-pem-file")
                    self.send_header("Content-Length", str(len(outer.export)))
                    self.end_headers()
                    return self.wfile.write(outer.export)
                if self.path == "/webapi/find":
                    return self._send(200, {"proxy": {"tls_routing_enabled": True}, "cluster_name": CLUSTER})
                self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                if outer.answer:
                    return self._send(*outer.answer)
                tls = user_ca.issue(base64.b64decode(body["public_tls_key"]), "bot-unit")
                self._send(200, {"ssh": base64.b64encode(b"ssh-rsa-cert-v01@openssh.com AAAA").decode(),
                                 "tls": base64.b64encode(tls).decode(),
                                 "tls_ca_certs": [base64.b64encode(c).decode()
                                                  for c in [user_ca.pem, host_ca.pem] + outer.extra_cas],
                                 "ssh_ca_certs": [base64.b64encode(b"@cert-authority * ssh-rsa AAA").decode()]})

            def _send(self, status, doc):
                raw = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tmp_path / "web.pem"))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.addr = f"localhost:{self.httpd.server_address[1]}"

    def stop(self):
        self.httpd.shutdown()


@pytest.fixture
def proxy(tmp_path, user_ca, host_ca):
    p = FakeProxy(tmp_path, user_ca, host_ca)
    yield p
    p.stop()


def cfg(tmp_path, proxy, **kw):
    d = dict(auth_server=None, proxy_server=proxy.addr, join_method="token", token="secret-token-value",
             ca_pins=[], ca_path=proxy.ca_path, insecure=False, storage_dir=tmp_path / "bot", credential_ttl=1800)
    d.update(kw)
    return SimpleNamespace(**d)


def test_join_via_proxy_stores_before_returning(tmp_path, proxy):
    c = cfg(tmp_path, proxy)
    asked = dt.datetime.now(dt.timezone.utc)
    idt = join.join(c)
    assert idt.bot_name == "unit" and idt.generation == 1 and idt.renewable
    path, body = proxy.requests[-1]
    assert path == "/v1/webapi/host/credentials" and body["token"] == "secret-token-value"
    expires = dt.datetime.strptime(body["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs((expires - asked).total_seconds() - 1800) < 120
    stored = ident.load(c.storage_dir)
    assert stored.tls_cert_pem == idt.tls_cert_pem and len(stored.tls_ca_pems) == 2
    assert ident.stored_token_hash(c.storage_dir) == ident.token_hash("secret-token-value")
    # The same token again: refused locally, nothing sent.
    n = len(proxy.requests)
    with pytest.raises(JoinError, match="already used"):
        join.join(c)
    assert len(proxy.requests) == n


def test_guide_shape_auth_server_is_a_proxy_with_pins(tmp_path, proxy, host_ca):
    c = cfg(tmp_path, proxy, proxy_server=None, auth_server=proxy.addr, ca_pins=[ident.spki_pin(host_ca.pem)])
    assert join.endpoint(c) == ("proxy", proxy.addr)
    assert join.join(c).generation == 1
    bad = cfg(tmp_path, proxy, proxy_server=None, auth_server=proxy.addr, ca_pins=["sha256:" + "2" * 64],
              storage_dir=tmp_path / "bad")
    with pytest.raises(JoinError, match="another cluster or the pin is wrong"):
        join.join(bad)
    assert ident.load(tmp_path / "bad") is None


def test_proxy_of_another_cluster_never_gets_the_token(tmp_path, proxy, host_ca):
    """Pins of cluster A, a proxy serving cluster B's host CA: refused before the POST."""
    proxy.export = CA().pem
    c = cfg(tmp_path, proxy, ca_pins=[ident.spki_pin(host_ca.pem)])
    with pytest.raises(JoinError) as err:
        join.join(c)
    msg = str(err.value)
    assert "another cluster or the pin is wrong" in msg and "token was not sent" in msg and "tctl status" in msg
    assert ident.spki_pin(proxy.export) in msg and "secret-token-value" not in msg
    assert proxy.requests == [] and "/webapi/auth/export?type=tls-host" in proxy.gets
    assert ident.load(c.storage_dir) is None
    # the export answers no certificate: also refused before the POST
    proxy.export = b"<html>not a proxy</html>"
    with pytest.raises(JoinError, match="no PEM certificate.*token was not sent"):
        join.join(c)
    assert proxy.requests == []


def test_pinned_proxy_join_checks_before_and_after(tmp_path, proxy, host_ca, user_ca):
    c = cfg(tmp_path, proxy, ca_pins=[ident.spki_pin(host_ca.pem)])
    idt = join.join(c)
    assert proxy.gets.index("/webapi/auth/export?type=tls-host") == 0 and len(proxy.requests) == 1
    assert ident.load(c.storage_dir).tls_ca_pems == [host_ca.pem] == idt.tls_ca_pems


def test_unpinned_ca_in_join_answer_refused_nothing_stored(tmp_path, proxy, host_ca):
    proxy.extra_cas = [CA().pem]
    c = cfg(tmp_path, proxy, ca_pins=[ident.spki_pin(host_ca.pem)])
    with pytest.raises(JoinError, match="matches none of the configured ca_pins.*not stored"):
        join.join(c)
    assert len(proxy.requests) == 1  # the token went (to the right cluster); the identity is refused
    assert ident.load(c.storage_dir) is None and list(c.storage_dir.iterdir()) == []


def test_insecure_proxy_join_warns(tmp_path, proxy, caplog):
    c = cfg(tmp_path, proxy, ca_path=None, insecure=True)
    with caplog.at_level("WARNING", logger="machine_id_agent.join"):
        join.join(c)
    warn = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("NOT verified" in w and "join token" in w and "secret-token-value" not in w for w in warn)


def test_server_refusal_is_explained_without_the_token(tmp_path, proxy):
    proxy.answer = (403, {"error": {"message": 'token "secret-token-value" expired or not found'}})
    with pytest.raises(JoinError) as err:
        join.join(cfg(tmp_path, proxy))
    msg = str(err.value)
    assert "used, expired or unknown" in msg and "tctl bots add" in msg
    assert "secret-token-value" not in msg and "<token>" in msg
    assert err.value.needs_token  # the service exits 78 on it at start (only a new token helps)
    proxy.answer = (400, {"error": {"message": 'user "bot-unit" has already been issued a renewable certificate'}})
    with pytest.raises(JoinError, match="already joined once") as err:
        join.join(cfg(tmp_path, proxy))
    assert err.value.needs_token
    assert ident.load(tmp_path / "bot") is None
    proxy.answer = (503, {"error": {"message": "auth server is starting"}})
    with pytest.raises(JoinError, match="can be retried") as err:
        join.join(cfg(tmp_path, proxy))
    assert not err.value.needs_token  # may pass later: the service keeps trying


def test_untrusted_proxy_is_a_join_error(tmp_path, proxy, host_ca):
    with pytest.raises(JoinError, match="not trusted"):
        join.join(cfg(tmp_path, proxy, ca_path=None))
    with pytest.raises(JoinError, match="not trusted.*token was not sent"):  # pins do not replace the web certificate
        join.join(cfg(tmp_path, proxy, ca_path=None, ca_pins=[ident.spki_pin(host_ca.pem)]))
    assert proxy.requests == [] and proxy.gets == []  # the TLS handshake failed: no request got through


def test_config_mistakes_fail_before_the_network(tmp_path, proxy):
    with pytest.raises(JoinError, match="no join token") as err:
        join.join(cfg(tmp_path, proxy, token=None))
    assert err.value.needs_token
    with pytest.raises(JoinError, match="not supported"):
        join.join(cfg(tmp_path, proxy, join_method="iam"))
    closed = "127.0.0.1:9"  # discard port, nothing listens
    with pytest.raises(JoinError, match="needs ca_pins"):
        join.join(cfg(tmp_path, proxy, proxy_server=None, auth_server=closed, ca_path=None))
    assert proxy.requests == []


def test_probe_classifies_addresses(tmp_path, proxy):
    assert join.probe_proxy(proxy.addr, proxy.ca_path) is True
    assert join.probe_proxy(proxy.addr) is True  # untrusted, still a proxy
    assert join.probe_proxy("127.0.0.1:9", timeout=2) is None  # nothing answers: unknown, not "auth"
    assert join.is_proxy("127.0.0.1:9", timeout=2) is False


def test_port_rule_only_when_nothing_answers(monkeypatch):
    monkeypatch.setattr(join, "probe_proxy", lambda *a, **k: None)
    assert join.is_proxy("teleport.example.com:443") and join.is_proxy("t.example.com:3080")
    assert not join.is_proxy("auth.example.com:3025")
    monkeypatch.setattr(join, "probe_proxy", lambda *a, **k: False)
    assert not join.is_proxy("teleport.example.com:443")
