# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The renewal loop: join or renew the bot identity, write every Kubernetes output, repeat.

One cycle: load the stored identity (or the one kept in memory because the storage refused it); join (again)
when there is none, it expired, or the token configured now (a token file is read at this moment) hashes
differently from the stored one; ping the proxy; renew the bot identity only when it is old enough or SIGUSR1
forced it (:meth:`Agent.renewal_due`), after checking the storage can take it, and store it durably BEFORE
using it; then fetch the current host CA and one certificate per output with the current identity, write the
outputs atomically, and run each output's reload command.

Timing: the next cycle is due after ``renewal_interval`` x U(0.9, 1.0). A failed cycle is retried with
exponential backoff (1s, 2s, 4s ... capped at min(renewal_interval, 60s)) x U(0.5, 1.0); the last good outputs
stay in place. A failure that needs a fix on the host (a config, a permission) is retried at the normal pace
instead, except a full filesystem (fsutil.NO_SPACE), whose space can come back at any moment. A retry writes only
the outputs the failed cycle could not write (and skips a full one while nothing was freed on its filesystem);
the cycle due on the schedule, and a forced or reloaded one, writes every output.
Signals: SIGHUP reloads the config and runs a cycle, SIGUSR1 runs a cycle that renews the bot
identity, SIGTERM/SIGINT exit 0 (after the running cycle).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import fcntl
import os
import random
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from machine_id_agent import acl as aclmod
from machine_id_agent import diag as diagmod
from machine_id_agent import config as configmod
from machine_id_agent import fsutil, logs, outputs
from machine_id_agent.errors import (EXIT_NEEDS_TOKEN, AgentError, ConfigError, JoinError, LockedError, OutputError,
                                     RenewError)
from machine_id_agent.notify import Notifier

BACKOFF_CAP = 60.0
ROOM_MARGIN = 64 * 1024  # bytes freed on a full destination's filesystem before a retry writes there again
RELOAD_TIMEOUT = 60
LOCK_FILE = "agent.lock"
TBOT_LOCK_FILE = "lock"  # the file tbot v13 holds an exclusive flock on while it runs on this storage
TBOT_LOCK_WAIT = 10.0  # seconds to wait for a tbot that systemd is stopping right now to let go of it
STALL_AFTER = 300.0  # seconds one cycle may take before /livez fails and the watchdog pings stop
ORPHAN_WAIT = 120.0  # seconds a new agent waits for an older agent's orphaned renewal worker (upgrades)


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def jittered_interval(interval: float, rnd: Callable[[], float] = random.random) -> float:
    return interval * (0.9 + 0.1 * rnd())


def backoff_delay(attempt: int, interval: float, rnd: Callable[[], float] = random.random) -> float:
    cap = max(1.0, min(float(interval), BACKOFF_CAP))
    return min(cap, 2.0 ** max(0, attempt - 1)) * (0.5 + 0.5 * rnd())


class Backend:
    """The protocol half, behind one seam so tests can replace it. Modules are imported on first use, so
    offline commands (status) do not load gRPC."""

    @property
    def identity(self):
        from machine_id_agent import identity
        return identity

    def load_identity(self, storage_dir: Path):
        return self.identity.load(storage_dir)

    def store_identity(self, storage_dir: Path, ident, token_hash: Optional[str]) -> None:
        self.identity.store(storage_dir, ident, token_hash)

    def stored_token_hash(self, storage_dir: Path) -> Optional[str]:
        return self.identity.stored_token_hash(storage_dir)

    def adopt_tbot(self, storage_dir: Path):
        """Import the identity a hand-run tbot left in the storage (None when it left none)."""
        from machine_id_agent import tbot_import
        return tbot_import.adopt(storage_dir)

    def check_storage(self, storage_dir: Path) -> None:
        """Raise StorageError unless the storage can take a new identity now (before a renewal or a join)."""
        self.identity.check_storage(storage_dir)

    def token_hash(self, token: str) -> str:
        return self.identity.token_hash(token)

    def is_stale(self, storage_dir: Path, ident) -> bool:
        """The identity must never be presented again (locked, lost a renewal, untrusted)."""
        return self.identity.is_stale(storage_dir, ident)

    def note_token_refused(self, storage_dir: Path, token_hash: Optional[str], reason: Optional[str]) -> None:
        """For ``status``: Teleport refused the token with this hash while the agent kept its identity (None: a
        join succeeded, forget any refusal)."""
        if token_hash is None:
            self.identity.clear_token_refused(storage_dir)
        else:
            self.identity.mark_token_refused(storage_dir, token_hash, reason or "")

    def join(self, cfg):
        from machine_id_agent import join
        return join.join(cfg)

    def ping(self, addr: str, cfg):
        from machine_id_agent import webapi
        return webapi.ping(addr, ca_path=cfg.ca_path, insecure=cfg.insecure)

    def client(self, cfg, ident, facts):
        from machine_id_agent import renew
        return renew.AuthClient(cfg, ident, facts)


def select_clusters(selectors, available: Dict[str, Dict[str, str]]) -> List[str]:
    """The sorted names of the ``available`` clusters ({name: labels}) that any selector matches."""
    return sorted(n for n, labels in available.items() if any(s.matches(n, labels) for s in selectors))


