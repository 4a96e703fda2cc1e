# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Joining the cluster with a one-time bot token (``join_method: token``).

Two routes, as tbot v13 has them:

* **through the proxy**: ``POST /v1/webapi/host/credentials`` (JSON ``RegisterUsingTokenRequest``) over
  the proxy's HTTPS, verified against ``ca_path`` or the system trust (only ``insecure: true`` skips that,
  with a warning). When ``ca_pins`` are set, the cluster's host CA is first read from the proxy
  (``GET /webapi/auth/export?type=tls-host``, no authentication) and must match a pin, else the token is
  not sent: the proxy belongs to another cluster (or the pin is wrong). Pins cannot stop a proxy that
  relays; on this route the web certificate is what protects the token;
* **directly to auth**: an unverified TLS connection (SNI ``teleport.cluster.local``, ALPN ``h2``) calls
  gRPC ``GetClusterCACert``; every returned CA certificate must match a configured pin
  (``sha256:<hex SPKI>``) and be currently valid; then ``POST /v2/tokens/register`` goes over TLS verified
  against those CAs (ALPN ``http/1.1``).

After the join, on both routes, when ``ca_pins`` are set (:func:`check_joined_cas`): every returned TLS CA
must match a pin, except the one CA that signed the bot's new certificate (the cluster's user CA, which
``tctl status`` does not print); that one is checked by its signature and cluster name and is not kept as a
trust anchor for servers. Any other unpinned CA refuses the identity, and nothing is stored.

The new identity is stored durably (with the token hash) BEFORE :func:`join` returns, so a crash right
after a join never loses the identity that consumed the one-time token. A token whose hash equals the
stored one is never sent a second time.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hmac
import http.client
import json
import logging
import socket
import ssl
from pathlib import Path
from typing import List, Optional

from machine_id_agent import grpcwire
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
                         f"once per bot); {_FIX_TOKEN}", needs_token=True)
    if "expired or not found" in low or "not found" in low and "token" in low:
        return JoinError(f"{where} refused the join token: it is used, expired or unknown ({msg}); {_FIX_TOKEN}",
                         needs_token=True)
    if status is not None and 400 <= status < 500:
        return JoinError(f"{where} refused the join (HTTP {status}: {msg or 'no message'}); {_FIX_TOKEN}")
    return JoinError(_redact(full, token) + "; the join can be retried")


# --- directly to auth ----------------------------------------------------------------------------------
def fetch_cluster_cas(auth_addr: str, timeout: float = 15) -> List[bytes]:
    """GetClusterCACert over unverified TLS (the pins make it trustworthy)."""
    conn = transport.insecure_bootstrap(auth_addr)
    req_t, resp_t = proto.SIGNATURES["GetClusterCACert"]
    try:
        resp = resp_t.FromString(conn.call(proto.METHODS["GetClusterCACert"], req_t().SerializeToString(), timeout))
    except grpcwire.RpcError as exc:
        detail = exc.details if exc.transport else f"{exc.code_name}: {exc.details}"
        raise JoinError(f"the auth server {auth_addr}: cannot fetch the cluster CA for the pin check ({detail}); "
                        f"check that auth_server is the auth service (host:3025) and that it is running") from None
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError: not a Teleport auth server
        raise JoinError(f"the auth server {auth_addr}: its GetClusterCACert answer is not valid "
                        f"({exc.__class__.__name__}); check that auth_server is a Teleport auth service") from None
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
                            f"ca_pins; the join token was not sent. Check the pin with `tctl status` (CA pin) and "
                            f"update ca_pins (during a host CA rotation it prints two pins: configure both) -- if "
                            f"it did not change, this is another cluster or someone is intercepting the connection")
        cert = x509.load_pem_x509_certificate(pem)
        if not ident.cert_not_before(cert) <= now < ident.cert_not_after(cert):
            raise JoinError(f"{where}: the cluster CA certificate with pin {got} is not valid now (valid "
                            f"{ident.cert_not_before(cert).isoformat()} to {ident.cert_not_after(cert).isoformat()}); "
                            f"check the clock of this host")


