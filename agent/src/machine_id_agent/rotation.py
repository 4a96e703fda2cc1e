# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Certificate authority rotations: follow them as they happen, and recover from one the agent missed.

Following (:class:`RotationWatcher`, a thread of the long-running agent): as the bot, the agent keeps one
``WatchEvents`` stream open on the ``cert_authority`` kind (the host and user CA of its own cluster; the bot
role may read CAs without their keys). Each time a CA's rotation state changes (a new phase, a new rotation,
a rollback) it asks the agent, after :data:`DEBOUNCE` seconds, for a cycle that renews the bot identity and
every output: the renewed identity carries the CA set of the new phase (the auth server it talks to stays
trusted through ``update_servers``), the kubeconfig carries both host CAs from ``init`` on (the proxy's new
certificate is trusted when ``update_servers`` reloads it), and from ``update_clients`` on the certificates are
signed by the new user CA (still trusted after ``standby`` drops the old one). The stream breaks when Teleport
reloads its services in a phase change, and whenever the network does; after every (re)connection the state of
both CAs is read once (``TrustService.GetCertAuthority``) so that a phase passed while the stream was down is
not missed. The stream is reopened with the current identity after every renewal.

Recovering (:func:`recover_host_trust`, called by the renewal client): an agent that did not run through a
whole host CA rotation trusts only the old host CA, so the auth server's new certificate fails its check.
Trust is re-established only through a path that does not depend on the old trust:

* the proxy's web certificate, verified against ``ca_path`` or the system trust (never with ``insecure``),
  serves the cluster's host CA (``/webapi/auth/export?type=tls-host``); it is accepted when it belongs to the
  identity's cluster and has signed the certificate the auth server just presented;
* or, with no proxy to ask, ``ca_pins``: the host CA fetched from the auth server must match them (after a
  rotation the pins must be updated; the rollout writes the current ones).

