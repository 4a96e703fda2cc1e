# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connections to the Teleport auth server's gRPC API.

* **Direct** (``auth_server`` is the auth service, port 3025): grpcio's own TLS with the bot's
  certificate and key, roots = the cluster's CAs, and the verification name / SNI
  ``hex(cluster).teleport.cluster.local`` (``grpc.ssl_target_name_override``). grpcio offers ALPN
  ``h2``, which is what the auth server's listener needs to route a connection to gRPC.
* **Through the proxy's web port** (TLS routing, and also the web port of a proxy in ``separate``
  listener mode, whose web listener runs the same ALPN router on v13): grpcio cannot set ALPN, so a
  small local bridge (:class:`TLSBridge`) listens on 127.0.0.1, and for each connection grpcio opens
  it dials the proxy, runs TLS itself with Python's ``ssl`` -- ALPN
  ``["teleport-auth@<hex(cluster)>.teleport.cluster.local", "h2"]``, SNI
  ``<hex(cluster)>.teleport.cluster.local``, the bot's client certificate, roots = the cluster CAs --
  and hands the plaintext HTTP/2 to grpcio over the loopback socket. The proxy forwards the raw TLS
  stream to auth (``ForwardTLS``), so the handshake is end-to-end mTLS with the auth server.
* **Insecure bootstrap** (direct join with CA pins): the same bridge with no verification and no client
  certificate, SNI ``teleport.cluster.local``, ALPN ``h2``, just to call ``GetClusterCACert``.

The bridge's TLS runs over a :class:`ssl.SSLObject` and memory BIOs, so the raw stream can be any
object with ``recv``/``sendall``/``fileno``/``close`` (a TCP socket, or an SSH channel).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import select
import socket
import ssl
import tempfile
import threading
import time
from typing import Callable, List, Optional

import grpc

from machine_id_agent.webapi import join_addr, split_addr

log = logging.getLogger(__name__)

AUTH_SNI = "teleport.cluster.local"
ALPN_AUTH_PREFIX = "teleport-auth@"
_CHUNK = 65536

_CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),       # never send auth traffic through an HTTP proxy from the env
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def encode_cluster_name(cluster: str) -> str:
    """``hex(cluster).teleport.cluster.local`` -- the SNI and verification name of the auth server."""
    return cluster.encode().hex() + "." + AUTH_SNI


def auth_alpn(cluster: str) -> str:
    return ALPN_AUTH_PREFIX + encode_cluster_name(cluster)


class TransportError(Exception):
    """A connection-level failure; ``str()`` is one line."""


# --- client certificate into an SSLContext without leaving the key on disk ----------------------------
def load_client_cert(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``SSLContext.load_cert_chain`` from memory: an anonymous memfd (Linux), else a 0600 temp file that
    is removed right after loading."""
    blob = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("machine-id-agent-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, blob)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        finally:
            os.close(fd)
    fd, path = tempfile.mkstemp(prefix=".machine-id-agent-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, blob)
        os.close(fd)
        fd = -1
        ctx.load_cert_chain(path)
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(path)


def mtls_context(cert_pem: bytes, key_pem: bytes, alpn: List[str]) -> ssl.SSLContext:
    """Client context with the bot's certificate and NO trust store.

    OpenSSL appends issuer certificates found in the context's trust store to the client certificate
    message ("auto chain"). Teleport v13's auth server closes the connection right after the handshake
    when the client sends its certificate together with the CA (seen on the real 13.3.8 binaries; see
    docs/protocol-findings.md). So the server is verified by :func:`verify_server_cert` after the
    handshake, before any application byte is sent, instead of by OpenSSL.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    load_client_cert(ctx, cert_pem, key_pem)
    ctx.set_alpn_protocols(alpn)
    return ctx


def _dns_match(pattern: str, host: str) -> bool:
    p, h = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if p.startswith("*."):
        head, _sep, rest = h.partition(".")
        return bool(head) and rest == p[2:]
    return p == h


def _verify_issued_by(leaf, ca) -> None:
    """Signature check of ``leaf`` by ``ca``; raises InvalidSignature/ValueError/TypeError."""
    if hasattr(leaf, "verify_directly_issued_by"):  # cryptography >= 40
        leaf.verify_directly_issued_by(ca)
        return
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    pub = ca.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        pub.verify(leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), leaf.signature_hash_algorithm)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    else:
        raise TypeError("unsupported CA key type")