def _wanted(pins: List[str]) -> List[str]:
    return [p.strip().lower() for p in pins if p and p.strip()]


def _pinned(pin: str, wanted: List[str]) -> bool:
    return any(hmac.compare_digest(pin, w) for w in wanted)


def check_proxy_cluster(addr: str, pins: List[str], ca_path: Optional[Path] = None, insecure: bool = False,
                        timeout: float = 10, now: Optional[_dt.datetime] = None) -> List[bytes]:
    """Before the token goes to a proxy: its cluster's host CA (``/webapi/auth/export?type=tls-host``) must
    match ``ca_pins`` and be valid now. Returns the host CA certificates; JoinError when not."""
    from cryptography import x509

    where = f"the proxy {addr}"
    try:
        cas = webapi.export_host_cas(addr, ca_path=ca_path, insecure=insecure, timeout=timeout)
    except webapi.WebAPIError as exc:
        raise JoinError(f"{exc}; the join token was not sent (with ca_pins set, the cluster's host CA is checked "
                        f"first)") from None
    wanted = _wanted(pins)
    got = [ident.spki_pin(c) for c in cas]
    bad = [g for g in got if not _pinned(g, wanted)]
    if bad:
        raise JoinError(f"{where}: its cluster's host CA has pin {', '.join(bad)}, which matches none of the "
                        f"configured ca_pins, so this proxy belongs to another cluster or the pin is wrong; the "
                        f"join token was not sent. Run `tctl status` on the cluster you mean to join and put its "
                        f"CA pin in ca_pins, or point the config at that cluster's proxy")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    for pem, pin in zip(cas, got):
        cert = x509.load_pem_x509_certificate(pem)
        if not ident.cert_not_before(cert) <= now < ident.cert_not_after(cert):
            raise JoinError(f"{where}: the cluster host CA with pin {pin} is not valid now (valid "
                            f"{ident.cert_not_before(cert).isoformat()} to {ident.cert_not_after(cert).isoformat()}); "
                            f"the join token was not sent; check the clock of this host")
    return cas