@dataclass
class OutputState:
    destination: str
    kubernetes_cluster: str
    not_after: Optional[_dt.datetime] = None
    last_error: Optional[str] = None
    clusters: Optional[List[str]] = None  # kubernetes/v2: the clusters selected at the last renewal
    multi: bool = False  # a kubernetes/v2 output
    cluster_not_after: Dict[str, _dt.datetime] = field(default_factory=dict)  # kubernetes/v2: expiry per cluster
    # when a write last ran out of space there: free (bytes, inodes) on its filesystem just after, and the cause
    # (errno, text)
    full: Optional[Tuple[Tuple[int, int], Tuple[int, str]]] = None

    def view(self, now: _dt.datetime) -> Dict[str, Any]:
        secs = int((self.not_after - now).total_seconds()) if self.not_after else None
        out = {"destination": self.destination, "kubernetes_cluster": self.kubernetes_cluster,
               "expires": self.not_after.isoformat() if self.not_after else None, "seconds_to_expiry": secs,
               "valid": bool(secs is not None and secs > 0), "error": self.last_error}
        if self.multi or self.clusters is not None:
            out["kubernetes_clusters"] = list(self.clusters or [])
            out["cluster_seconds_to_expiry"] = {c: int((na - now).total_seconds())
                                                for c, na in sorted(self.cluster_not_after.items())}
        return out


