# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Joining the cluster with a one-time bot token (``join_method: token``).

Two routes, as tbot v13 has them:

* **through the proxy**: ``POST /v1/webapi/host/credentials`` (JSON ``RegisterUsingTokenRequest``) over
  the proxy's verified HTTPS;
* **directly to auth**: an unverified TLS connection (SNI ``teleport.cluster.local``, ALPN ``h2``) calls
  gRPC ``GetClusterCACert``; every returned CA certificate must match a configured pin
  (``sha256:<hex SPKI>``) and be currently valid; then ``POST /v2/tokens/register`` goes over TLS verified
  against those CAs (ALPN ``http/1.1``).

The new identity is stored durably (with the token hash) BEFORE :func:`join` returns, so a crash right
after a join never loses the identity that consumed the one-time token. A token whose hash equals the
stored one is never sent a second time.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import http.client
import json
import logging
import socket
import ssl
from pathlib import Path
from typing import List, Optional

import grpc

from machine_id_agent import identity as ident
from machine_id_agent import proto, transport, webapi
from machine_id_agent.errors import JoinError

log = logging.getLogger(__name__)

BOT_ROLE = "Bot"
REGISTER_PATH_PROXY = "/v1/webapi/host/credentials"
REGISTER_PATH_AUTH = "/v2/tokens/register"
_FIX_TOKEN = "create a new token with `tctl bots add <name> --roles=...` (or `tctl bots rm <name>` first if the bot " \
             "exists) and put it in the config"


def _redact(text: str, token: Optional[str]) -> str:
    return text.replace(token, "<token>") if token else text


