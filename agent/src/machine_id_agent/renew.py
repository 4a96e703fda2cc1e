# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Renewal and Kubernetes credentials over the auth server's gRPC API (``proto.AuthService``).

One :class:`AuthClient` = one renewal cycle: it opens one connection (direct mTLS, or through the proxy's
web port with the ``teleport-auth@`` ALPN; :mod:`machine_id_agent.transport`, no local relay), and

* :meth:`AuthClient.renew_identity` calls ``GenerateUserCerts`` for the bot itself (same username, no role
  requests) with a NEW key, stores the result durably BEFORE anything uses it, then reconnects with it;
* :meth:`AuthClient.host_ca_pems` re-reads the host CA with ``GetClusterCACert`` (so a CA rotation reaches
  the outputs at the next cycle);
* :meth:`AuthClient.kube_credentials` asks for an impersonated certificate (role requests = the output's
  roles, else the bot role's ``impersonate.roles`` from ``GetRole``) routed to a Kubernetes cluster.

The public-key request fields are picked by the server's major version (``UserCertsRequest`` field 1 up
to v16; 22/23 from v17).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from machine_id_agent import grpcwire
from machine_id_agent import identity as ident
from machine_id_agent import proto, rotation, transport, webapi
from machine_id_agent.errors import LockedError, RenewError

log = logging.getLogger(__name__)

# After a renewal cut off with its answer unknown, how long Teleport's count is watched before the identity is
# presented again (the auth server's read cache must have caught up with the renewal, if it was counted).
IN_DOUBT_SETTLE = 10.0
IN_DOUBT_POLL = 0.5
_sleep = time.sleep

RPC_TIMEOUT = 30.0
_proxy_cache: Dict[str, bool] = {}


@dataclass
class KubeCredentials:
    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    host_ca_pems: List[bytes]
    not_after: _dt.datetime
    kubernetes_cluster: str = ""
    teleport_cluster: str = ""
    roles: List[str] = field(default_factory=list)
    # the SSH certificate Teleport issues with the same key: written into the destination's `identity` file, which
    # then is a Teleport identity file (key, SSH certificate, TLS certificate) like tbot's, so a kubeconfig tbot
    # wrote (`tbot kube credentials` reads that file and requires an SSH certificate in it) keeps working
    ssh_cert: bytes = b""


def _same_addr(a: str, b: str) -> bool:
    return webapi.split_addr(a) == webapi.split_addr(b)


def choose_route(cfg, facts: Optional[webapi.ProxyFacts]) -> tuple:
    """("proxy", web address) or ("auth", auth address)."""
    if getattr(cfg, "proxy_server", None):
        return "proxy", facts.web_addr if facts else cfg.proxy_server
    addr = getattr(cfg, "auth_server", None)
    if not addr:
        raise RenewError("the config names no server; set proxy_server or auth_server", retryable=False)
    if facts is not None and _same_addr(facts.web_addr, addr):
        return "proxy", addr
    if addr not in _proxy_cache:
        from machine_id_agent.join import probe_proxy

        found = probe_proxy(addr, getattr(cfg, "ca_path", None), getattr(cfg, "insecure", False))
        if found is None:  # nothing answered: guess like tbot, and ask again next cycle
            return ("proxy" if webapi.split_addr(addr, 3025)[1] in (443, 3080) else "auth"), addr
        _proxy_cache[addr] = found
    return ("proxy" if _proxy_cache[addr] else "auth"), addr


def locked_explanation(bot: str, detail: str, storage_dir) -> str:
    return (f"Teleport locked bot {bot!r} ({detail}). Teleport does this when a certificate of an older "
            f"generation is presented for renewal: a second agent (or a copy of {storage_dir}) renewed the same "
            f"identity, or the storage directory was restored from a backup; only one agent may use a bot "
            f"identity. Retrying cannot help: an admin must remove the lock (`tctl get locks`, then "
            f"`tctl rm lock/<name>`); the agent that holds the newest identity then renews again, while a stale "
            f"copy never can (give that host its own bot: `tctl bots add <other-name> --roles=...`)")


