# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The proxy's unauthenticated web API: ``/webapi/ping`` (and ``/webapi/find``), plus a tiny JSON client.

TLS to the proxy is verified against the system trust store (which honours ``SSL_CERT_FILE``, as Go
clients do) plus ``ca_path`` when configured. Verification is never skipped unless the config says
``insecure: true``; that is the only switch that turns it off, and the join warns before it sends the
token over such a connection (see ``join.py``). Python's own ``ssl`` and ``http.client`` are used instead
of ``requests`` so that the trust rules are exactly these.

``/webapi/auth/export?type=tls-host`` (:func:`export_host_cas`) is the proxy's unauthenticated copy of
the cluster's host CA (PEM); the join checks it against ``ca_pins`` before the token is sent.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

from machine_id_agent.errors import RenewError

DEFAULT_WEB_PORT = 443
USER_AGENT = "machine-id-agent"


class WebAPIError(RenewError):
    """The proxy's web API failed. ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, msg: str, retryable: bool = True, status: Optional[int] = None, server_message: str = ""):
        super().__init__(msg, retryable=retryable)
        self.status = status
        self.server_message = server_message


def split_addr(addr: str, default_port: int = DEFAULT_WEB_PORT) -> Tuple[str, int]:
    """``host:port`` (``[v6]:port``, or a bare host) to (host, port)."""
    a = addr.strip()
    if "://" in a:
        a = a.split("://", 1)[1]
    a = a.rstrip("/")
    if a.startswith("["):
        host, _sep, rest = a[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif a.count(":") == 1:
        host, _sep, port = a.partition(":")
    else:
        host, port = a, ""
    return host, int(port) if port else default_port


def join_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def web_ssl_context(ca_path: Optional[Path] = None, insecure: bool = False) -> ssl.SSLContext:
    """A client context for the proxy's web port: the system trust (``SSL_CERT_FILE`` honoured) plus
    ``ca_path``, host name checked, TLS >= 1.2. Only ``insecure=True`` (the config's ``insecure: true``,
    set on purpose by the operator) turns verification off; nothing else does."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Python >= 3.13 (Debian 13) turns on VERIFY_X509_STRICT here, which refuses a chain whose certificates lack
    # RFC 5280 key identifiers (seen with the test bed's CA; self-made and older enterprise CAs lack them too).
    # The chain, the signatures, the expiry and the host name are verified either way, as by every other Python
    # version and by tbot (Go); only that conformance check is left out, so one host verifies like the next.
    ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca_path:
        try:
            ctx.load_verify_locations(cafile=str(ca_path))
        except (OSError, ssl.SSLError) as exc:
            raise WebAPIError(f"ca_path {ca_path}: cannot load it as PEM certificates ({exc}); point ca_path at "
                              f"the PEM CA file that signed the proxy's HTTPS certificate", retryable=False) from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _server_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace").strip()
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if doc.get("message"):
            return str(doc["message"])
    return ""


def request_json(addr: str, method: str, path: str, body: Any = None, *, ca_path: Optional[Path] = None,
                 insecure: bool = False, timeout: float = 10, ctx: Optional[ssl.SSLContext] = None,
                 what: str = "the proxy") -> Any:
    """One HTTPS JSON request. Raises WebAPIError naming the address, the cause and a fix."""
    raw = request_bytes(addr, method, path, body, ca_path=ca_path, insecure=insecure, timeout=timeout, ctx=ctx,
                        what=what)
    try:
        return json.loads(raw)
    except ValueError:
        where = join_addr(*split_addr(addr))
        raise WebAPIError(f"{what} {where}: {method} {path} did not return JSON; check that the address is the "
                          f"Teleport proxy's web port", retryable=False) from None


def request_bytes(addr: str, method: str, path: str, body: Any = None, *, ca_path: Optional[Path] = None,
                  insecure: bool = False, timeout: float = 10, ctx: Optional[ssl.SSLContext] = None,
                  what: str = "the proxy", accept: str = "application/json") -> bytes:
    """One HTTPS request (``body``, when given, is sent as JSON); returns the answer's body. Raises
    WebAPIError naming the address, the cause and a fix."""
    host, port = split_addr(addr)
    ctx = ctx or web_ssl_context(ca_path, insecure)
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    data = None
    headers = {"User-Agent": USER_AGENT, "Accept": accept}
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    where = join_addr(host, port)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except ssl.SSLCertVerificationError as exc:
        raise WebAPIError(f"{what} {where}: its HTTPS certificate is not trusted ({exc.verify_message}); set "
                          f"ca_path to the CA that signed it, or SSL_CERT_FILE, or fix the certificate",
                          retryable=False) from None
    except ssl.SSLError as exc:
        raise WebAPIError(f"{what} {where}: TLS handshake failed ({exc.reason or exc}); check that the address is "
                          f"the Teleport proxy's web port") from None
    except socket.timeout:
        raise WebAPIError(f"{what} {where}: no answer within {timeout:g}s; check the address and that Teleport "
                          f"is running") from None
    except OSError as exc:
        raise WebAPIError(f"{what} {where}: cannot connect ({exc.strerror or exc}); check the address and that "
                          f"Teleport is running") from None
    except http.client.HTTPException as exc:
        raise WebAPIError(f"{what} {where}: bad HTTP answer ({exc.__class__.__name__}); check that the address "
                          f"is the Teleport proxy's web port") from None
    finally:
        conn.close()
    if resp.status >= 400:
        msg = _server_message(raw)
        raise WebAPIError(f"{what} {where}: {method} {path} answered HTTP {resp.status}"
                          + (f": {msg}" if msg else ""), retryable=resp.status >= 500 or resp.status == 429,
                          status=resp.status, server_message=msg)
    return raw