def register_request(token: str, key_pem: bytes, expires: _dt.datetime) -> dict:
    """The JSON body of ``RegisterUsingTokenRequest`` for a bot."""
    return {
        "token": token,
        "role": BOT_ROLE,
        "public_tls_key": ident.b64(ident.tls_public_key(key_pem)),
        "public_ssh_key": ident.b64(ident.ssh_public_key(key_pem)),
        "expires": expires.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def identity_from_certs_json(doc: dict, key_pem: bytes, where: str) -> ident.Identity:
    """``proto.Certs`` as JSON (base64 strings) to an Identity."""
    import base64

    try:
        ssh = base64.b64decode(doc["ssh"])
        tls = base64.b64decode(doc["tls"])
        tls_cas = [base64.b64decode(c) for c in doc.get("tls_ca_certs") or []]
        ssh_cas = [base64.b64decode(c) for c in doc.get("ssh_ca_certs") or []]
    except (KeyError, TypeError, ValueError) as exc:
        raise JoinError(f"{where} returned certificates in an unexpected shape ({exc.__class__.__name__}); "
                        f"check that the address is a Teleport v13+ proxy or auth server") from None
    try:
        result = ident.Identity.from_certs(key_pem, ssh, tls, tls_cas, ssh_cas)
    except ident.IdentityError as exc:
        raise JoinError(f"{where} returned an unusable certificate: {exc}") from None
    if not ident.cert_key_matches(result.tls_cert_pem, key_pem):
        raise JoinError(f"{where} returned a certificate for another key; this is a server problem, try again")
    return result


# --- where to join -------------------------------------------------------------------------------------
def probe_proxy(addr: str, ca_path: Optional[Path] = None, insecure: bool = False, timeout: float = 5
                ) -> Optional[bool]:
    """Does ``addr`` answer ``/webapi/find`` like a Teleport proxy? True/False, or None when nothing
    answered (down, unreachable). Used only to classify an ``auth_server`` value; nothing secret is sent."""
    try:
        webapi.find(addr, ca_path=ca_path, insecure=insecure, timeout=timeout)
        return True
    except webapi.WebAPIError as exc:
        if exc.status is not None:
            return False  # an HTTPS server that is not a proxy (the auth service answers 404)
        if "not trusted" in str(exc):
            try:  # an untrusted proxy is still a proxy; the real request will report the trust problem
                webapi.find(addr, insecure=True, timeout=timeout)
                return True
            except webapi.WebAPIError as exc2:
                return False if exc2.status is not None or "did not return JSON" in str(exc2) else None
        if "TLS handshake failed" in str(exc) or "did not return JSON" in str(exc) or "bad HTTP" in str(exc):
            return False
        return None


def is_proxy(addr: str, ca_path: Optional[Path] = None, insecure: bool = False, timeout: float = 5) -> bool:
    """:func:`probe_proxy`, and when nothing answered, tbot's rule: ports 443 and 3080 are proxies."""
    found = probe_proxy(addr, ca_path, insecure, timeout)
    if found is None:
        return webapi.split_addr(addr, 3025)[1] in (443, 3080)
    return found


def endpoint(cfg) -> tuple:
    """("proxy"|"auth", address) for this config."""
    if getattr(cfg, "proxy_server", None):
        return "proxy", cfg.proxy_server
    addr = getattr(cfg, "auth_server", None)
    if not addr:
        raise JoinError("the config names no server; set proxy_server (the proxy's host:port) or auth_server "
                        "(the auth service, host:3025)")
    if is_proxy(addr, cfg.ca_path, cfg.insecure):
        return "proxy", addr
    return "auth", addr


# --- via the proxy -------------------------------------------------------------------------------------
def join_via_proxy(addr: str, token: str, key_pem: bytes, expires: _dt.datetime, ca_path: Optional[Path] = None,
                   insecure: bool = False, timeout: float = 30) -> ident.Identity:
    body = register_request(token, key_pem, expires)
    try:
        doc = webapi.request_json(addr, "POST", REGISTER_PATH_PROXY, body, ca_path=ca_path, insecure=insecure,
                                  timeout=timeout)
    except webapi.WebAPIError as exc:
        raise _join_error(f"the proxy {addr}", exc.status, exc.server_message, str(exc), token) from None
    return identity_from_certs_json(doc, key_pem, f"the proxy {addr}")


def _join_error(where: str, status: Optional[int], server_message: str, full: str, token: str) -> JoinError:
    msg = _redact(server_message or "", token)
    low = msg.lower()
    if "already been issued a renewable certificate" in low:
        return JoinError(f"{where} refused the join: {msg}. The bot already joined once (a token can be used only "
                         f"once per bot); {_FIX_TOKEN}")
    if "expired or not found" in low or "not found" in low and "token" in low:
        return JoinError(f"{where} refused the join token: it is used, expired or unknown ({msg}); {_FIX_TOKEN}")
    if status is not None and 400 <= status < 500:
        return JoinError(f"{where} refused the join (HTTP {status}: {msg or 'no message'}); {_FIX_TOKEN}")
    return JoinError(_redact(full, token) + "; the join can be retried")


# --- directly to auth ----------------------------------------------------------------------------------
def fetch_cluster_cas(auth_addr: str, timeout: float = 15) -> List[bytes]:
    """GetClusterCACert over unverified TLS (the pins make it trustworthy)."""
    conn = transport.insecure_bootstrap(auth_addr)
    try:
        req_t, resp_t = proto.SIGNATURES["GetClusterCACert"]
        call = conn.channel.unary_unary(proto.METHODS["GetClusterCACert"], request_serializer=req_t.SerializeToString,
                                        response_deserializer=resp_t.FromString)
        resp = call(req_t(), timeout=timeout)
    except grpc.RpcError as exc:
        detail = conn.last_transport_error() or (exc.details() if hasattr(exc, "details") else str(exc))
        raise JoinError(f"the auth server {auth_addr}: cannot fetch the cluster CA for the pin check ({detail}); "
                        f"check that auth_server is the auth service (host:3025) and that it is running") from None
    finally:
        conn.close()
    cas = ident.split_pems(resp.tls_ca)
    if not cas:
        raise JoinError(f"the auth server {auth_addr} returned no CA certificate; check that auth_server is a "
                        f"Teleport auth service")
    return cas


def check_pins(cas: List[bytes], pins: List[str], where: str, now: Optional[_dt.datetime] = None) -> None:
    """Every CA certificate must match one pin and be currently valid, else JoinError."""
    from cryptography import x509

    now = now or _dt.datetime.now(_dt.timezone.utc)
    wanted = [p.strip().lower() for p in pins]
    for pem in cas:
        got = ident.spki_pin(pem)
        if not any(hmac.compare_digest(got, p) for p in wanted):
            raise JoinError(f"{where}: the cluster CA certificate with pin {got} matches none of the configured "
                            f"ca_pins; check the pin with `tctl status` (CA pin) and update ca_pins -- if it did "
                            f"not change, someone may be intercepting the connection")
        cert = x509.load_pem_x509_certificate(pem)
        if not ident.cert_not_before(cert) <= now < ident.cert_not_after(cert):
            raise JoinError(f"{where}: the cluster CA certificate with pin {got} is not valid now (valid "
                            f"{ident.cert_not_before(cert).isoformat()} to {ident.cert_not_after(cert).isoformat()}); "
                            f"check the clock of this host")


def check_proxy_join_pins(cas: List[bytes], pins: List[str], where: str) -> None:
    """Through the proxy, tbot ignores pins. When pins are configured anyway (the guide's config puts the
    proxy address in auth_server together with ca_pins), the CA certificates the join returned -- the
    cluster's user CA and host CA -- must include one that matches a pin; else the proxy is not the
    cluster the pins name, and the identity is not used."""
    got = [ident.spki_pin(c) for c in cas]
    wanted = [p.strip().lower() for p in pins]
    if not any(hmac.compare_digest(g, w) for g in got for w in wanted):
        raise JoinError(f"{where}: none of the cluster CA certificates it returned ({', '.join(got) or 'none'}) "
                        f"matches the configured ca_pins; check the pin with `tctl status` (CA pin) -- if it is "
                        f"right, this proxy does not belong to that cluster")


def _https_post_auth(auth_addr: str, path: str, body: dict, ca_pems: List[bytes], timeout: float) -> tuple:
    host, port = webapi.split_addr(auth_addr, 3025)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=b"".join(ca_pems).decode())
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        sock = ctx.wrap_socket(raw, server_hostname=transport.AUTH_SNI)
    except BaseException:
        raw.close()
        raise
    conn = http.client.HTTPConnection(transport.AUTH_SNI, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "User-Agent": webapi.USER_AGENT})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def join_via_auth(addr: str, token: str, key_pem: bytes, expires: _dt.datetime, pins: List[str],
                  ca_path: Optional[Path] = None, insecure: bool = False, timeout: float = 30) -> ident.Identity:
    where = f"the auth server {addr}"
    if pins:
        cas = fetch_cluster_cas(addr)
        check_pins(cas, pins, where)
    elif ca_path:
        try:
            cas = ident.split_pems(Path(ca_path).read_bytes())
        except OSError as exc:
            raise JoinError(f"ca_path {ca_path}: {exc.strerror}; point ca_path at the cluster's host CA PEM "
                            f"(`tctl auth export --type=tls-host`) or use ca_pins") from None
        if not cas:
            raise JoinError(f"ca_path {ca_path} holds no PEM certificate; export it with "
                            f"`tctl auth export --type=tls-host` or use ca_pins")
    elif insecure:
        log.warning("joining %s without verifying the auth server (insecure: true)", addr)
        cas = fetch_cluster_cas(addr)
    else:
        raise JoinError(f"{where}: a direct join needs ca_pins (the CA pin from `tctl status`) or ca_path; add "
                        f"one to onboarding, or join through the proxy with proxy_server")
    body = register_request(token, key_pem, expires)
    try:
        status, raw = _https_post_auth(addr, REGISTER_PATH_AUTH, body, cas, timeout)
    except ssl.SSLCertVerificationError as exc:
        raise JoinError(f"{where}: its certificate is not signed by the pinned cluster CA ({exc.verify_message}); "
                        f"check auth_server and ca_pins") from None
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        raise JoinError(f"{where}: the join request failed ({getattr(exc, 'strerror', None) or exc}); check "
                        f"that auth_server is the auth service (host:3025) and that it is running") from None
    if status >= 400:
        raise _join_error(where, status, webapi._server_message(raw), f"{where}: HTTP {status}", token)
    try:
        doc = json.loads(raw)
    except ValueError:
        raise JoinError(f"{where}: the join answer is not JSON; check that auth_server is a Teleport v13+ auth "
                        f"service") from None
    return identity_from_certs_json(doc, key_pem, where)


