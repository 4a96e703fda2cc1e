# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Transports against local stand-ins: a grpcio TLS server plays the auth server's gRPC listener (grpcio is only
a test dependency: the agent's own client is machine_id_agent.grpcwire over h2)."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from machine_id_agent import identity as ident
from machine_id_agent import grpcwire, join, proto, transport

CLUSTER = "c1.example"
NOW = dt.datetime.now(dt.timezone.utc)


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class PKI:
    def __init__(self, cluster=CLUSTER):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
                               x509.NameAttribute(NameOID.COMMON_NAME, cluster)])
        self.cert = self._sign(self.name, self.key.public_key(), ca=True)
        self.ca_pem = _pem(self.cert)

    def _sign(self, subject, pub, ca=False, sans=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(minutes=5))
             .not_valid_after(NOW + dt.timedelta(days=1))  # the suite runs for more than an hour first
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def server(self):
        k = ec.generate_private_key(ec.SECP256R1())
        c = self._sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "auth")]), k.public_key(),
                       sans=["*.teleport.cluster.local", "teleport.cluster.local"])
        return _pem(k), _pem(c)

    def client(self, cn="bot-example"):
        key_pem = ident.generate_key()
        pub = serialization.load_pem_private_key(key_pem, None).public_key()
        c = self._sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), pub)
        return key_pem, _pem(c)


@pytest.fixture(scope="module")
def pki():
    return PKI()


class FakeAuth:
    """grpcio TLS server with GetClusterCACert; records the client certificate CN it saw."""

    def __init__(self, pki: PKI, require_client_auth: bool):
        self.seen = []
        key, cert = pki.server()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))

        def get_ca(request, context):
            cn = context.auth_context().get("x509_common_name", [b""])
            self.seen.append(cn[0].decode() if cn else "")
            return proto.GetClusterCACertResponse(tls_ca=pki.ca_pem)

        handler = grpc.method_handlers_generic_handler("proto.AuthService", {
            "GetClusterCACert": grpc.unary_unary_rpc_method_handler(
                get_ca, request_deserializer=proto.Empty.FromString,
                response_serializer=proto.GetClusterCACertResponse.SerializeToString),
        })
        self.server.add_generic_rpc_handlers((handler,))
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=pki.ca_pem,
                                            require_client_auth=require_client_auth)
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.addr = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self):
        self.server.stop(0)


@pytest.fixture(scope="module")
def auth(pki):
    s = FakeAuth(pki, require_client_auth=True)
    yield s
    s.stop()


def _get_ca(conn: transport.Connection) -> bytes:
    raw = conn.call(proto.METHODS["GetClusterCACert"], proto.Empty().SerializeToString(), 10)
    return proto.GetClusterCACertResponse.FromString(raw).tls_ca


def test_encode_cluster_name():
    assert transport.encode_cluster_name("lanyard-testbed") == "6c616e796172642d74657374626564.teleport.cluster.local"
    assert transport.auth_alpn("a") == "teleport-auth@61.teleport.cluster.local"


def test_direct_mtls(pki, auth):
    key, cert = pki.client("bot-direct")
    conn = transport.direct(auth.addr, CLUSTER, cert, key, [pki.ca_pem])
    try:
        assert _get_ca(conn) == pki.ca_pem
    finally:
        conn.close()
    assert auth.seen[-1] == "bot-direct"


def test_proxy_route_mtls_end_to_end(pki, auth):
    key, cert = pki.client("bot-bridge")
    conn = transport.via_proxy_alpn(auth.addr, CLUSTER, cert, key, [pki.ca_pem])
    try:
        assert _get_ca(conn) == pki.ca_pem
        assert _get_ca(conn) == pki.ca_pem  # second call on the same HTTP/2 connection
        assert conn.channel.handshakes == 1
    finally:
        conn.close()
    assert auth.seen[-1] == "bot-bridge"


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_refuses_untrusted_server_before_any_request(pki, auth, route):
    other = PKI()
    key, cert = pki.client("bot-untrusted-" + route)
    fn = transport.direct if route == "direct" else transport.via_proxy_alpn
    conn = fn(auth.addr, CLUSTER, cert, key, [other.ca_pem])
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            _get_ca(conn)
        assert err.value.code == grpcwire.UNAVAILABLE and err.value.transport
        assert "not trusted" in err.value.details
    finally:
        conn.close()
    assert "bot-untrusted-" + route not in auth.seen  # no request reached the server