@dataclass
class ProxyFacts:
    cluster_name: str
    server_version: str
    tls_routing: bool
    kube_public_addr: Optional[str]
    kube_listen_addr: Optional[str]
    web_addr: str
    tunnel_addr: Optional[str]
    raw: dict = field(default_factory=dict, repr=False)
    ssh_public_addr: Optional[str] = None
    kube_enabled: bool = False

    @property
    def server_major(self) -> Optional[int]:
        return version_major(self.server_version)


def version_major(version: str) -> Optional[int]:
    v = (version or "").strip().lstrip("v")
    head = v.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _tunnel_addr(proxy: dict, web_addr: str) -> Optional[str]:
    """The reverse-tunnel address as Teleport clients resolve it: with TLS routing the web address (or
    ssh.public_addr); else ssh_tunnel_public_addr, else the host of ssh_public_addr / public_addr (or of
    the dialed address) with the PORT of tunnel_listen_addr (default 3024). Seen on v13.3.8."""
    ssh = proxy.get("ssh") or {}
    web_host, web_port = split_addr(web_addr)
    if proxy.get("tls_routing_enabled"):
        if ssh.get("public_addr"):
            h, p = split_addr(ssh["public_addr"], web_port)
            return join_addr(h, p)
        return join_addr(web_host, web_port)
    if ssh.get("ssh_tunnel_public_addr"):
        h, p = split_addr(ssh["ssh_tunnel_public_addr"], 3024)
        return join_addr(h, p)
    tunnel_port = split_addr(ssh["tunnel_listen_addr"], 3024)[1] if ssh.get("tunnel_listen_addr") else 3024
    for key in ("ssh_public_addr", "public_addr"):
        if ssh.get(key):
            return join_addr(split_addr(ssh[key], tunnel_port)[0], tunnel_port)
    return join_addr(web_host, tunnel_port)


def facts_from_ping(doc: dict, web_addr: str) -> ProxyFacts:
    if not isinstance(doc, dict) or not isinstance(doc.get("proxy"), dict):
        raise WebAPIError(f"the proxy {web_addr}: /webapi/ping has no 'proxy' section; check that the address is "
                          f"a Teleport proxy", retryable=False)
    proxy = doc["proxy"]
    kube = proxy.get("kube") or {}
    ssh = proxy.get("ssh") or {}
    host, port = split_addr(web_addr)
    return ProxyFacts(
        cluster_name=str(doc.get("cluster_name") or ""),
        server_version=str(doc.get("server_version") or ""),
        tls_routing=bool(proxy.get("tls_routing_enabled")),
        kube_public_addr=kube.get("public_addr") or None,
        kube_listen_addr=kube.get("listen_addr") or None,
        web_addr=join_addr(host, port),
        tunnel_addr=_tunnel_addr(proxy, web_addr),
        raw=doc,
        ssh_public_addr=ssh.get("public_addr") or None,
        kube_enabled=bool(kube.get("enabled")),
    )


def ping(addr: str, ca_path: Optional[Path] = None, insecure: bool = False, timeout: float = 10) -> ProxyFacts:
    """GET ``/webapi/ping`` on the proxy and return what the agent needs from it."""
    doc = request_json(addr, "GET", "/webapi/ping", ca_path=ca_path, insecure=insecure, timeout=timeout)
    return facts_from_ping(doc, addr)


def find(addr: str, ca_path: Optional[Path] = None, insecure: bool = False, timeout: float = 10) -> ProxyFacts:
    """GET ``/webapi/find`` (the light form of ping without auth connector details)."""
    doc = request_json(addr, "GET", "/webapi/find", ca_path=ca_path, insecure=insecure, timeout=timeout)
    return facts_from_ping(doc, addr)


EXPORT_HOST_CA_PATH = "/webapi/auth/export?type=tls-host"


def export_cas(addr: str, ca_type: str, ca_path: Optional[Path] = None, insecure: bool = False, timeout: float = 10
               ) -> List[bytes]:
    """GET ``/webapi/auth/export?type=<ca_type>`` (``tls-host``, ``tls-user``): the cluster's CA certificate(s)
    as the proxy serves them, without authentication (PEM). Only as trustworthy as the connection: the web
    certificate says which server answered, the pins say whether its cluster is the one meant."""
    from machine_id_agent.identity import split_pems

    path = f"/webapi/auth/export?type={ca_type}"
    raw = request_bytes(addr, "GET", path, ca_path=ca_path, insecure=insecure, timeout=timeout,
                        accept="application/x-pem-file, */*")
    pems = [p for p in split_pems(raw) if p.startswith(b"-----BEGIN CERTIFICATE-----")]
    if not pems:
        where = join_addr(*split_addr(addr))
        raise WebAPIError(f"the proxy {where}: GET {path} returned no PEM certificate; check that the address is a "
                          f"Teleport v13+ proxy's web port", retryable=False)
    return pems


def export_host_cas(addr: str, ca_path: Optional[Path] = None, insecure: bool = False, timeout: float = 10
                    ) -> List[bytes]:
    """The cluster's host CA certificate(s) (``export_cas`` with ``tls-host``)."""
    return export_cas(addr, "tls-host", ca_path=ca_path, insecure=insecure, timeout=timeout)