# --- the entry point -----------------------------------------------------------------------------------
def join(cfg) -> ident.Identity:
    """Join with the configured token; store the identity (and token hash) durably; return it."""
    token = getattr(cfg, "token", None)
    if getattr(cfg, "join_method", "token") != "token":
        raise JoinError(f"join_method {cfg.join_method!r} is not supported; use join_method: token")
    if not token:
        raise JoinError("no join token is configured; put the token from `tctl bots add` in onboarding.token "
                        "(a value or a token file path)")
    storage = Path(cfg.storage_dir)
    if ident.token_matches(storage, token) and ident.load(storage) is not None:
        raise JoinError(f"the configured token was already used for the identity stored in {storage}; a token "
                        f"joins only once -- {_FIX_TOKEN}")
    ident.ensure_storage_dir(storage)  # fail on permissions before the token is spent
    key_pem = ident.generate_key()
    expires = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=int(cfg.credential_ttl))
    kind, addr = endpoint(cfg)
    if kind == "proxy":
        result = join_via_proxy(addr, token, key_pem, expires, cfg.ca_path, cfg.insecure)
        if cfg.ca_pins:
            check_proxy_join_pins(result.tls_ca_pems, list(cfg.ca_pins), f"the proxy {addr}")
    else:
        result = join_via_auth(addr, token, key_pem, expires, list(cfg.ca_pins or []), cfg.ca_path, cfg.insecure)
    if not result.renewable:
        log.warning("the joined identity is not marked renewable; renewals may fail")
    ident.store(storage, result, ident.token_hash(token))
    log.info("joined via %s %s: %s", kind, addr, result.describe())
    return result
