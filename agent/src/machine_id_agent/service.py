# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The renewal loop: join or renew the bot identity, write every Kubernetes output, repeat.

One cycle: load the stored identity; join (again) when there is none, it expired, or the configured token's
hash differs from the stored one; ping the proxy; renew the identity and store it durably BEFORE using it;
then, with a connection on the new identity, fetch the current host CA and one certificate per output,
write the outputs atomically, and run each output's reload command.

Timing: the next cycle is due after ``renewal_interval`` x U(0.9, 1.0). A failed cycle is retried with
exponential backoff (1s, 2s, 4s ... capped at min(renewal_interval, 60s)) x U(0.5, 1.0); the last good outputs
stay in place. Signals: SIGHUP reloads the config and renews, SIGUSR1 renews now, SIGTERM/SIGINT exit 0.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import random
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from machine_id_agent import acl as aclmod
from machine_id_agent import config as configmod
from machine_id_agent import logs, outputs
from machine_id_agent.errors import AgentError, ConfigError, JoinError, LockedError, OutputError, RenewError
from machine_id_agent.notify import Notifier

BACKOFF_CAP = 60.0
RELOAD_TIMEOUT = 60
LOCK_FILE = "agent.lock"
STALL_AFTER = 300.0  # seconds one cycle may take before /livez fails and the watchdog pings stop
ORPHAN_WAIT = 120.0  # seconds a new agent waits for a dead agent's renewal worker


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

    def token_hash(self, token: str) -> str:
        return self.identity.token_hash(token)

    def join(self, cfg):
        from machine_id_agent import join
        return join.join(cfg)

    def ping(self, addr: str, cfg):
        from machine_id_agent import webapi
        return webapi.ping(addr, ca_path=cfg.ca_path, insecure=cfg.insecure)

    def client(self, cfg, ident, facts):
        from machine_id_agent import renew
        return renew.AuthClient(cfg, ident, facts)


@dataclass
class OutputState:
    destination: str
    kubernetes_cluster: str
    not_after: Optional[_dt.datetime] = None
    last_error: Optional[str] = None

    def view(self, now: _dt.datetime) -> Dict[str, Any]:
        secs = int((self.not_after - now).total_seconds()) if self.not_after else None
        return {"destination": self.destination, "kubernetes_cluster": self.kubernetes_cluster,
                "expires": self.not_after.isoformat() if self.not_after else None, "seconds_to_expiry": secs,
                "valid": bool(secs is not None and secs > 0), "error": self.last_error}