def verify_server_cert(der: Optional[bytes], ca_pems: List[bytes], hostname: str,
                       now: Optional[_dt.datetime] = None) -> None:
    """The server certificate must be issued directly by one of ``ca_pems``, be valid now and name
    ``hostname`` (wildcards in the leftmost label only). Raises TransportError."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    if not der:
        raise TransportError("server certificate not trusted (the server sent none)")
    leaf = x509.load_der_x509_certificate(der)
    signed = False
    for pem in ca_pems:
        ca = x509.load_pem_x509_certificate(pem)
        if ca.subject != leaf.issuer:
            continue
        try:
            _verify_issued_by(leaf, ca)
            signed = True
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    if not signed:
        raise TransportError(f"server certificate not trusted (not signed by the cluster CA; issuer "
                             f"{leaf.issuer.rfc4514_string()})")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    from machine_id_agent.identity import cert_not_after, cert_not_before

    if not cert_not_before(leaf) <= now < cert_not_after(leaf):
        raise TransportError(f"server certificate not trusted (expired or not yet valid: "
                             f"{cert_not_before(leaf).isoformat()} to {cert_not_after(leaf).isoformat()})")
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not any(_dns_match(n, hostname) for n in names):
        raise TransportError(f"server certificate not trusted (it does not name {hostname})")


def insecure_context(alpn: List[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    return ctx


# --- the bridge --------------------------------------------------------------------------------------
class TLSBridge:
    """Loopback listener; each accepted plaintext connection is tunnelled through a TLS session that
    this process runs over a stream returned by ``dial()``."""

    def __init__(self, dial: Callable[[], object], ctx: ssl.SSLContext, server_hostname: str,
                 require_alpn: Optional[str] = "h2", name: str = "auth", timeout: float = 15.0,
                 verify: Optional[Callable[[Optional[bytes]], None]] = None):
        self._verify = verify
        self._dial = dial
        self._ctx = ctx
        self._sni = server_hostname
        self._require_alpn = require_alpn
        self._timeout = timeout
        self.name = name
        self.last_error: Optional[str] = None
        self.handshakes = 0
        self.peer_cert_der: Optional[bytes] = None
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self.port = self._lsock.getsockname()[1]
        self._closed = threading.Event()
        self._conns: set = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"bridge-{name}", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client = self._lsock.accept()[0]
            except OSError:
                return
            if self._closed.is_set():
                client.close()
                return
            t = threading.Thread(target=self._serve, args=(client,), name=f"bridge-{self.name}-conn", daemon=True)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        raw = None
        with self._lock:
            self._conns.add(client)
        try:
            try:
                raw = self._dial()
            except (OSError, TransportError) as exc:
                self.last_error = f"cannot connect: {getattr(exc, 'strerror', None) or exc}"
                return
            with self._lock:
                self._conns.add(raw)
            try:
                self._pump(client, raw)
            except ssl.SSLCertVerificationError as exc:
                self.last_error = f"server certificate not trusted ({exc.verify_message})"
            except ssl.SSLError as exc:
                self.last_error = f"TLS failed ({exc.reason or exc})"
            except TransportError as exc:
                self.last_error = str(exc)
            except OSError as exc:
                if not self._closed.is_set():
                    self.last_error = f"connection failed ({exc.strerror or exc})"
        finally:
            for s in (client, raw):
                if s is None:
                    continue
                try:
                    s.close()
                except Exception:  # noqa: BLE001 - closing a broken stream
                    pass
                with self._lock:
                    self._conns.discard(s)

    def _pump(self, client: socket.socket, raw) -> None:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self._ctx.wrap_bio(inc, out, server_side=False, server_hostname=self._sni)

        def flush():
            data = out.read()
            if data:
                raw.sendall(data)

        def feed() -> bool:
            deadline = time.monotonic() + self._timeout
            while True:
                r = select.select([raw], [], [], max(0.0, deadline - time.monotonic()))[0]
                if not r:
                    raise TransportError(f"no answer from the server within {self._timeout:g}s during the TLS "
                                         f"handshake")
                try:
                    data = raw.recv(_CHUNK)
                    break
                except BlockingIOError:  # a stream whose readiness signal ran ahead of its data
                    time.sleep(0.001)
            if not data:
                inc.write_eof()
                return False
            inc.write(data)
            return True

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                if not feed():
                    raise TransportError("the server closed the connection during the TLS handshake "
                                         "(no route for this ALPN/SNI, or client certificate rejected)")
        flush()
        self.handshakes += 1
        self.peer_cert_der = tls.getpeercert(binary_form=True)
        if self._verify is not None:
            self._verify(self.peer_cert_der)
        proto = tls.selected_alpn_protocol()
        if self._require_alpn and proto != self._require_alpn:
            raise TransportError(f"the server negotiated ALPN {proto!r}, not {self._require_alpn!r}")
        self.last_error = None

        def drain() -> bool:
            """Hand every decrypted byte to grpc; False when the TLS session ended."""
            while True:
                try:
                    plain = tls.read(_CHUNK)
                except ssl.SSLWantReadError:
                    return True
                except ssl.SSLZeroReturnError:
                    return False
                if not plain:
                    return False
                client.sendall(plain)

        client.setblocking(True)
        if not drain():  # application data that arrived with the last handshake flight
            return
        flush()
        socks = [client, raw]
        while not self._closed.is_set():
            r = select.select(socks, [], [], 1.0)[0]
            if client in r:
                data = client.recv(_CHUNK)
                if not data:
                    try:
                        tls.unwrap()
                    except ssl.SSLError:
                        pass
                    flush()
                    return
                tls.write(data)
                flush()
            if raw in r:
                try:
                    data = raw.recv(_CHUNK)
                except BlockingIOError:
                    time.sleep(0.001)
                    continue
                if not data:
                    return
                inc.write(data)
                alive = drain()
                flush()
                if not alive:
                    return

    def close(self) -> None:
        self._closed.set()
        try:  # shutdown() wakes the thread blocked in accept(); close() alone does not
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._lsock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                if isinstance(s, socket.socket):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            except Exception:  # noqa: BLE001
                pass
        self._thread.join(timeout=2)


def tcp_dialer(addr: str, timeout: float = 10.0, default_port: int = 443) -> Callable[[], socket.socket]:
    host, port = split_addr(addr, default_port)

    def dial() -> socket.socket:
        s = socket.create_connection((host, port), timeout=timeout)
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    return dial


# --- channels -----------------------------------------------------------------------------------------
class Connection:
    """A gRPC channel to auth plus whatever carries it (bridge); ``describe`` names the route."""

    def __init__(self, channel: grpc.Channel, describe: str, bridge: Optional[TLSBridge] = None,
                 carrier=None):
        self.channel = channel
        self.describe = describe
        self.bridge = bridge
        self.carrier = carrier  # e.g. the SSH tunnel under the bridge; closed last

    def last_transport_error(self) -> Optional[str]:
        return self.bridge.last_error if self.bridge else None

    def close(self) -> None:
        try:
            self.channel.close()
        finally:
            try:
                if self.bridge:
                    self.bridge.close()
            finally:
                if self.carrier is not None:
                    self.carrier.close()


def direct(auth_addr: str, cluster: str, cert_pem: bytes, key_pem: bytes, ca_pems: List[bytes]) -> Connection:
    """mTLS gRPC straight to the auth service with grpcio's TLS."""
    host, port = split_addr(auth_addr, 3025)
    sni = encode_cluster_name(cluster)
    creds = grpc.ssl_channel_credentials(root_certificates=b"".join(ca_pems), private_key=key_pem,
                                         certificate_chain=cert_pem)
    opts = _CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", sni), ("grpc.default_authority", sni)]
    ch = grpc.secure_channel(join_addr(host, port), creds, options=opts)
    return Connection(ch, f"auth {join_addr(host, port)} (direct mTLS)")