def test_insecure_bootstrap_fetches_cas_for_pin_check(pki):
    s = FakeAuth(pki, require_client_auth=False)
    try:
        cas = join.fetch_cluster_cas(s.addr)
    finally:
        s.stop()
    assert cas == [pki.ca_pem]
    join.check_pins(cas, [ident.spki_pin(pki.ca_pem)], "auth")


def test_fetch_cluster_cas_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(join.JoinError) as err:
        join.fetch_cluster_cas(f"127.0.0.1:{port}", timeout=3)
    assert "cannot fetch the cluster CA" in str(err.value) and "\n" not in str(err.value)


def test_proxy_route_offers_teleport_auth_alpn_and_sni(pki):
    """A TLS server that only speaks the teleport-auth@ protocol: it is selected, so the client offered it,
    and the SNI is hex(cluster).teleport.cluster.local. The client then insists on h2 and says so."""
    key, cert = pki.server()
    skey = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"srv-{os.getpid()}.pem")
    with open(skey, "wb") as f:
        f.write(cert + key)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(skey)
    os.unlink(skey)
    sctx.set_alpn_protocols([transport.auth_alpn(CLUSTER)])
    seen = {}

    def sni(sock, name, ctx):
        seen["sni"] = name

    sctx.sni_callback = sni
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def serve():
        c = lsock.accept()[0]
        with sctx.wrap_socket(c, server_side=True) as t:
            seen["alpn"] = t.selected_alpn_protocol()
            t.settimeout(5)
            try:
                seen["got"] = t.recv(100)
            except (OSError, ssl.SSLError):
                seen["got"] = b""

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ckey, ccert = pki.client()
    conn = transport.via_proxy_alpn(f"127.0.0.1:{lsock.getsockname()[1]}", CLUSTER, ccert, ckey, [pki.ca_pem])
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            _get_ca(conn)
    finally:
        conn.close()
        lsock.close()
    th.join(5)
    assert seen["sni"] == transport.encode_cluster_name(CLUSTER)
    assert seen["alpn"] == transport.auth_alpn(CLUSTER)
    assert "negotiated ALPN" in err.value.details and "teleport-auth@" in err.value.details
    assert seen["got"] == b""  # not a byte of HTTP/2 was sent


def test_no_listening_socket_is_opened(pki, auth):
    """The transport never listens: every socket the process holds before and after calls on every route is
    the same set of listeners (the stand-in's), none of them ours."""
    def listeners():
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                s = socket.socket(fileno=int(fd))
            except OSError:
                continue
            try:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    found.add(s.getsockname())
            except OSError:
                pass
            finally:
                s.detach()
        return found

    before = listeners()
    key, cert = pki.client("bot-nolisten")
    for fn in (transport.direct, transport.via_proxy_alpn):
        conn = fn(auth.addr, CLUSTER, cert, key, [pki.ca_pem])
        try:
            assert _get_ca(conn) == pki.ca_pem
            assert listeners() == before
        finally:
            conn.close()


def test_client_key_never_touches_disk(pki, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    key, cert = pki.client()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    transport.load_client_cert(ctx, cert, key)
    assert list(tmp_path.iterdir()) == []


class _NoShortcut:
    """A certificate without ``verify_directly_issued_by`` (cryptography < 40) to exercise the fallback."""

    def __init__(self, cert):
        self._c = cert

    def __getattr__(self, name):
        if name == "verify_directly_issued_by":
            raise AttributeError(name)
        return getattr(self._c, name)


def test_verify_server_cert(pki):
    key, cert = pki.server()
    der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    sni = transport.encode_cluster_name(CLUSTER)
    transport.verify_server_cert(der, [PKI().ca_pem, pki.ca_pem], sni)  # any of the CAs
    with pytest.raises(transport.TransportError, match="not signed by the cluster CA"):
        transport.verify_server_cert(der, [PKI().ca_pem], sni)
    with pytest.raises(transport.TransportError, match="does not name"):
        transport.verify_server_cert(der, [pki.ca_pem], "a.b.teleport.cluster.local")  # wildcard: one label only
    with pytest.raises(transport.TransportError, match="expired"):
        transport.verify_server_cert(der, [pki.ca_pem], sni, now=NOW + dt.timedelta(days=30))
    with pytest.raises(transport.TransportError, match="sent none"):
        transport.verify_server_cert(None, [pki.ca_pem], sni)


def test_signature_fallback_without_shortcut(pki):
    cert = pki.server()[1]
    leaf = _NoShortcut(x509.load_pem_x509_certificate(cert))
    transport._verify_issued_by(leaf, pki.cert)
    from cryptography.exceptions import InvalidSignature

    with pytest.raises(InvalidSignature):
        transport._verify_issued_by(leaf, PKI().cert)