class Agent:
    def __init__(self, cfg: configmod.Config, backend: Any = None, notifier: Optional[Notifier] = None,
                 log=None, rnd: Callable[[], float] = random.random, isolate: bool = False):
        self.cfg = cfg
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
        self._reset_outputs()
        self._stop = False
        self._renew_now = False
        self._reload = False
        self._lock_fd: Optional[int] = None
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
            if st.not_after is None:
                found = outputs.inspect(o.destination)
                if found.get("valid") and found.get("expires"):
                    st.not_after = _dt.datetime.fromisoformat(found["expires"])
            self.outputs[key] = st

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
                    reason = "an output has no valid certificate"
            stalled = self.cycle_started is not None and time.monotonic() - self.cycle_started > STALL_AFTER
            return {
                "alive": not stalled, "ready": ready, "reason": reason, "renewals": self.renewals,
                "failures": self.failures, "outputs": outs,
                "identity_seconds_to_expiry": (int((self.identity_not_after - now).total_seconds())
                                               if self.identity_not_after else None),
                "last_success_unix": self.last_success,
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

    def cycle(self) -> None:
        """One renewal; raises AgentError (or OSError) on failure. Outputs are only replaced on success."""
        cfg = self.cfg
        be = self.backend
        want_hash = be.token_hash(cfg.token) if cfg.token else None
        ident = be.load_identity(cfg.storage_dir)
        stored_hash = be.stored_token_hash(cfg.storage_dir) if ident is not None else None
        joined = False
        if ident is None or not ident.valid() or (want_hash is not None and stored_hash != want_hash):
            why = ("no stored identity" if ident is None else "the stored identity expired" if not ident.valid()
                   else "the configured token changed")
            self.log.info("joining the cluster with the configured token (%s)", why)
            ident = be.join(cfg)
            be.store_identity(cfg.storage_dir, ident, want_hash)
            joined = True
            self.log.info("joined as %s; identity valid until %s", _bot(ident), ident.not_after.isoformat())
        facts = self._endpoint_facts()
        with be.client(cfg, ident, facts) as client:
            if not joined:
                # the client switches to the new identity for the rest of the cycle
                ident = client.renew_identity(cfg.credential_ttl)
                be.store_identity(cfg.storage_dir, ident, want_hash)
                self.log.info("renewed the bot identity of %s; valid until %s", _bot(ident),
                              ident.not_after.isoformat())
            with self.lock:
                self.identity_not_after = ident.not_after
            if facts is None:
                facts = self._endpoint_facts(client)
            endpoint = outputs.kube_endpoint(facts, cfg.proxy_server or cfg.auth_server)
            cluster_name = getattr(facts, "cluster_name", None) or ident.cluster_name
            for out in cfg.outputs:
                key = str(out.destination)
                try:
                    # the credentials carry the host CA re-read in this cycle (picks up rotations)
                    creds = client.kube_credentials(out.kubernetes_cluster, out.roles or None, cfg.credential_ttl)
                    res = outputs.write_kube(out, creds, cluster_name, endpoint, cfg.acls,
                                             self._reader_uids(out), warn=self.warn_once)
                except AgentError as e:
                    with self.lock:
                        self.outputs[key].last_error = str(e)
                    raise
                with self.lock:
                    st = self.outputs[key]
                    st.not_after, st.last_error = res.not_after, None
                self.log.info("wrote Kubernetes credentials for %s to %s; valid until %s",
                              out.kubernetes_cluster, key, res.not_after.isoformat())
                if res.acl_changes:
                    self.log.warning("repaired the ACL of %s", ", ".join(res.acl_changes))
                if out.reload_command:
                    self._run_reload(out)

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
            return None
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
        """Run one cycle (in a worker process when ``isolate``) and record the outcome. Returns the error
        (None on success)."""
        with self.lock:
            self.cycle_started = time.monotonic()
        err = self._isolated_cycle() if self.isolate else self._cycle_error()
        with self.lock:
            self.cycle_started = None
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

    def _isolated_cycle(self) -> Optional[AgentError]:
        """One cycle in a forked worker. The window between the server counting a new identity generation
        and the identity being on disk cannot be closed from the client, so it is moved out of reach of a
        crash of the service process: if the service is killed (even with SIGKILL) the worker still stores
        the identity and writes the outputs, holding the storage lock until it is done. The worker ignores
        SIGTERM/SIGHUP/SIGUSR1/SIGINT (a cycle is short; systemd's final SIGKILL still applies). As a side
        effect gRPC is only ever loaded in workers, which keeps the long-running process small."""
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # worker
            code = 0
            try:
                os.close(rfd)
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                    signal.signal(s, signal.SIG_IGN)
                try:
                    signal.set_wakeup_fd(-1)
                except ValueError:
                    pass
                if self.diag is not None:
                    try:
                        self.diag.httpd.socket.close()
                    except OSError:
                        pass
                self.lock = threading.Lock()  # another thread may have held it at fork time
                err = self._cycle_error()
                with self.lock:
                    outs = {k: (v.not_after.isoformat() if v.not_after else None, v.last_error)
                            for k, v in self.outputs.items()}
                    ident_na = self.identity_not_after.isoformat() if self.identity_not_after else None
                doc = {"error": None if err is None else str(err),
                       "class": None if err is None else type(err).__name__,
                       "retryable": getattr(err, "retryable", None), "outputs": outs, "identity": ident_na}
                data = json.dumps(doc).encode()
                while data:
                    data = data[os.write(wfd, data):]
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.close(wfd)
        chunks = []
        started = time.monotonic()
        try:
            while True:
                wd = self.notifier.watchdog_interval
                ready, _w, _x = select.select([rfd], [], [], wd if wd else None)
                if not ready:
                    # keep systemd's watchdog fed while the worker makes progress; a worker stuck longer
                    # than STALL_AFTER stops the pings, so systemd restarts the service
                    if time.monotonic() - started < STALL_AFTER:
                        self.notifier.watchdog()
                    continue
                b = os.read(rfd, 65536)
                if not b:
                    break
                chunks.append(b)
        finally:
            os.close(rfd)
        while True:
            try:
                _pid, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                status = 0
                break
        try:
            doc = json.loads(b"".join(chunks) or b"null")
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return RenewError("the renewal worker died (wait status %d); will retry" % status)
        with self.lock:
            for k, (na, e) in (doc.get("outputs") or {}).items():
                if k in self.outputs:
                    self.outputs[k].not_after = _dt.datetime.fromisoformat(na) if na else self.outputs[k].not_after
                    self.outputs[k].last_error = e
            if doc.get("identity"):
                self.identity_not_after = _dt.datetime.fromisoformat(doc["identity"])
        if doc.get("error") is None:
            return None
        cls = _ERRORS.get(doc.get("class") or "", RenewError)
        if issubclass(cls, RenewError):
            retry = doc.get("retryable")
            err = cls(doc["error"], retryable=bool(retry) if retry is not None else not issubclass(cls, LockedError))
        else:
            err = cls(doc["error"])
        return err

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
        os.ftruncate(fd, 0)
        os.write(fd, ("%d\n" % os.getpid()).encode())
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _start_diag(self) -> None:
        from machine_id_agent.diag import DiagServer
        if self.cfg.diag_addr:
            self.diag = DiagServer(self.cfg.diag_addr, self.snapshot)
            self.diag.start()
            self.log.info("diagnostics on http://%s (/livez, /readyz, /metrics)", self.cfg.diag_addr)

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
        with self.lock:
            self.cfg = new
            self._reset_outputs()
        if new.diag_addr != old_diag:
            self._stop_diag()
            try:
                self._start_diag()
            except ConfigError as e:
                self.log.error("reload: %s", e)
        self.log.info("configuration reloaded from %s", src)

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

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            handlers[s] = signal.signal(s, on_signal)
        try:
            self._start_diag()
            return self._loop(rfd)
        finally:
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
                self._renew_now = False
                err = self.attempt()
                now = time.monotonic()
                interval = self.cfg.renewal_interval
                if err is None:
                    next_at = now + jittered_interval(interval, self.rnd)
                    status = "renewed; next renewal in %ds" % int(next_at - now)
                    if not ready_sent:
                        self.notifier.ready(status)
                        ready_sent = True
                    else:
                        self.notifier.status(status)
                else:
                    retryable = getattr(err, "retryable", None)
                    if retryable is None:
                        retryable = not isinstance(err, (ConfigError, JoinError, OutputError))
                    if retryable:
                        delay = backoff_delay(self.consecutive_failures, interval, self.rnd)
                    else:  # needs a human (new token, config fix): try again at the normal pace
                        delay = jittered_interval(interval, self.rnd)
                    if isinstance(err, LockedError):
                        delay = max(delay, float(interval))
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


_ERRORS = {c.__name__: c for c in (AgentError, ConfigError, JoinError, RenewError, LockedError, OutputError)}


def _bot(ident) -> str:
    try:
        return "bot %s" % ident.bot_name
    except Exception:
        return "the bot"