def lost_renewal_explanation(old, counted, storage_dir) -> str:
    ahead = f"Teleport counts generation {counted}" if counted is not None else "Teleport counts a newer generation"
    return (f"the bot identity in {storage_dir} lost a renewal: it holds generation {old.generation} of bot "
            f"{old.bot_name!r} but {ahead} (a renewal Teleport issued never reached the disk: the agent was "
            f"killed or the machine lost power in between). It is not presented, because that would lock the "
            f"bot; it still serves the outputs until it expires at {old.not_after.isoformat()}. The host needs "
            f"re-enrolment: a new token (`tctl bots rm {old.bot_name}` then `tctl bots add {old.bot_name} "
            f"--roles=...`) in the config, or a rollout that re-enrols it")


def untrusted_explanation(old, storage_dir) -> str:
    return (f"the bot identity in {storage_dir} (bot {old.bot_name!r}) is signed by a user CA that cluster "
            f"{old.cluster_name!r} no longer trusts: a user CA rotation completed while the agent was stopped or "
            f"cut off, and Teleport refuses this certificate for good. The outputs work until they expire. The host "
            f"needs re-enrolment: a new token (`tctl bots rm {old.bot_name}` then `tctl bots add {old.bot_name} "
            f"--roles=...`) in the config, or a rollout that re-enrols it (its status is untrusted)")