class Agent:
    def __init__(self, cfg: configmod.Config, backend: Any = None, notifier: Optional[Notifier] = None,
                 log=None, rnd: Callable[[], float] = random.random, isolate: bool = False):
        self.cfg = cfg
        from machine_id_agent import identity as identmod

        identmod.configure_storage(cfg.storage_symlinks, cfg.storage_acls)
        self.isolate = isolate
        self._backend = backend
        self.notifier = notifier or Notifier()
        self.log = log or logs.get()
        self.rnd = rnd
        self.lock = threading.Lock()
        self.renewals = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.last_ok: Optional[bool] = None
        self.last_error: Optional[str] = None
        self.last_success: Optional[float] = None
        self.identity_not_after: Optional[_dt.datetime] = None
        self.cycle_started: Optional[float] = None
        self.facts = None
        self.outputs: Dict[str, OutputState] = {}
        self.identity_task = diagmod.TaskStats(diagmod.IDENTITY_TASK)
        self.output_tasks: Dict[str, diagmod.TaskStats] = {}
        self._marks: Dict[str, Any] = {}  # what the running cycle got done, for the task metrics
        self._reset_outputs()
        self._stop = False
        self._renew_now = False
        self._force_renew = False  # SIGUSR1: renew the bot identity even though it is fresh
        # set by _loop for a retry: the cycle writes only these outputs (keys), those that failed; None: every output
        self._retry_outputs: Optional[set] = None
        # set by cycle() once its outputs loop ran to the end: the keys it could not write (None: it did not get there)
        self._outputs_failed_last: Optional[set] = None
        self._rotation_pending: Optional[str] = None  # a CA rotation step asks for a renewal (see rotation.py)
        self._current_ident = None  # the identity in use, for the CA rotation watch
        self._wake_fd: Optional[int] = None
        self.watcher = None
        self._unsaved = None  # (identity, token hash) the server issued but the storage refused
        # hash of a configured token Teleport refused while the stored identity was still valid: not tried again
        # by this process (a new token, or a restart, tries again)
        self._refused_token_hash: Optional[str] = None
        self._deferred: Optional[AgentError] = None
        self._reload = False
        self._lock_fd: Optional[int] = None
        self._tbot_lock_fd: Optional[int] = None
        self.diag = None
        self._warned: set = set()
        logs.REDACTOR.add([cfg.token or ""])

    def warn_once(self, msg: str) -> None:
        """Warnings that would repeat every cycle (no ACL support) are logged once per process."""
        if msg not in self._warned:
            self._warned.add(msg)
            self.log.warning("%s", msg)

    # ----- state shared with the diagnostics thread
    @property
    def backend(self):
        if self._backend is None:
            self._backend = Backend()
        return self._backend

    def _reset_outputs(self) -> None:
        old = self.outputs
        self.outputs = {}
        for o in self.cfg.outputs:
            key = str(o.destination)
            st = old.get(key) or OutputState(key, o.kubernetes_cluster)
            st.kubernetes_cluster = o.kubernetes_cluster
            st.multi = bool(getattr(o, "multi", False))
            if not st.multi:
                st.clusters, st.cluster_not_after = None, {}
            if st.not_after is None:
                found = outputs.inspect(o.destination)
                if found.get("valid") and found.get("expires"):
                    st.not_after = _dt.datetime.fromisoformat(found["expires"])
                    # a kubernetes/v2 output found on disk at start: its clusters until the first renewal
                    if st.multi and found.get("cluster_expires"):
                        st.cluster_not_after = {c: _dt.datetime.fromisoformat(v)
                                                for c, v in found["cluster_expires"].items()}
                        st.clusters = sorted(st.cluster_not_after)
            self.outputs[key] = st
        # an output that is no longer configured loses its task series, like its seconds_to_expiry
        tasks = {}
        for o in self.cfg.outputs:
            key = str(o.destination)
            labels = dict(diagmod.OUTPUT_TASK, destination=key, kubernetes_cluster=o.kubernetes_cluster)
            old_task = self.output_tasks.get(key)
            tasks[key] = old_task if old_task is not None and old_task.labels == labels else diagmod.TaskStats(labels)
        self.output_tasks = tasks

    def snapshot(self) -> Dict[str, Any]:
        now = _utcnow()
        with self.lock:
            outs = [s.view(now) for s in self.outputs.values()]
            all_valid = bool(outs) and all(o["valid"] for o in outs)
            ready = bool(self.last_ok) and all_valid
            reason = ""
            if not ready:
                if self.last_ok is None:
                    reason = "no renewal has finished yet"
                elif not self.last_ok:
                    reason = "last renewal failed: %s" % (self.last_error or "unknown error")
                else:
                    errs = [o["error"] for o in outs if not o["valid"] and o["error"]]
                    reason = "an output has no valid certificate" + (": %s" % errs[0] if errs else "")
            stalled = self.cycle_started is not None and time.monotonic() - self.cycle_started > STALL_AFTER
            return {
                "alive": not stalled, "ready": ready, "reason": reason, "renewals": self.renewals,
                "failures": self.failures, "outputs": outs,
                "identity_seconds_to_expiry": (int((self.identity_not_after - now).total_seconds())
                                               if self.identity_not_after else None),
                "last_success_unix": self.last_success,
                "ca_watch": self.watcher.view() if self.watcher is not None else None,
                "tasks": [self.identity_task.view()] + [t.view() for t in self.output_tasks.values()],
            }

    # ----- one renewal cycle
    def _endpoint_facts(self, client=None):
        cfg = self.cfg
        addr = cfg.proxy_server or cfg.auth_server
        try:
            facts = self.backend.ping(addr, cfg)
            self.facts = facts
            return facts
        except AgentError as e:
            if cfg.proxy_server:
                raise
            # auth_server may be an auth server, which has no web API: use what we learned before
            self.log.debug("no /webapi/ping answer from %s (%s); treating it as an auth server", addr, e)
            # the auth server knows the proxy's public address (Ping): ask the proxy there
            fn = getattr(client, "proxy_public_addr", None) if client is not None else None
            if callable(fn):
                try:
                    public = fn()
                    if public:
                        self.facts = self.backend.ping(public, cfg)
                except AgentError as e2:
                    self.log.warning("cannot ask the proxy named by the auth server (%s); kubeconfig needs it", e2)
            return self.facts

    def renewal_due(self, ident, now: Optional[_dt.datetime] = None) -> bool:
        """Renew the bot identity only when it is old enough: its remaining lifetime is at most
        ``credential_ttl - 0.9 x renewal_interval`` (so on the normal schedule every cycle renews, as each
        comes >= 0.9 x interval after the last), or when SIGUSR1 forced it. A fresh identity is NOT renewed at
        start (a restart loop would otherwise walk into the renewal window again and again), after SIGHUP or
        when a failed cycle is retried. The age is taken from the expiry, not from NotBefore (Teleport
        backdates that by a minute); a server that capped the TTL makes it look older: renewed earlier."""
        if self._force_renew:
            return True
        now = now or _utcnow()
        left = (ident.not_after - now).total_seconds()
        return left <= self.cfg.credential_ttl - 0.9 * self.cfg.renewal_interval

    def _storage_problem(self) -> Optional[AgentError]:
        check = getattr(self.backend, "check_storage", None)
        if check is None:
            return None
        try:
            check(self.cfg.storage_dir)
            return None
        except AgentError as e:
            return e

    def _identity_now(self):
        """The identity to use: one kept in memory because the storage refused it (stored now if the
        storage takes it again), else the stored one."""
        be, cfg = self.backend, self.cfg
        if self._unsaved is not None:
            ident, h = self._unsaved
            try:
                be.store_identity(cfg.storage_dir, ident, h)
            except (AgentError, OSError) as e:
                self._deferred = e if isinstance(e, AgentError) else RenewError(str(e))
                return ident, h
            self._unsaved = None
            self.log.info("stored the bot identity that was kept in memory (%s)", _bot(ident))
            return ident, h
        ident = be.load_identity(cfg.storage_dir)
        if ident is None:
            ident = self._adopt_tbot()
        return ident, (be.stored_token_hash(cfg.storage_dir) if ident is not None else None)

    def _adopt_tbot(self):
        """No ``identity.json`` yet: the identity a hand-run tbot left in the storage, imported once (only under
        tbot's lock, see acquire_lock), or None. One that cannot be adopted (partial, mismatched, expired) is
        refused; with a join token configured the agent joins instead, as a new host does."""
        adopt = getattr(self.backend, "adopt_tbot", None)
        if adopt is None:
            return None
        from machine_id_agent.tbot_import import TbotIdentityError
        try:
            ident = adopt(self.cfg.storage_dir)
        except TbotIdentityError as e:
            try:
                token = configmod.read_token(self.cfg)
            except ConfigError:
                token = None
            if not token:
                raise
            self.log.warning("not adopting tbot's identity: %s; joining with the configured token instead",
                             str(e).split("; ", 1)[0])
            return None
        if ident is not None:
            self.log.info("adopted the identity tbot left in %s: %s; renewing it now (same bot, generation goes on)",
                          self.cfg.storage_dir, ident.describe())
            self._force_renew = True  # the first renewal in the agent's hands comes while tbot's certificate is fresh
        return ident

    def _keep_unsaved(self, e, token_hash: Optional[str]) -> Any:
        """The server issued an identity the storage refused: use it, keep it, retry storing it."""
        self._unsaved = (e.identity, e.token_hash if e.token_hash is not None else token_hash)
        self._deferred = e
        self.log.error("%s", e)
        return e.identity

    def cycle(self) -> None:
        """One renewal; raises AgentError (or OSError) on failure. Outputs are only replaced on success.
        A problem that does not stop the outputs (storage full, identity kept in memory, a lost renewal) is
        left in ``self._deferred``: the outputs are refreshed with the current identity, then the cycle
        reports it."""
        cfg = self.cfg
        be = self.backend
        self._deferred = None
        self._outputs_failed_last = None
        marks = self._marks = {"start": time.monotonic(), "identity_done": None, "outputs": {}, "outputs_error": None,
                               "skipped": set()}
        ident, stored_hash = self._identity_now()
        try:
            token = configmod.read_token(cfg)  # the token file now (a new one is picked up without a restart)
        except ConfigError:
            token = None  # unreadable: an error only if a join needs it (below)
        if token:
            logs.REDACTOR.add([token])
        want_hash = be.token_hash(token) if token else None
        joined = False
        token_changed = (want_hash is not None and stored_hash != want_hash and self._unsaved is None
                         and want_hash != self._refused_token_hash)
        if ident is None or not ident.valid() or token_changed:
            why = ("no stored identity" if ident is None else "the stored identity expired" if not ident.valid()
                   else "the configured token changed")
            token = configmod.read_token(cfg, required=True)
            problem = self._storage_problem()
            if problem is not None:  # a token is spent once: never on an identity the disk cannot take
                raise problem
            self.log.info("joining the cluster with the configured token (%s)", why)
            try:
                ident = be.join(dataclasses.replace(cfg, token=token))
                joined = True
            except JoinError as e:
                kept = ident is not None and ident.valid() and not be.is_stale(cfg.storage_dir, ident)
                if not (e.needs_token and kept):
                    raise  # no identity to fall back on (none, expired, or one never presented again): say why
                # Only the token changed and Teleport refused it: the identity in hand is still good, so keep
                # renewing it rather than letting it run out on a token that cannot join. The hash is the one of
                # the token just sent (the file may have changed since the cycle began).
                self._refused_token_hash = be.token_hash(token)
                be.note_token_refused(cfg.storage_dir, self._refused_token_hash, logs.REDACTOR.scrub(str(e)))
                self.log.warning("%s; keeping the current identity of %s (valid until %s) and renewing it; this "
                                 "token is not tried again until it changes or the agent restarts",
                                 e, _bot(ident), ident.not_after.isoformat())
            except AgentError as e:
                if not hasattr(e, "identity"):
                    raise
                ident = self._keep_unsaved(e, be.token_hash(token))
                joined = True
        if joined:
            self._force_renew = False
            be.note_token_refused(cfg.storage_dir, None, None)
            self.log.info("joined as %s; identity valid until %s", _bot(ident), ident.not_after.isoformat())
        facts = self._endpoint_facts()
        with be.client(cfg, ident, facts) as client:
            ensure_trust = getattr(client, "ensure_trust", None)
            if not joined and callable(ensure_trust) and ensure_trust():
                self._force_renew = True  # trust re-established after a missed host CA rotation: store it
                self._retry_outputs = None  # and every output gets the current host CA
            if not joined and self._unsaved is None and self.renewal_due(ident):
                problem = self._storage_problem()
                if problem is not None:
                    # do not ask for an identity the disk cannot take; the current one serves the outputs
                    self._deferred = problem
                else:
                    try:
                        # the client switches to the new identity for the rest of the cycle; it is on disk
                        ident = client.renew_identity(cfg.credential_ttl)
                        self._force_renew = False
                        self.log.info("renewed the bot identity of %s; valid until %s", _bot(ident),
                                      ident.not_after.isoformat())
                    except LockedError as e:
                        if not e.details.get("lost_renewal"):
                            raise
                        self._deferred = e  # not presented, so not locked: keep serving until it expires
                    except AgentError as e:
                        if not hasattr(e, "identity"):
                            raise
                        ident = self._keep_unsaved(e, stored_hash)
                        self._force_renew = False
            with self.lock:
                self.identity_not_after = ident.not_after
                self._current_ident = ident
            marks["identity_done"] = time.monotonic()
            if facts is None:
                facts = self._endpoint_facts(client)
            endpoint = outputs.kube_endpoint(facts, cfg.proxy_server or cfg.auth_server)
            cluster_name = getattr(facts, "cluster_name", None) or ident.cluster_name
            # Outputs are independent: one that fails does not stop the others. The loop never renews the bot
            # identity; a failed output is retried by the next cycle, which renews only if renewal_due().
            failed: List[Any] = []
            written: List[str] = []
            revoked = getattr(self, "_revoked", {})
            retry = self._retry_outputs  # a retry: only the outputs that failed (see _loop)
            for out in cfg.outputs:
                key = str(out.destination)
                if retry is not None and key not in retry:
                    marks["skipped"].add(key)  # written by the cycle that failed; no new iteration for it
                    continue
                out_start = time.monotonic()
                with self.lock:
                    full = self.outputs[key].full
                try:
                    if retry is not None and full is not None and not _room_since(full[0], fsutil.free_space(out.destination)):
                        # nothing was freed since the write ran out of space: the same write would fail again, so
                        # a retry asks for no certificates (each is an audit event on the server); a scheduled or
                        # forced cycle always tries
                        raise fsutil.no_space_error(key, key, full[1][0], "%s; nothing freed since" % full[1][1],
                                                    skipped=True)
                    if getattr(out, "multi", False):
                        res = self._write_multi(client, out, cluster_name, endpoint, revoked.get(key, ()))
                    else:
                        # the credentials carry the host CA re-read in this cycle (picks up rotations)
                        creds = client.kube_credentials(out.kubernetes_cluster, out.roles or None,
                                                        cfg.credential_ttl)
                        res = outputs.write_kube(out, creds, cluster_name, endpoint, out.acls or cfg.acls,
                                                 self._reader_uids(out), warn=self.warn_once, symlinks=out.symlinks,
                                                 revoke=revoked.get(key, ()))
                except LockedError:
                    raise  # the bot is locked: no other output can succeed either
                except (AgentError, OSError) as e:
                    if isinstance(e, OSError):
                        where = getattr(e, "filename", None) or key
                        e = (fsutil.no_space_from(where, key, e) if e.errno in fsutil.NO_SPACE
                             else OutputError("%s: %s" % (where, e.strerror or e)))
                    cause = e.details.get("no_space")
                    if e.details.get("skipped"):
                        room, cause = full  # keep what the failed write met: frees add up against it
                    else:
                        room = fsutil.free_space(out.destination) if cause else None
                    with self.lock:
                        self.outputs[key].last_error = str(e)
                        self.outputs[key].full = (room, cause) if room is not None else None
                    self.log.error("output %s (%s) failed: %s", key, out.kubernetes_cluster, e)
                    failed.append((key, e))
                    marks["outputs"][key] = (False, time.monotonic() - out_start)
                    continue
                marks["outputs"][key] = (True, time.monotonic() - out_start)
                revoked.pop(key, None)
                written.append(key)
                with self.lock:
                    st = self.outputs[key]
                    st.not_after, st.last_error, st.full = res.not_after, None, None
                    if getattr(out, "multi", False):
                        st.clusters = list(getattr(res, "clusters", []))
                        st.cluster_not_after = dict(getattr(res, "cluster_not_after", {}) or {})
                        if not st.clusters:
                            st.last_error = self._no_match(out)
                if getattr(out, "multi", False):
                    if st.clusters:
                        self.log.info("wrote Kubernetes credentials for %d cluster(s) (%s) to %s; valid until %s",
                                      len(st.clusters), ", ".join(st.clusters), key, res.not_after.isoformat())
                    else:
                        self.log.warning("%s", st.last_error)
                else:
                    self.log.info("wrote Kubernetes credentials for %s to %s; valid until %s",
                                  out.kubernetes_cluster, key, res.not_after.isoformat())
                if res.acl_changes:
                    self.log.warning("repaired the ACL of %s", ", ".join(res.acl_changes))
                if out.reload_command:
                    self._run_reload(out)
            self._outputs_failed_last = {k for k, _e in failed}
            if failed:
                err = _outputs_failed(failed, written, len(cfg.outputs))
                if self._deferred is None:
                    marks["outputs_error"] = err
                    raise err
                self.log.error("%s", err)  # the deferred problem is reported as the cycle's error
            from machine_id_agent import rotation

            rotation.clear_untrusted(cfg.storage_dir)  # a cycle got through: the server is trusted (again)

    def _write_multi(self, client, out, cluster_name: str, endpoint, revoke):
        """A kubernetes/v2 output: resolve the selectors against the clusters the roles may access NOW (so
        clusters added, relabelled or removed in Teleport show up at this renewal), one certificate per selected
        cluster, one kubeconfig; clusters no longer selected lose their files."""
        cfg = self.cfg
        available = client.kube_clusters(out.roles or None, cfg.credential_ttl)
        chosen = select_clusters(out.selectors, available)
        creds = client.kube_credentials_for(chosen, out.roles or None, cfg.credential_ttl) if chosen else {}
        host_cas = next(iter(creds.values())).host_ca_pems if creds else client.host_ca_pems()
        res = outputs.write_kube_multi(out, creds, cluster_name, endpoint, host_cas, out.acls or cfg.acls,
                                       self._reader_uids(out), warn=self.warn_once, symlinks=out.symlinks,
                                       revoke=revoke)
        res.clusters = chosen
        return res

    def _no_match(self, out) -> str:
        return ("output %s: no Kubernetes cluster the roles may access matches %s; the kubeconfig has no context "
                "until one does (check the labels with `tctl get kube_server` and the roles' kubernetes_labels)"
                % (out.destination, out.describe()))

    def _reader_uids(self, out) -> List[int]:
        return [aclmod.resolve_user(u, "%s: readers" % out.destination) for u in out.readers]

    def _run_reload(self, out) -> None:
        argv = list(out.reload_command)
        env = dict(os.environ)
        env["MACHINE_ID_AGENT_DESTINATION"] = str(out.destination)
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=RELOAD_TIMEOUT, env=env, close_fds=True, check=False)
        except FileNotFoundError:
            self.log.warning("reload_command for %s: %s not found; fix reload_command in the config",
                             out.destination, argv[0])
            return
        except subprocess.TimeoutExpired:
            self.log.warning("reload_command for %s: still running after %ds, killed; make it return quickly",
                             out.destination, RELOAD_TIMEOUT)
            return
        except OSError as e:
            self.log.warning("reload_command for %s: cannot run %s (%s)", out.destination, argv[0], e.strerror or e)
            return
        tail = (p.stdout or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
        if p.returncode != 0:
            self.log.warning("reload_command for %s exited %d: %s", out.destination, p.returncode, tail[0][:200])
        else:
            self.log.info("reload_command for %s done", out.destination)

    def _cycle_error(self) -> Optional[AgentError]:
        try:
            self.cycle()
            return self._deferred
        except AgentError as e:
            return e
        except OSError as e:
            return RenewError("%s: %s" % (getattr(e, "filename", None) or "I/O", e.strerror or e))
        except Exception as e:  # a bug: keep serving, say so once per failure
            self.log.error("internal error during renewal (please report it): %s: %s",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.log.debug("traceback", exc_info=True)
            return RenewError("internal error: %s" % type(e).__name__)

    def attempt(self) -> Optional[AgentError]:
        """Run one cycle (in a thread when ``isolate``, so the main thread keeps feeding systemd's watchdog)
        and record the outcome. Returns the error (None on success)."""
        with self.lock:
            self.cycle_started = time.monotonic()
        err = self._threaded_cycle() if self.isolate else self._cycle_error()
        with self.lock:
            self.cycle_started = None
            self._record_tasks(err)
            if err is None:
                self.renewals += 1
                self.consecutive_failures = 0
                self.last_ok, self.last_error = True, None
                self.last_success = time.time()
            else:
                self.failures += 1
                self.consecutive_failures += 1
                self.last_ok, self.last_error = False, str(err)
        return err

    def _record_tasks(self, err: Optional[AgentError]) -> None:
        """One iteration for the identity task and for every output (held under self.lock). The identity task
        succeeded when the cycle got past it and the cycle's error, if any, is only about outputs; an output
        succeeded when this cycle wrote it, and failed when it failed or was not reached."""
        marks, self._marks = self._marks, {}
        start = marks.get("start")
        if start is None:  # the cycle never began (cannot happen: cycle() sets the marks first)
            return
        done = marks.get("identity_done")
        ident_ok = done is not None and (err is None or err is marks.get("outputs_error"))
        self.identity_task.record(ident_ok, (done if done is not None else time.monotonic()) - start)
        for key, task in self.output_tasks.items():
            if key in marks.get("skipped", ()):
                continue
            ok, secs = marks["outputs"].get(key, (False, None))
            task.record(ok, secs)

    def _threaded_cycle(self) -> Optional[AgentError]:
        """One cycle in a thread of this process; the main thread waits for it and keeps systemd's watchdog
        fed while it runs (a cycle stuck longer than STALL_AFTER stops the pings, so systemd restarts the
        service). Signals only set flags, so a SIGTERM during a renewal lets it finish and store first.

        There is no worker process any more: a worker only outlived a kill of the main process, while a kill
        of the whole service (``systemctl kill``, the OOM killer, a power cut) took it down too, and it
        doubled the memory during a renewal. The renewal window is kept short instead (see renew_identity)
        and a renewal lost anyway is detected before the identity is presented (no lock)."""
        box: Dict[str, Optional[AgentError]] = {}

        def run() -> None:
            box["err"] = self._cycle_error()

        t = threading.Thread(target=run, name="renewal-cycle", daemon=True)
        started = time.monotonic()
        t.start()
        while True:
            wd = self.notifier.watchdog_interval
            t.join(wd if wd else None)
            if not t.is_alive():
                break
            if time.monotonic() - started < STALL_AFTER:
                self.notifier.watchdog()
        return box.get("err", RenewError("internal error: the renewal thread ended without a result"))

    # ----- process plumbing
    def acquire_lock(self) -> None:
        d = Path(self.cfg.storage_dir)
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(str(d / LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ConfigError("storage %s: cannot create it or its lock file (%s); run 'machine-id-agent init' or "
                              "chown it to the agent's user" % (d, e.strerror or e)) from None
        deadline = time.monotonic() + ORPHAN_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
            holder = _lock_holder(fd)
            if (holder is not None and _alive(holder)) or time.monotonic() >= deadline:
                os.close(fd)
                raise ConfigError("storage %s: another machine-id-agent%s is already running with this storage "
                                  "directory; stop it first (two agents renewing one identity lock the bot)"
                                  % (d, " (pid %d)" % holder if holder else "")) from None
            # the previous agent died and its renewal worker is finishing: wait for it
            time.sleep(0.05)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, ("%d\n" % os.getpid()).encode())
        except OSError as e:
            # The flock is the lock; the pid in the file only names its holder to the next agent. A full storage
            # (ENOSPC) must not stop the agent here with a traceback: the cycle then says what the storage lacks
            # (e.g. "cannot import tbot's identity (...); free space ...") and retries until it is fixed.
            self.log.warning("storage %s: cannot write this agent's pid into %s (%s); carrying on, the lock is held",
                             d, d / LOCK_FILE, e.strerror or e)
        self._lock_fd = fd
        try:
            self._tbot_lock_fd = self._acquire_tbot_lock(d)
        except BaseException:
            self.release_lock()
            raise

    def _acquire_tbot_lock(self, d: Path) -> int:
        """tbot's own lock on the storage, held for the agent's lifetime: a tbot running on this storage (a host
        set up by hand, not yet taken over) makes the agent refuse to start, and a tbot started later refuses to
        run (it fails to get this lock). Two renewers of one identity would lock the bot."""
        try:
            fd = os.open(str(d / TBOT_LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise ConfigError("storage %s: cannot open %s (%s); remove it if it is not a regular file owned by the "
                              "agent's user" % (d, d / TBOT_LOCK_FILE, e.strerror or e)) from None
        deadline = time.monotonic() + TBOT_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                raise ConfigError("storage %s: another process holds %s, the lock tbot takes while it runs: a tbot is "
                                  "renewing this identity; stop and disable its unit first (the role does that, "
                                  "see machine_id_tbot_units): two renewers of one identity lock the bot"
                                  % (d, d / TBOT_LOCK_FILE)) from None
            time.sleep(0.1)

    def release_lock(self) -> None:
        if getattr(self, "_tbot_lock_fd", None) is not None:
            os.close(self._tbot_lock_fd)
            self._tbot_lock_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _start_diag(self) -> None:
        from machine_id_agent.diag import DiagServer
        if self.cfg.diag_addr:
            self.diag = DiagServer(self.cfg.diag_addr, self.snapshot)
            self.diag.start()
            self.log.info("diagnostics on http://%s (/livez, /readyz, /metrics)", self.cfg.diag_addr)

    def _start_watch(self) -> None:
        """The CA rotation watch (rotation.RotationWatcher), unless the config turns it off."""
        if not self.cfg.watch_ca_rotations:
            return
        from machine_id_agent import rotation

        def target():
            with self.lock:
                ident = self._current_ident
            return (self.cfg, ident, self.facts) if ident is not None else None

        self.watcher = rotation.RotationWatcher(target, self.backend.client, self.request_renewal, rnd=self.rnd)
        self.watcher.start()

    def request_renewal(self, reason: str) -> None:
        """From another thread: run a cycle that renews the bot identity and every output now."""
        self._rotation_pending = reason
        self._renew_now = True
        fd = self._wake_fd
        if fd is not None:
            try:
                os.write(fd, b"r")
            except OSError:
                pass  # the pipe is full: the loop is awake anyway

    def _stop_diag(self) -> None:
        if self.diag is not None:
            self.diag.stop()
            self.diag = None

    def reload_config(self) -> None:
        src = self.cfg.source
        try:
            new = configmod.load(src)
        except ConfigError as e:
            self.log.error("reload: %s; keeping the previous configuration", e)
            return
        logs.REDACTOR.add([new.token or ""])
        old_diag = self.cfg.diag_addr
        if new.storage_dir != self.cfg.storage_dir:
            self.log.warning("reload: storage directory changes take effect on restart; keeping %s",
                             self.cfg.storage_dir)
            new.storage_dir = self.cfg.storage_dir
        old_outputs = {str(o.destination): o for o in self.cfg.outputs}
        from machine_id_agent import identity as identmod

        identmod.configure_storage(new.storage_symlinks, new.storage_acls)
        with self.lock:
            self.cfg = new
            self._reset_outputs()
        self._apply_readers(old_outputs)
        if new.diag_addr != old_diag:
            self._stop_diag()
            try:
                self._start_diag()
            except ConfigError as e:
                self.log.error("reload: %s", e)
        self.log.info("configuration reloaded from %s", src)

    def _apply_readers(self, old_outputs: Dict[str, Any]) -> None:
        """Revocation at reload: re-apply each destination's ACL (directory and files) with the new readers,
        without waiting for new credentials. A user removed from ``readers:`` loses the named entry; the bot's
        own (writer) entry is never removed. A failure is logged and retried by the next write."""
        revoked: Dict[str, set] = {}
        for out in self.cfg.outputs:
            key = str(out.destination)
            old = old_outputs.get(key)
            gone = [u for u in (old.readers if old is not None else []) if u not in out.readers]
            uids = set()
            for name in gone:
                try:
                    uids.add(aclmod.resolve_user(name, "%s: readers" % key))
                except ConfigError:
                    self.log.warning("reload: %s: removed reader %r no longer exists; cannot find its ACL entry "
                                     "(run 'machine-id-agent init' for %s to reset the ACL)", key, name, key)
            if uids:
                revoked[key] = uids
            try:
                changes = outputs.apply_acls(out, out.acls or self.cfg.acls, self._reader_uids(out),
                                             revoke=sorted(uids), warn=self.warn_once, symlinks=out.symlinks)
            except AgentError as e:
                self.log.error("reload: cannot re-apply the readers of %s: %s", key, e)
                continue
            except OSError as e:
                self.log.error("reload: cannot re-apply the readers of %s: %s", key, e.strerror or e)
                continue
            revoked.pop(key, None)
            if changes:
                self.log.info("reload: applied the readers of %s (%s)%s", key, ", ".join(out.readers) or "none",
                              "; removed %s" % ", ".join(gone) if gone else "")
        self._revoked = revoked

    def run_oneshot(self) -> int:
        self.acquire_lock()
        try:
            err = self.attempt()
        finally:
            self.release_lock()
        if err is None:
            return 0
        self.log.error("%s", err)
        return err.exit_code

    def run(self) -> int:
        """The long-running service. Returns the exit code."""
        self.acquire_lock()
        rfd, wfd = os.pipe()
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
        old_wakeup = signal.set_wakeup_fd(wfd)
        handlers = {}

        def on_signal(signum, frame):
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop = True
            elif signum == signal.SIGHUP:
                self._reload = True
            elif signum == signal.SIGUSR1:
                self._renew_now = True
                self._force_renew = True

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            handlers[s] = signal.signal(s, on_signal)
        self._wake_fd = wfd
        try:
            self._start_diag()
            self._start_watch()
            return self._loop(rfd)
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            self._wake_fd = None
            for s, h in handlers.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)
            self._stop_diag()
            self.release_lock()

    def _loop(self, rfd: int) -> int:
        now = time.monotonic()
        next_at = now
        next_wd = now
        ready_sent = False
        retry_outputs = None  # the outputs a retry writes: those the failed cycle could not write
        full_due = now  # when the next cycle must write every output (the renewal schedule)
        self.notifier.status("starting: first renewal")
        while not self._stop:
            now = time.monotonic()
            if self._reload:
                self._reload = False
                self.notifier.reloading()
                self.reload_config()
                # systemd waits in "reloading" until READY=1 follows RELOADING=1, even when the new file
                # was refused and the old config stays.
                self.notifier.ready("configuration reloaded; renewing now")
                self._renew_now = True
            if self._renew_now or now >= next_at:
                forced, self._renew_now = self._renew_now, False
                pending, self._rotation_pending = self._rotation_pending, None
                if pending:
                    self._force_renew = True
                    self.log.info("renewing the bot identity and every output for a CA rotation: %s", pending)
                # A retry writes only the outputs the failed cycle could not write. A signal, a reload, a rotation
                # and the schedule (full_due) write every output, so a failure that lasts does not keep the others
                # from being renewed on time.
                partial = None if (forced or pending or now >= full_due) else retry_outputs
                self._retry_outputs = partial
                try:
                    err = self.attempt()
                finally:
                    self._retry_outputs = None
                retry_outputs = None
                now = time.monotonic()
                interval = self.cfg.renewal_interval
                if partial is None:
                    full_due = now + jittered_interval(interval, self.rnd)
                if err is None:
                    next_at = full_due
                    status = "renewed; next renewal in %ds" % int(next_at - now)
                    if not ready_sent:
                        # READY=1 dropped (systemd's queue full): sent again after the next good cycle
                        ready_sent = self.notifier.ready(status) or not self.notifier.enabled
                    else:
                        self.notifier.status(status)
                elif not ready_sent and getattr(err, "needs_token", False):
                    # It never got ready and only a new join token can change that: exit instead of holding the
                    # unit in "activating" (which holds up boot until TimeoutStartSec and then loops through
                    # restarts). The unit does not restart on this status; a new token and a restart (the role
                    # does both) bring it back.
                    self.log.error("cannot start: %s; exiting with status %d until a new join token is configured "
                                   "and the service restarted", err, EXIT_NEEDS_TOKEN)
                    self.notifier.status("needs a new join token: %s" % str(err)[:200])
                    self.notifier.stopping()
                    return EXIT_NEEDS_TOKEN
                else:
                    retryable = getattr(err, "retryable", None)
                    if retryable is None:
                        retryable = not isinstance(err, (ConfigError, JoinError, OutputError))
                    if retryable:
                        # never past the schedule: the cycle due then writes every output (full_due)
                        delay = min(backoff_delay(self.consecutive_failures, interval, self.rnd),
                                    max(0.0, full_due - now))
                        if self._outputs_failed_last is not None:  # the cycle got through its outputs
                            retry_outputs = set(self._outputs_failed_last)
                    else:  # needs a human (new token, config fix): try again at the normal pace
                        delay = jittered_interval(interval, self.rnd)
                    if isinstance(err, LockedError):
                        delay = max(delay, float(interval))
                    retry_after = (getattr(err, "details", None) or {}).get("retry_after")
                    if retry_after:  # the error knows when a retry can tell more (rotation.USER_CA_GONE_AFTER)
                        delay = min(delay, float(retry_after))
                    next_at = now + delay
                    self.log.error("renewal failed (attempt %d): %s; retrying in %.0fs",
                                   self.consecutive_failures, err, delay)
                    self.notifier.status("renewal failing: %s" % str(err)[:200])
            wd = self.notifier.watchdog_interval
            if wd and now >= next_wd:
                self.notifier.watchdog()
                next_wd = now + wd
            if self._stop or self._renew_now or self._reload:
                continue
            timeout = max(0.0, next_at - time.monotonic())
            if wd:
                timeout = min(timeout, max(0.0, next_wd - time.monotonic()))
            try:
                select.select([rfd], [], [], timeout)
            except InterruptedError:
                pass
            try:
                while os.read(rfd, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        self.notifier.stopping()
        self.log.info("stopping on signal")
        return 0


def _room_since(full: Tuple[int, int], now: Optional[Tuple[int, int]]) -> bool:
    """Whether a filesystem that was ``full`` (free bytes, inodes) may take a write now: ROOM_MARGIN more
    bytes are free, or an inode where inodes ran short, or the free space cannot be read (then the write is
    tried). A quota reached does not show in statvfs: such an output waits for the next scheduled cycle unless
    space is freed on the filesystem."""
    return now is None or now[0] >= full[0] + ROOM_MARGIN or (full[1] < 64 and now[1] > full[1])


def _outputs_failed(failed: List[Any], written: List[str], total: int) -> AgentError:
    """One error for the outputs that failed in a cycle, naming each: a RenewError when any failure came from
    the server, else an OutputError; retried with backoff when any failure may pass by itself (a server error
    that is retryable, a full filesystem), else at the normal pace (a fix is needed on the host or server)."""
    what = "; ".join("%s: %s" % (k, str(e)[len(k) + 2:] if str(e).startswith(k + ": ") else e) for k, e in failed)
    if total == 1:
        msg = "output %s" % what
    else:
        also = "; written: %s" % ", ".join(written) if written else ""
        msg = "%d of %d outputs failed (%s)%s" % (len(failed), total, what, also)
    details = {"failed": [k for k, _e in failed], "written": list(written)}
    retryable = any(getattr(e, "retryable", False) for _k, e in failed)
    if any(isinstance(e, RenewError) for _k, e in failed):
        return RenewError(msg, retryable=retryable, **details)
    return OutputError(msg, retryable=retryable, **details)


def _lock_holder(fd: int) -> Optional[int]:
    try:
        data = os.pread(fd, 32, 0).decode().strip()
        return int(data) if data.isdigit() else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _bot(ident) -> str:
    try:
        return "bot %s" % ident.bot_name
    except Exception:
        return "the bot"