def via_proxy_alpn(proxy_addr: str, cluster: str, cert_pem: bytes, key_pem: bytes, ca_pems: List[bytes]
                   ) -> Connection:
    """mTLS gRPC to auth through the proxy's web port (``teleport-auth@`` ALPN passthrough)."""
    sni = encode_cluster_name(cluster)
    ctx = mtls_context(cert_pem, key_pem, [auth_alpn(cluster), "h2"])
    cas = list(ca_pems)
    bridge = TLSBridge(tcp_dialer(proxy_addr), ctx, sni, require_alpn="h2", name="proxy-alpn",
                       verify=lambda der: verify_server_cert(der, cas, sni))
    opts = _CHANNEL_OPTIONS + [("grpc.default_authority", sni)]
    ch = grpc.insecure_channel(bridge.target, options=opts)
    return Connection(ch, f"auth through proxy {proxy_addr} (ALPN {ALPN_AUTH_PREFIX})", bridge)


def insecure_bootstrap(auth_addr: str) -> Connection:
    """Unverified TLS to auth (SNI teleport.cluster.local, ALPN h2) for GetClusterCACert before a pinned join."""
    host, port = split_addr(auth_addr, 3025)
    bridge = TLSBridge(tcp_dialer(join_addr(host, port), default_port=3025), insecure_context(["h2"]), AUTH_SNI,
                       require_alpn="h2", name="bootstrap")
    ch = grpc.insecure_channel(bridge.target, options=_CHANNEL_OPTIONS + [("grpc.default_authority", AUTH_SNI)])
    return Connection(ch, f"auth {join_addr(host, port)} (unverified, for the CA pin check)", bridge)


def via_ssh_tunnel(tunnel_addr: str, cluster: str, cert_pem: bytes, key_pem: bytes, ca_pems: List[bytes],
                   ssh_cert: bytes, ssh_ca_lines: List[bytes]) -> Connection:
    """mTLS gRPC to auth inside the proxy's SSH reverse tunnel (``teleport-transport`` channels)."""
    from machine_id_agent.sshtunnel import SSHTunnel

    tunnel = SSHTunnel(tunnel_addr, key_pem, ssh_cert, ssh_ca_lines)
    sni = encode_cluster_name(cluster)
    ctx = mtls_context(cert_pem, key_pem, ["h2"])
    cas = list(ca_pems)
    bridge = TLSBridge(tunnel.dial, ctx, sni, require_alpn="h2", name="ssh-tunnel",
                       verify=lambda der: verify_server_cert(der, cas, sni))
    ch = grpc.insecure_channel(bridge.target, options=_CHANNEL_OPTIONS + [("grpc.default_authority", sni)])
    return Connection(ch, f"auth through the proxy's SSH tunnel {tunnel_addr}", bridge, carrier=tunnel)