class AuthClient:
    """A connection to the auth server's gRPC API as the bot, for one renewal cycle."""

    def __init__(self, cfg, identity: ident.Identity, facts: Optional[webapi.ProxyFacts] = None,
                 prefer: Optional[str] = None):
        """``prefer`` is accepted for compatibility and ignored: the proxy route is always its web port with
        the teleport-auth@ ALPN (v13 routes it in both listener modes; docs/protocol-findings.md)."""
        self.prefer = prefer
        self.cfg = cfg
        self.identity = identity
        self.facts = facts
        self._conn: Optional[transport.Connection] = None
        self._server_version: Optional[str] = facts.server_version if facts and facts.server_version else None
        self._default_roles: Optional[List[str]] = None
        self._ping_resp = None
        self.trust_recovered: Optional[str] = None
        self.route = choose_route(cfg, facts)

    # -- plumbing ------------------------------------------------------------------------------------
    def __enter__(self) -> "AuthClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _open(self) -> transport.Connection:
        idt = self.identity
        now = _dt.datetime.now(_dt.timezone.utc)
        if now >= idt.not_after:
            raise RenewError(
                f"the bot identity in {self.cfg.storage_dir} expired at {idt.not_after.isoformat()} and cannot be "
                f"renewed; a fresh join is needed: create a new token with `tctl bots add {idt.bot_name} ...` "
                f"(after `tctl bots rm {idt.bot_name}`) and put it in the config", retryable=False, needs_token=True)
        kind, addr = self.route
        if kind == "proxy":
            return transport.via_proxy_alpn(addr, idt.cluster_name, idt.tls_cert_pem, idt.key_pem, idt.tls_ca_pems)
        return transport.direct(addr, idt.cluster_name, idt.tls_cert_pem, idt.key_pem, idt.tls_ca_pems)

    def _connection(self) -> transport.Connection:
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _proxy_addr(self) -> Optional[str]:
        """The proxy's web address, when one is known (the route, or the proxy the auth server names)."""
        if self.route[0] == "proxy":
            return self.route[1]
        return self.facts.web_addr if self.facts is not None and getattr(self.facts, "web_addr", None) else None

    def _call(self, method: str, request, what: str):
        conn = self._connection()
        _req_t, resp_t = proto.SIGNATURES[method]
        try:
            raw = conn.call(proto.METHODS[method], request.SerializeToString(), RPC_TIMEOUT)
        except grpcwire.RpcError as exc:
            if exc.transport and exc.details.startswith(rotation.UNTRUSTED_SERVER) and self.trust_recovered is None:
                self._recover_trust(conn)
                return self._call(method, request, what)
            if exc.transport and conn.channel.peer_cert_der is not None and exc.code == grpcwire.UNAVAILABLE:
                self._check_user_ca(exc)  # the server refused our certificate after the handshake?
            raise self._error(exc, what, conn) from None
        rotation.user_ca_ok(self.cfg.storage_dir)  # the server took the identity: no doubt about its user CA
        try:
            return resp_t.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise RenewError(f"{what}: {conn.describe} sent an answer that is not a {method} response "
                             f"({exc.__class__.__name__}); will retry", retryable=True) from None

    # -- CA rotations (machine_id_agent.rotation) ----------------------------------------------------
    def _recover_trust(self, conn: transport.Connection) -> None:
        """The auth server's certificate is signed by a host CA the identity does not trust: a missed host CA
        rotation. Re-establish trust (rotation.recover_host_trust) and reconnect with it; the caller's cycle
        then renews, which stores the new trust. RenewError when that cannot be done safely."""
        idt = self.identity
        storage = self.cfg.storage_dir
        try:
            host_cas, how = rotation.recover_host_trust(self.cfg, idt, conn.channel.peer_cert_der,
                                                        conn.channel.server_name, self._proxy_addr())
        except RenewError as exc:
            if not exc.retryable:
                rotation.write_trust_note(storage, {
                    "state": "untrusted", "problem": str(exc),
                    "fix": "re-enrol the host (the rollout does it for hosts whose status is untrusted), or put the "
                           "pins `tctl status` prints now in ca_pins"})
            raise
        self.close()
        keep = rotation.issuers_of(idt)
        self.identity = dataclasses.replace(idt, tls_ca_pems=keep + [c for c in host_cas if c not in keep])
        self.trust_recovered = how
        log.warning("the cluster's host CA changed while the agent was not following it (a missed rotation); "
                    "trust in the auth server re-established through %s; renewing to store it", how)
        rotation.write_trust_note(storage, {"state": "recovered", "how": how,
                                            "problem": "missed a host CA rotation"})

    def _check_user_ca(self, exc: grpcwire.RpcError) -> None:
        """After the server's certificate checked out, the connection broke: if the proxy shows that the
        cluster's user CA no longer includes the one that signed this identity (a user CA rotation completed
        without the agent), the identity can never be used again: mark it and say so."""
        idt = self.identity
        if rotation.user_ca_gone(self.cfg, idt, self._proxy_addr()) is not True:
            rotation.user_ca_ok(self.cfg.storage_dir)
            return
        waited = rotation.user_ca_suspect(self.cfg.storage_dir, idt)
        if waited < rotation.USER_CA_GONE_AFTER:
            # During a live user CA rotation (update_clients .. update_servers) the proxy's export follows the
            # active CA (seen on the bed for the host CA), so it can name only the new one while the old one is
            # still trusted, and Teleport's reloads break connections: one failure is no proof. Only failures
            # with no success in between for USER_CA_GONE_AFTER seconds are.
            raise RenewError(f"cannot reach the auth server with the bot identity ({exc.details}), and the proxy no "
                             f"longer exports the user CA that signed it: a user CA rotation may have dropped it; "
                             f"checking again (it is given up after {rotation.USER_CA_GONE_AFTER:.0f} s of such "
                             f"failures, {waited:.0f} s so far); will retry", retryable=True,
                             retry_after=max(1.0, rotation.USER_CA_GONE_AFTER - waited + 1.0))
        storage = Path(self.cfg.storage_dir)
        ident.mark_stale(storage, idt, ident.STALE_UNTRUSTED)
        raise LockedError(untrusted_explanation(idt, storage), untrusted=True)

    def ensure_trust(self) -> Optional[str]:
        """One cheap call (Ping) that re-establishes trust after a missed host CA rotation when needed; returns
        how trust was recovered in this client, or None."""
        self._ping()
        return self.trust_recovered

    def cert_authority(self, ca_type: str):
        """The cluster's ``ca_type`` CA without keys (TrustService.GetCertAuthority; the bot role may read it)."""
        req = proto.GetCertAuthorityRequest(type=ca_type, domain=self.identity.cluster_name)
        return self._call("GetCertAuthority", req, f"read the {ca_type} CA")

    def watch_cas(self, should_stop) -> Iterator:
        """``proto.Event`` messages of the cluster's host and user CAs (WatchEvents, its own connection) until
        ``should_stop()`` or the stream breaks (RenewError)."""
        conn = self._open()
        req = proto.ca_watch(self.identity.cluster_name, rotation.WATCHED).SerializeToString()
        try:
            for raw in conn.channel.stream(proto.METHODS["WatchEvents"], req, should_stop):
                yield proto.Event.FromString(raw)
        except grpcwire.RpcError as exc:
            raise self._error(exc, "watch the cluster's certificate authorities", conn) from None
        finally:
            conn.close()

    def _error(self, exc: grpcwire.RpcError, what: str, conn: transport.Connection) -> RenewError:
        code = exc.code
        details = exc.details or ""
        low = details.lower()
        bot = self.identity.bot_name
        if not exc.transport and ("generation mismatch" in low or ("lock targeting" in low and "in force" in low)):
            return LockedError(locked_explanation(bot, details.splitlines()[0] if details else "locked",
                                                  self.cfg.storage_dir))
        where = conn.describe
        if code in (grpcwire.UNAVAILABLE, grpcwire.DEADLINE_EXCEEDED, grpcwire.CANCELLED):
            reason = details or exc.code_name
            hint = ""
            if self.route[0] == "proxy" and "closed the connection during the TLS handshake" in reason:
                hint = ("; if this proxy does not route the teleport-auth@ ALPN (e.g. it sits behind an L7 load "
                        "balancer), set auth_server to the auth service address (host:3025)")
            return RenewError(f"{what}: cannot reach {where} ({reason}){hint}; will retry", retryable=True)
        if code in (grpcwire.PERMISSION_DENIED, grpcwire.UNAUTHENTICATED):
            # Teleport v13 answers a locked user's calls with a bare "access denied".
            return RenewError(f"{what}: {where} denied it ({details}); the bot may be locked (check `tctl get "
                              f"locks`; a generation mismatch locks it) or its roles do not allow this (check "
                              f"`tctl get role/bot-{bot}` and `tctl bots ls`)", retryable=False)
        if code == grpcwire.INVALID_ARGUMENT:
            return RenewError(f"{what}: {where} rejected the request ({details}); check the config (kubernetes_cluster "
                              f"as `tctl kube ls` shows it, roles)", retryable=False)
        if code == grpcwire.NOT_FOUND:
            return RenewError(f"{what}: {where} answered not found ({details}); check the names in the config "
                              f"(kubernetes_cluster as `tctl kube ls` shows it, roles)", retryable=False)
        return RenewError(f"{what}: {where} failed ({exc.code_name}: {details})", retryable=True)

    # -- facts ---------------------------------------------------------------------------------------
    def _ping(self):
        if self._ping_resp is None:
            self._ping_resp = self._call("Ping", proto.PingRequest(), "ping the auth server")
        return self._ping_resp

    @property
    def server_version(self) -> str:
        if self._server_version is None:
            self._server_version = self._ping().server_version
        return self._server_version

    def proxy_public_addr(self) -> Optional[str]:
        """The proxy's public address as the auth server knows it (gRPC Ping ``ProxyPublicAddr``)."""
        return self._ping().proxy_public_addr or None

    @property
    def server_major(self) -> Optional[int]:
        return webapi.version_major(self.server_version)

    def default_roles(self) -> List[str]:
        """The bot role's ``allow.impersonate.roles`` (role ``bot-<name>``)."""
        if self._default_roles is None:
            name = self.identity.username
            role = self._call("GetRole", proto.GetRoleRequest(name=name), f"read role {name}")
            self._default_roles = proto.impersonate_roles(role)
        return list(self._default_roles)

    def host_ca_pems(self) -> List[bytes]:
        """The cluster's current host CA certificates (GetClusterCACert), re-read on every call."""
        resp = self._call("GetClusterCACert", proto.Empty(), "read the cluster host CA")
        cas = ident.split_pems(resp.tls_ca)
        if not cas:
            raise RenewError("read the cluster host CA: the auth server returned none; will retry", retryable=True)
        return cas

    # -- certificates --------------------------------------------------------------------------------
    def _user_certs(self, key_pem: bytes, expires: _dt.datetime, what: str, **kw):
        req = proto.user_certs_request(username=self.identity.username, expires=expires,
                                       ssh_public_key=ident.ssh_public_key(key_pem),
                                       tls_public_key=ident.tls_public_key(key_pem),
                                       server_major=self.server_major, **kw)
        return self._call("GenerateUserCerts", req, what)

    def bot_generation(self) -> Optional[int]:
        """The generation Teleport counts for this bot now (label ``teleport.internal/bot-generation`` of
        user ``bot-<name>``, read with GetUser: v13 lets a user read itself). None when there is no label."""
        name = self.identity.username
        user = self._call("GetUser", proto.GetUserRequest(name=name), f"read user {name}")
        v = proto.user_label(user, proto.BOT_GENERATION_LABEL)
        try:
            return int(v) if v else None
        except ValueError:
            return None

    def _check_generation(self, old: ident.Identity, storage: Path) -> None:
        """Refuse to present ``old`` when Teleport already counts a newer generation (LockedError, lost
        renewal). GetUser is answered from the auth server's read cache, which follows the backend's event
        stream (v13 with sqlite: polled every second), so right after a renewal it can still show the previous
        count. A count BEHIND the stored identity is that lag. A count EQUAL to it is trusted, except when the
        last renewal of this very identity was cut off with its answer unknown (the agent was killed or the
        connection dropped while it was in flight): then the cache may not show that renewal yet, so the count
        is read again until IN_DOUBT_SETTLE seconds have passed, and only a count that stays equal lets the
        identity be presented."""
        noticed = ident.renewal_in_doubt(storage, old)
        in_doubt = noticed is not None
        # counted from when the doubt was first noticed (the kill came before that), across restarts
        deadline = ident.monotonic() + max(0.0, (noticed or 0.0) + IN_DOUBT_SETTLE - time.time())
        if in_doubt:
            log.warning("the last renewal of bot %r (generation %s) was cut off before its answer reached %s "
                        "(the agent stopped or the connection dropped); reading Teleport's count until %.0f s after "
                        "that was first noticed before presenting the identity again", old.bot_name, old.generation,
                        storage, IN_DOUBT_SETTLE)
        while True:
            try:
                counted = self.bot_generation()
            except LockedError:
                raise
            except RenewError as exc:
                if exc.retryable:
                    raise
                # a server that does not let the bot read itself: renew without the check (as tbot does)
                log.warning("cannot read the generation Teleport counts for bot %r (%s); renewing without that "
                            "check", old.bot_name, exc)
                return
            if counted is not None and counted > old.generation:
                ident.mark_stale(storage, old, ident.STALE_LOST)
                raise LockedError(lost_renewal_explanation(old, counted, storage), lost_renewal=True)
            if counted is not None and counted < old.generation:
                log.debug("Teleport's cache still counts generation %s for bot %r (stored: %s)",
                          counted, old.bot_name, old.generation)
            if not in_doubt or ident.monotonic() >= deadline:
                break
            _sleep(IN_DOUBT_POLL)
        if in_doubt:
            log.info("Teleport did not count the cut-off renewal of bot %r: renewing generation %s", old.bot_name,
                     old.generation)
            ident.clear_in_flight(storage)

    def renew_identity(self, ttl: int, check_generation: bool = True) -> ident.Identity:
        """Renew the bot's identity with a fresh key; it is on disk before this returns.

        Order, to keep the time between Teleport counting the renewal and the renewal being on disk short:
        the key, the request, the token hash and a storage reservation (temp file with its blocks allocated)
        are all ready BEFORE the call; the answer's bytes are written into the reservation and renamed into
        place before any certificate is parsed or checked; fsyncs follow. ``self.timings`` records the
        round trip and that window. If the storage refuses the write anyway, the client still switches to
        the new identity and UnsavedIdentityError (carrying it) is raised: the caller keeps it in memory.

        ``check_generation``: first read the generation Teleport counts for the bot; when it is ahead of the
        stored identity (a renewal the server counted never reached the disk) the identity is NOT presented,
        because that would lock the bot: LockedError saying the host needs re-enrolment."""
        old = self.identity
        storage = Path(self.cfg.storage_dir)
        reason = ident.stale_reason(storage, old)
        if reason == ident.STALE_LOST:
            raise LockedError(lost_renewal_explanation(old, None, storage), lost_renewal=True)
        if reason == ident.STALE_UNTRUSTED:
            raise LockedError(untrusted_explanation(old, storage), untrusted=True)
        if reason is not None:
            raise LockedError(
                f"the bot identity in {storage} (bot {old.bot_name!r}, generation {old.generation}) was refused by "
                f"Teleport as an old generation and is never presented again, because each attempt locks the bot "
                f"anew; this host needs its own bot: create one with `tctl bots add <name> --roles=...` and put the "
                f"new token in the config")
        major = self.server_major  # resolve before the renewal so nothing else runs in between
        if check_generation and old.generation is not None:
            self._check_generation(old, storage)
        key_pem = ident.generate_key()
        expires = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=int(ttl))
        req = proto.user_certs_request(username=old.username, expires=expires,
                                       ssh_public_key=ident.ssh_public_key(key_pem),
                                       tls_public_key=ident.tls_public_key(key_pem), server_major=major)
        # the hash goes into the new identity; StorageError (nothing asked) when it cannot be read for sure
        token_hash = ident.stored_token_hash(storage, required=True)
        reservation = ident.Reservation(storage)  # StorageError here: nothing asked, nothing lost
        try:
            ident.mark_in_flight(storage, old)  # from here until the answer is on disk, the outcome is in doubt
            t0 = ident.monotonic()
            try:
                certs = self._call("GenerateUserCerts", req, f"renew bot {old.bot_name!r}")
            except LockedError as exc:
                if "generation mismatch" in str(exc):
                    ident.mark_stale(storage, old)
                raise
            t1 = ident.monotonic()
            data = ident.doc_bytes(key_pem, certs.ssh, certs.tls, list(certs.tls_ca_certs),
                                   list(certs.ssh_ca_certs), token_hash)
            stored_err = None
            try:
                marks = reservation.commit(data)
            except OSError as exc:
                stored_err, marks = exc, {}
            else:
                ident.clear_in_flight(storage)
        finally:
            reservation.abort()
        self.timings = {"rpc": t1 - t0, "visible": marks.get("visible", t1) - t1,
                        "durable": marks.get("durable", t1) - t1}
        try:
            new = ident.Identity.from_certs(key_pem, certs.ssh, certs.tls, list(certs.tls_ca_certs),
                                            list(certs.ssh_ca_certs))
        except ident.IdentityError as exc:
            raise RenewError(f"renew bot {old.bot_name!r}: {exc}", retryable=True) from None
        if not ident.cert_key_matches(new.tls_cert_pem, key_pem):
            raise RenewError(f"renew bot {old.bot_name!r}: the server returned a certificate for another key",
                             retryable=True)
        if old.generation is not None and new.generation is not None and new.generation != old.generation + 1:
            log.warning("renewal returned generation %s after %s", new.generation, old.generation)
        self.close()  # later calls in this cycle present the new identity
        self.identity = new
        if stored_err is not None:
            raise ident.UnsavedIdentityError(
                f"renewed bot {old.bot_name!r} but cannot write it to {storage} ({stored_err.strerror or stored_err});"
                f" the agent keeps it in memory and retries every cycle: free space or fix the permissions of "
                f"{storage}", new, token_hash)
        log.info("renewed %s (server v%s; round trip %.1f ms, answer to disk %.2f ms, to fsync %.1f ms)",
                 new.describe(), major, self.timings["rpc"] * 1e3, self.timings["visible"] * 1e3,
                 self.timings["durable"] * 1e3)
        return new

    def _impersonated(self, roles: Optional[List[str]], seconds: int, what, **route):
        """A new key and an impersonated certificate for ``roles`` (the output's, else the bot's impersonate roles),
        valid ``seconds``, requested over the bot's connection: (key_pem, certs, roles used). ``what`` is a text,
        or a function of the roles used giving one."""
        idt = self.identity
        use_roles = list(roles) if roles else self.default_roles()
        if not use_roles:
            raise RenewError(f"bot {idt.bot_name!r} may impersonate no role (role bot-{idt.bot_name} has no "
                             f"impersonate.roles); add roles with `tctl bots add --roles=...` or set the output's "
                             f"roles", retryable=False)
        what = what(use_roles) if callable(what) else what
        key_pem = ident.generate_key()
        expires = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=int(seconds))
        certs = self._user_certs(key_pem, expires, what, route_to_cluster=idt.cluster_name, role_requests=use_roles,
                                 use_role_requests=True, **route)
        if not certs.tls:
            raise RenewError(f"{what}: the server returned no TLS certificate; will retry", retryable=True)
        return key_pem, certs, use_roles

    def kube_credentials(self, kubernetes_cluster: str, roles: Optional[List[str]], ttl: int,
                         host_cas: Optional[List[bytes]] = None) -> KubeCredentials:
        """An impersonated certificate for ``roles`` routed to ``kubernetes_cluster`` (new key), plus the host CA."""
        idt = self.identity
        key_pem, certs, use_roles = self._impersonated(
            roles, ttl, f"kubernetes credentials for cluster {kubernetes_cluster!r}",
            kubernetes_cluster=kubernetes_cluster)
        host_cas = list(host_cas) if host_cas else self.host_ca_pems()
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(certs.tls)
        return KubeCredentials(key_pem=key_pem, cert_pem=certs.tls, host_ca_pems=host_cas,
                               not_after=ident.cert_not_after(cert), kubernetes_cluster=kubernetes_cluster,
                               teleport_cluster=idt.cluster_name, roles=use_roles, ssh_cert=certs.ssh or b"")

    # -- kubernetes/v2: the clusters the output's roles may access ---------------------------------------
    def kube_clusters(self, roles: Optional[List[str]], ttl: int) -> Dict[str, Dict[str, str]]:
        """{name: labels} of the Kubernetes clusters the impersonated ``roles`` may access.

        The bot's own role sees no Kubernetes cluster, so (as the newest tbot does) an impersonated certificate
        for the roles, routed to no cluster, is requested over the bot's connection and ListResources(kube_server)
        is called with it on a connection of its own (an impersonated certificate can list, but cannot request
        more certificates). Seen on the v13 bed: docs/protocol-findings.md section 10."""
        idt = self.identity

        def label(used):
            return "list the Kubernetes clusters of roles %s" % ", ".join(used)

        # only used for the listing below: a short life is enough
        key_pem, certs, use_roles = self._impersonated(roles, min(int(ttl), 600), label)
        what = label(use_roles)
        kind, addr = self.route
        if kind == "proxy":
            conn = transport.via_proxy_alpn(addr, idt.cluster_name, certs.tls, key_pem, idt.tls_ca_pems)
        else:
            conn = transport.direct(addr, idt.cluster_name, certs.tls, key_pem, idt.tls_ca_pems)
        found: Dict[str, Dict[str, str]] = {}
        try:
            start_key = ""
            for _page in range(1000):
                req = proto.ListResourcesRequest(resource_type="kube_server", namespace="default", limit=100,
                                                 start_key=start_key)
                try:
                    raw = conn.call(proto.METHODS["ListResources"], req.SerializeToString(), RPC_TIMEOUT)
                except grpcwire.RpcError as exc:
                    raise self._error(exc, what, conn) from None
                try:
                    resp = proto.ListResourcesResponse.FromString(raw)
                except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
                    raise RenewError(f"{what}: {conn.describe} sent an answer that is not a ListResources response "
                                     f"({exc.__class__.__name__}); will retry", retryable=True) from None
                for name, labels in proto.kube_clusters(resp).items():
                    found.setdefault(name, labels)
                start_key = resp.next_key
                if not start_key:
                    break
        finally:
            conn.close()
        return found

    def kube_credentials_for(self, clusters: List[str], roles: Optional[List[str]],
                             ttl: int) -> Dict[str, KubeCredentials]:
        """One certificate per cluster (Teleport v13 routes a Kubernetes request by the certificate's
        KubernetesCluster attribute, so a certificate serves exactly one cluster), all with the same host CA."""
        out: Dict[str, KubeCredentials] = {}
        host_cas: Optional[List[bytes]] = None
        for name in clusters:
            creds = self.kube_credentials(name, roles, ttl, host_cas=host_cas)
            host_cas = creds.host_ca_pems
            out[name] = creds
        return out
