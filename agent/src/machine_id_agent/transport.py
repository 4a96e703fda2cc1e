# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connections to the Teleport auth server's gRPC API.

The agent opens the TCP connection and runs TLS itself (Python's :mod:`ssl`), then speaks gRPC over
HTTP/2 on that socket (:mod:`machine_id_agent.grpcwire`). Nothing listens: no relay, no local port,
no Unix socket, so no other process on the host can reach a connection that carries the bot's
identity. Three routes, one code path:

* **Direct** (``auth_server`` is the auth service, port 3025): ALPN ``h2``, SNI
  ``hex(cluster).teleport.cluster.local``, the bot's client certificate.
* **Through the proxy's web port** (TLS routing, and also the web port of a proxy in ``separate``
  listener mode, whose web listener runs the same ALPN router on v13): ALPN
  ``["teleport-auth@<hex(cluster)>.teleport.cluster.local", "h2"]``, the same SNI and client
  certificate. The proxy forwards the raw TLS stream to auth (``ForwardTLS``), so the handshake is
  end-to-end mTLS with the auth server.
* **Insecure bootstrap** (direct join with CA pins): no client certificate and no verification, SNI
  ``teleport.cluster.local``, ALPN ``h2``, used only for ``GetClusterCACert`` before the pin check.

With a client certificate the server is verified by :func:`verify_server_cert` (signed directly by a
cluster CA, valid now, names the SNI) right after the handshake and before any application byte is
sent; see :func:`mtls_context` for why OpenSSL's own verification is not used.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import ssl
import tempfile
from typing import List, Optional

from machine_id_agent import grpcwire
from machine_id_agent.webapi import join_addr, split_addr

log = logging.getLogger(__name__)

AUTH_SNI = "teleport.cluster.local"
ALPN_AUTH_PREFIX = "teleport-auth@"


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


# --- connections --------------------------------------------------------------------------------------
class Connection:
    """An HTTP/2 connection to auth (opened at the first call); ``describe`` names the route."""

    def __init__(self, channel: grpcwire.Channel, describe: str, name: str):
        self.channel = channel
        self.describe = describe
        self.name = name  # "direct", "proxy-alpn" or "bootstrap"

    def call(self, path: str, request: bytes, timeout: float) -> bytes:
        """One unary call; raises :class:`grpcwire.RpcError`."""
        return self.channel.unary(path, request, timeout)

    def close(self) -> None:
        self.channel.close()


def direct(auth_addr: str, cluster: str, cert_pem: bytes, key_pem: bytes, ca_pems: List[bytes]) -> Connection:
    """mTLS gRPC straight to the auth service."""
    host, port = split_addr(auth_addr, 3025)
    sni = encode_cluster_name(cluster)
    cas = list(ca_pems)
    ch = grpcwire.Channel(grpcwire.tcp_dial(host, port), mtls_context(cert_pem, key_pem, ["h2"]), sni,
                          verify=lambda der: verify_server_cert(der, cas, sni), require_alpn="h2")
    return Connection(ch, f"auth {join_addr(host, port)} (direct mTLS)", "direct")


def via_proxy_alpn(proxy_addr: str, cluster: str, cert_pem: bytes, key_pem: bytes, ca_pems: List[bytes]
                   ) -> Connection:
    """mTLS gRPC to auth through the proxy's web port (``teleport-auth@`` ALPN passthrough)."""
    host, port = split_addr(proxy_addr, 443)
    sni = encode_cluster_name(cluster)
    cas = list(ca_pems)
    ch = grpcwire.Channel(grpcwire.tcp_dial(host, port), mtls_context(cert_pem, key_pem, [auth_alpn(cluster), "h2"]),
                          sni, verify=lambda der: verify_server_cert(der, cas, sni), require_alpn="h2")
    return Connection(ch, f"auth through proxy {join_addr(host, port)} (ALPN {ALPN_AUTH_PREFIX})", "proxy-alpn")


def insecure_bootstrap(auth_addr: str) -> Connection:
    """Unverified TLS to auth (SNI teleport.cluster.local, ALPN h2, no client certificate) for
    GetClusterCACert before a pinned join. Nothing secret is sent on it."""
    host, port = split_addr(auth_addr, 3025)
    ch = grpcwire.Channel(grpcwire.tcp_dial(host, port), insecure_context(["h2"]), AUTH_SNI, verify=None,
                          require_alpn="h2")
    return Connection(ch, f"auth {join_addr(host, port)} (unverified, for the CA pin check)", "bootstrap")