Then the connection is made again (the auth server also checks the bot's certificate), and the cycle renews
the identity so that the new trust is stored. When neither path is there, ``status`` says ``untrusted`` with
the fix (re-enrolment), and the rollout re-enrols the host.

A missed **user** CA rotation cannot be recovered: the bot's certificate is signed by a CA the cluster no
longer trusts, and the server refuses the TLS handshake. When the proxy serves the user CA
(``type=tls-user``) and it did not sign the identity, and connections keep failing that way with no success
for :data:`USER_CA_GONE_AFTER` seconds (during a live rotation the proxy's export follows the active CA, so
it can name only the new one while the old one is still trusted, and reloads break connections: one failure
proves nothing), the identity is marked ``untrusted`` (never presented again) and the host needs re-enrolment.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from machine_id_agent.errors import AgentError, RenewError

log = logging.getLogger(__name__)

WATCHED = ("host", "user")
DEBOUNCE = 5.0  # seconds between seeing a phase change and renewing (lets every auth server's cache follow)
RETRY_MIN, RETRY_MAX = 2.0, 60.0  # re-watch back-off after the stream broke
TRUST_FILE = "ca-trust.json"
EXPORT_USER_CA_PATH = "/webapi/auth/export?type=tls-user"  # webapi.export_cas(addr, "tls-user")
UNTRUSTED_SERVER = "server certificate not trusted (not signed by the cluster CA"


@dataclass(frozen=True)
class CAState:
    """The rotation state of one CA, as the watch and GetCertAuthority report it."""

    ca_type: str
    state: str = ""  # "", "standby" or "in_progress"
    phase: str = ""  # "", "init", "update_clients", "update_servers", "standby", "rollback"
    mode: str = ""  # "manual" or "auto"
    rotation_id: str = ""

    @classmethod
    def from_ca(cls, ca) -> "CAState":
        rot = ca.spec.rotation
        return cls(ca.spec.type, rot.state, rot.phase, rot.mode, rot.current_id)

    def describe(self) -> str:
        if self.state == "in_progress":
            return f"{self.ca_type} CA rotation in phase {self.phase or '?'} ({self.mode or 'manual'})"
        if self.rotation_id:
            return f"{self.ca_type} CA rotated (rotation {self.rotation_id[:8]} done)"
        return f"{self.ca_type} CA never rotated"


def changed(old: Optional[CAState], new: CAState) -> bool:
    """Does ``new`` need fresh credentials compared with what was seen before? Every phase change does (each
    changes which CAs sign or are trusted, and a phase seen late still needs its renewal); the first look does
    not, unless a rotation is running (the agent may have started in the middle of it)."""
    if old is None:
        return new.state == "in_progress"
    return (old.state, old.phase, old.rotation_id) != (new.state, new.phase, new.rotation_id)


# --- the watch --------------------------------------------------------------------------------------------
class RotationWatcher:
    """Watches the cluster's host and user CAs as the bot and asks for a renewal at every rotation step.

    ``target()`` returns ``(cfg, identity, facts)`` for the connection, or None while the agent has no identity;
    ``client(cfg, identity, facts)`` makes a renewal client (``renew.AuthClient``); ``renew(reason)`` asks the
    agent for a cycle that renews the bot identity and every output."""

    def __init__(self, target: Callable[[], Optional[tuple]], client: Callable[..., Any],
                 renew: Callable[[str], None], rnd: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic):
        self._target = target
        self._client = client
        self._renew = renew
        self._rnd = rnd
        self._clock = clock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.known: Dict[str, CAState] = {}
        self.connected = False
        self.events = 0
        self.rotation_renewals = 0
        self.last_error: Optional[str] = None
        self._due: Optional[Tuple[float, str]] = None

    # -- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ca-rotation-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- decisions (no I/O)
    def see(self, st: CAState, how: str) -> None:
        """Record a CA state; schedule a renewal when it changed."""
        old = self.known.get(st.ca_type)
        self.known[st.ca_type] = st
        if not changed(old, st):
            return
        reason = st.describe() + (f" (was: {old.describe()})" if old is not None else " (found at start)")
        log.info("%s, seen by %s; renewing the bot identity and every output in %.0f s", reason, how, DEBOUNCE)
        at = self._clock() + DEBOUNCE
        if self._due is None:
            self._due = (at, reason)
        else:  # one renewal for steps seen close together, at the time the first one asked for
            self._due = (self._due[0], self._due[1] + "; " + reason)

    def tick(self) -> None:
        """Fire a scheduled renewal whose time has come."""
        if self._due is not None and self._clock() >= self._due[0]:
            reason = self._due[1]
            self._due = None
            self.rotation_renewals += 1
            self._renew(reason)

    def _wait(self, seconds: float) -> None:
        end = self._clock() + seconds
        while not self._stop.is_set():
            self.tick()
            left = end - self._clock()
            if left <= 0:
                return
            self._stop.wait(min(1.0, left))

    # -- I/O
    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            target = self._target()
            if target is None:
                self._wait(2.0)
                continue
            cfg, ident, facts = target
            fp = ident.tls_cert_pem
            try:
                self._watch_once(cfg, ident, facts, lambda: self._stop.is_set() or self._current(fp))
                failures = 0
            except AgentError as exc:
                failures += 1
                self.last_error = str(exc)
                if UNTRUSTED_SERVER in str(exc) and failures in (1, 4):
                    # the whole rotation passed while the stream was down: the cycle re-establishes trust
                    self._renew("the auth server presents a certificate of a host CA the agent does not trust yet "
                                "(a CA rotation passed while the watch was down)")
                delay = min(RETRY_MAX, RETRY_MIN * 2 ** min(failures - 1, 6)) * (0.5 + 0.5 * self._rnd())
                # an outage is logged once, not every retry; Teleport reloads briefly at every rotation phase
                level = logging.WARNING if failures == 3 else logging.DEBUG
                log.log(level, "watching the cluster's certificate authorities failed (%s); watching again in "
                        "%.0f s (a rotation is then still noticed: the CA state is read on reconnect)", exc, delay)
                self._wait(delay)
            except Exception as exc:  # a bug must not end the watch for good
                failures += 1
                self.last_error = f"internal error: {type(exc).__name__}"
                log.error("internal error in the CA rotation watch (please report it): %s: %s", type(exc).__name__,
                          str(exc).splitlines()[0] if str(exc) else "")
                log.debug("traceback", exc_info=True)
                self._wait(RETRY_MAX)
            finally:
                self.connected = False

    def _current(self, fp: bytes) -> bool:
        """True when the stream should end: the agent now holds another identity (reconnect with it)."""
        self.tick()
        t = self._target()
        return t is None or t[1].tls_cert_pem != fp

    def _watch_once(self, cfg, ident, facts, should_stop: Callable[[], bool]) -> None:
        from machine_id_agent import proto

        with self._client(cfg, ident, facts) as client:
            for ev in client.watch_cas(should_stop):
                if ev.type == proto.EVENT_INIT:
                    self.connected = True
                    self.last_error = None
                    for t in WATCHED:  # whatever happened while the stream was down
                        self.see(CAState.from_ca(client.cert_authority(t)), "a read after (re)connecting")
                    continue
                ca = ev.cert_authority
                if ev.type != proto.EVENT_PUT or ca.spec.type not in WATCHED:
                    continue
                if ca.spec.cluster_name and ca.spec.cluster_name != ident.cluster_name:
                    continue
                self.events += 1
                self.see(CAState.from_ca(ca), "the watch")
                self.tick()

    def view(self) -> Dict[str, Any]:
        return {"watching": self.connected, "events": self.events, "rotation_renewals": self.rotation_renewals,
                "cas": {t: s.describe() for t, s in sorted(self.known.items())}, "error": self.last_error}


# --- recovery from a missed host CA rotation --------------------------------------------------------------
def issuers_of(identity) -> List[bytes]:
    """The CA certificates in the identity's trust set that signed its own certificate (its user CA)."""
    from machine_id_agent import join

    return [c for c in identity.tls_ca_pems if join._signed_by(identity.tls_cert_pem, c)]


def recover_host_trust(cfg, identity, peer_der: Optional[bytes], server_name: str, proxy_addr: Optional[str]
                       ) -> Tuple[List[bytes], str]:
    """The host CA(s) to trust after a host CA rotation the agent missed, and how they were established.
    Raises RenewError (non-retryable when no safe path exists, with the fix)."""
    from machine_id_agent import join, transport, webapi
    from machine_id_agent import identity as ident

    cluster = identity.cluster_name
    problem = (f"the auth server presents a certificate signed by a host CA this agent does not trust: cluster "
               f"{cluster!r} rotated its host CA while the agent was not following (stopped, or cut off for the "
               f"whole rotation)")
    if proxy_addr and not getattr(cfg, "insecure", False):
        try:
            cas = webapi.export_host_cas(proxy_addr, ca_path=cfg.ca_path)
        except webapi.WebAPIError as exc:
            raise RenewError(f"{problem}; asking the proxy for the new host CA failed ({exc}); will retry",
                             retryable=bool(getattr(exc, "retryable", True))) from None
        mine = [c for c in cas if join._org(c) == cluster]
        try:
            transport.verify_server_cert(peer_der, mine, server_name)
        except transport.TransportError as exc:
            raise RenewError(f"{problem}; the host CA the proxy {proxy_addr} serves for {cluster!r} did not sign "
                             f"that certificate either ({exc}), so trust was not re-established; re-enrol the host "
                             f"(a new token) or check that proxy_server and the auth server belong to one cluster",
                             retryable=False) from None
        pins = join._wanted(getattr(cfg, "ca_pins", None) or [])
        how = f"the host CA served by the proxy {proxy_addr} over HTTPS verified by " + (
            f"ca_path {cfg.ca_path}" if cfg.ca_path else "the system trust store")
        if pins and not all(join._pinned(ident.spki_pin(c), pins) for c in mine):
            log.warning("ca_pins do not list the cluster's new host CA (pin %s); update them (`tctl status`, or run "
                        "the rollout), else a new join would be refused", ", ".join(ident.spki_pin(c) for c in mine))
        return mine, how
    pins = getattr(cfg, "ca_pins", None) or []
    auth = getattr(cfg, "auth_server", None)
    if pins and auth:
        try:
            cas = join.fetch_cluster_cas(auth)
        except AgentError as exc:
            raise RenewError(f"{problem}; reading the host CA from {auth} failed ({exc}); will retry") from None
        try:
            join.check_pins(cas, pins, f"the auth server {auth}")
            transport.verify_server_cert(peer_der, cas, server_name)
        except (AgentError, transport.TransportError) as exc:
            raise RenewError(f"{problem}; the host CA does not match ca_pins ({exc}). Put the pins `tctl status` "
                             f"prints now in ca_pins (the rollout does) or re-enrol the host", retryable=False) from None
        return cas, f"the host CA read from {auth} and matched against ca_pins"
    why = ("insecure: true is set, so the proxy's answer cannot be trusted" if getattr(cfg, "insecure", False)
           else "there is no proxy to ask and no ca_pins to check the auth server's CA against")
    raise RenewError(f"{problem}; it cannot re-establish that trust safely ({why}). Re-enrol the host (a new "
                     f"token; the rollout does it for hosts whose status is untrusted), or set ca_pins to the pins "
                     f"`tctl status` prints now", retryable=False, untrusted=True)


SUSPECT_FILE = "user-ca-suspect"  # fingerprint of the identity + wall time of the first such failure
USER_CA_GONE_AFTER = 90.0


def user_ca_suspect(storage_dir, identity, now: Optional[float] = None) -> float:
    """Seconds since the first failure (with no success since) that looked like a dropped user CA. Kept in the
    storage, so that restarts (systemd stops an agent that is not ready within TimeoutStartSec) do not reset it."""
    from machine_id_agent import identity as ident

    now = time.time() if now is None else now
    fp = ident.cert_fingerprint(identity.tls_cert_pem)
    try:
        raw = ident._read_storage(Path(storage_dir), SUSPECT_FILE)
        parts = raw.decode().split() if raw else []
        if len(parts) == 2 and parts[0] == fp:
            return max(0.0, now - float(parts[1]))
    except (AgentError, OSError, ValueError):
        pass
    try:
        with ident.open_storage(storage_dir) as d:
            d.write(SUSPECT_FILE, ("%s %.3f\n" % (fp, now)).encode())
    except (OSError, AgentError):
        pass
    return 0.0


def user_ca_ok(storage_dir) -> None:
    """The server accepted the identity (or the proxy still exports its signer): forget any suspicion."""
    if not os.path.lexists(os.path.join(str(storage_dir), SUSPECT_FILE)):
        return
    from machine_id_agent import identity as ident

    try:
        with ident.open_storage(storage_dir) as d:
            d.unlink(SUSPECT_FILE)
    except (OSError, AgentError):
        pass


def user_ca_gone(cfg, identity, proxy_addr: Optional[str]) -> Optional[bool]:
    """True when the proxy (verified HTTPS) serves the cluster's user CA and none of it signed the identity:
    a user CA rotation completed without the agent, and the server will never accept this identity again.
    None when that cannot be told (no proxy, insecure, or the proxy does not serve it)."""
    from machine_id_agent import join, webapi

    if not proxy_addr or getattr(cfg, "insecure", False):
        return None
    try:
        cas = webapi.export_cas(proxy_addr, "tls-user", ca_path=cfg.ca_path)
    except AgentError:
        return None
    cas = [c for c in cas if join._org(c) == identity.cluster_name]
    if not cas:
        return None
    return not any(join._signed_by(identity.tls_cert_pem, c) for c in cas)


# --- what status reads ------------------------------------------------------------------------------------
def write_trust_note(storage_dir, doc: Optional[Dict[str, Any]]) -> None:
    """Record (or, with None, clear) the trust outcome ``status`` reports: ``{"state": "recovered"|"untrusted",
    "problem": ..., "fix": ..., "how": ..., "at": ...}``. Best effort."""
    from machine_id_agent import identity as ident

    ident.write_note(storage_dir, TRUST_FILE, doc)


def clear_untrusted(storage_dir) -> None:
    """Remove an ``untrusted`` note once the auth server is trusted again (e.g. after ca_pins were updated)."""
    if not os.path.lexists(os.path.join(str(storage_dir), TRUST_FILE)):
        return
    doc = read_trust_note(storage_dir)
    if doc is None or doc.get("state") == "untrusted":
        write_trust_note(storage_dir, None)


def read_trust_note(storage_dir) -> Optional[Dict[str, Any]]:
    from machine_id_agent import identity as ident

    return ident.read_note(storage_dir, TRUST_FILE)