def _signed_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    """Is ``cert_pem`` issued by ``ca_pem`` (issuer name and signature)?"""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    leaf = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    if leaf.issuer != ca.subject:
        return False
    pub = ca.public_key()
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), leaf.signature_hash_algorithm)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
        elif isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(leaf.signature, leaf.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _org(pem: bytes) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    orgs = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(orgs[0].value) if orgs else ""


def check_joined_cas(result: ident.Identity, pins: List[str], where: str) -> ident.Identity:
    """The TLS CA set a join returned, when ``ca_pins`` are configured (both routes). Returns the identity
    to store; raises JoinError (nothing is stored then).

    * every CA that did not sign the bot's new certificate must match a pin: these are the host CAs (one,
      or two during a host CA rotation -- then both pins must be configured);
    * the CA that signed it (the cluster's user CA; ``tctl status`` prints no pin for it) is accepted by its
      signature on the certificate for our key and its cluster name (that of the pinned host CA); unless it
      is pinned too, it is dropped from the stored trust set, so that no unpinned CA ever authenticates a
      server to the agent;
    * at least one returned CA must match a pin.
    """
    from cryptography import x509

    wanted = _wanted(pins)
    cas = list(result.tls_ca_pems)
    for c in cas:
        try:
            x509.load_pem_x509_certificate(c)
        except ValueError:
            raise JoinError(f"{where}: the join answer holds a CA certificate that does not parse; the identity "
                            f"was refused and not stored -- check that the address is the cluster's proxy or auth "
                            f"service, then {_FIX_TOKEN}") from None
    issuers = [c for c in cas if _signed_by(result.tls_cert_pem, c)]
    if not issuers:
        raise JoinError(f"{where}: the bot certificate it issued is signed by none of the CA certificates it "
                        f"returned, so the answer is not a Teleport join answer; the identity was refused and not "
                        f"stored -- check that the address is the cluster's proxy or auth service")
    pinned = [c for c in cas if _pinned(ident.spki_pin(c), wanted)]
    if not pinned:
        got = ", ".join(ident.spki_pin(c) for c in cas)
        raise JoinError(f"{where}: none of the CA certificates it returned ({got}) matches the configured ca_pins, "
                        f"so the server belongs to another cluster or the pin is wrong; the identity was refused "
                        f"and not stored. Check the pin with `tctl status` (CA pin), then {_FIX_TOKEN}")
    stray = [c for c in cas if c not in pinned and c not in issuers]
    if stray:
        desc = "; ".join(f"pin {ident.spki_pin(c)}, organization {_org(c) or '-'}" for c in stray)
        raise JoinError(f"{where}: the join answer holds a CA certificate that matches none of the configured "
                        f"ca_pins ({desc}); the identity was refused and not stored, and the token is spent. If "
                        f"the cluster is rotating its host CA, put both CA pins that `tctl status` prints in "
                        f"ca_pins; if it is rotating its user CA, join after the rotation or pin the user CAs too; "
                        f"otherwise something between this host and the cluster changed the answer. Then "
                        f"{_FIX_TOKEN}")
    clusters = {_org(c) for c in pinned}
    for c in issuers:
        if c not in pinned and _org(c) not in clusters:
            raise JoinError(f"{where}: the bot certificate is signed by a CA of cluster {_org(c)!r}, but the "
                            f"pinned host CA belongs to {', '.join(sorted(clusters))!r}; the identity was refused "
                            f"and not stored -- check the address and ca_pins, then {_FIX_TOKEN}")
    kept = [c for c in cas if c in pinned]
    return dataclasses.replace(result, tls_ca_pems=kept)


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
        log.warning("insecure: true and neither ca_pins nor ca_path: the auth server %s is NOT verified and the "
                    "join token is sent to whatever answers there; set ca_pins (the CA pin from `tctl status`) "
                    "and remove insecure", addr)
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
                        "(a value or a token file path)", needs_token=True)
    storage = Path(cfg.storage_dir)
    if ident.token_matches(storage, token) and ident.load(storage) is not None:
        raise JoinError(f"the configured token was already used for the identity stored in {storage}; a token "
                        f"joins only once -- {_FIX_TOKEN}", needs_token=True)
    ident.ensure_storage_dir(storage)  # fail on permissions before the token is spent
    key_pem = ident.generate_key()
    expires = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=int(cfg.credential_ttl))
    kind, addr = endpoint(cfg)
    pins = list(cfg.ca_pins or [])
    if kind == "proxy":
        where = f"the proxy {addr}"
        if cfg.insecure:
            log.warning("insecure: true: the HTTPS certificate of the proxy %s is NOT verified, so the join token "
                        "is sent over a connection anyone on the path can read%s; set ca_path to the CA that "
                        "signed the proxy's certificate and remove insecure", addr,
                        " (ca_pins still refuse a proxy of another cluster, not an interceptor)" if pins else "")
        if pins:
            check_proxy_cluster(addr, pins, cfg.ca_path, cfg.insecure)
        result = join_via_proxy(addr, token, key_pem, expires, cfg.ca_path, cfg.insecure)
    else:
        where = f"the auth server {addr}"
        result = join_via_auth(addr, token, key_pem, expires, pins, cfg.ca_path, cfg.insecure)
    if pins:
        result = check_joined_cas(result, pins, where)
    if not result.renewable:
        log.warning("the joined identity is not marked renewable; renewals may fail")
    ident.store(storage, result, ident.token_hash(token))
    log.info("joined via %s %s: %s", kind, addr, result.describe())
    return result
