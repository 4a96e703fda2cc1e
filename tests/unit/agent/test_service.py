# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The service loop against a fake protocol backend: join/renew decisions, durable-before-use ordering,
failures keep the last outputs, signals, systemd notify, diagnostics, reload hooks, log hygiene."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import yaml

from machine_id_agent import config, diag, logs, outputs
from machine_id_agent.errors import JoinError, LockedError, RenewError
from machine_id_agent.identity import StorageError, UnsavedIdentityError
from machine_id_agent.notify import Notifier
from machine_id_agent.service import Agent, backoff_delay, jittered_interval

from test_outputs import make_creds  # noqa: E402  (same directory)

TOKEN = "secret-join-token-123456"


class FakeIdent:
    def __init__(self, gen, ttl=3600):
        self.generation = gen
        self.not_after = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=ttl)
        self.bot_name = "example"
        self.cluster_name = "lanyard-testbed"

    def valid(self, now=None):
        return self.not_after > (now or dt.datetime.now(dt.timezone.utc))


class FakeBackend:
    def __init__(self):
        self.stored = None
        self.hash = None
        self.calls = []
        self.fail = None
        self.join_error = None
        self.storage_error = None  # check_storage raises it (full disk)
        self.store_error = None  # store_identity raises it (the write itself fails)
        self.creds = make_creds()
        self.refusal = None  # note_token_refused: (token hash, reason) for status
        self.stale = []  # identities is_stale answers True for (locked, lost a renewal, untrusted)

    def load_identity(self, d):
        return self.stored

    def store_identity(self, d, ident, h):
        h = self.hash if h is None else h  # None keeps the stored hash (renewals), as identity.store does
        if self.store_error:
            self.calls.append(("store-failed", ident.generation))
            raise UnsavedIdentityError("cannot write the bot identity to %s: No space left on device" % d, ident, h)
        self.calls.append(("store", ident.generation))
        self.stored, self.hash = ident, h

    def check_storage(self, d):
        if self.storage_error:
            raise self.storage_error

    def stored_token_hash(self, d):
        return self.hash

    def token_hash(self, t):
        return "h:" + t

    def is_stale(self, d, ident):
        return ident in self.stale

    def note_token_refused(self, d, h, reason):
        self.refusal = (h, reason) if h else None

    def join(self, cfg):
        self.calls.append(("join", cfg.token))
        if self.join_error:
            raise self.join_error
        ident = FakeIdent(1, cfg.credential_ttl)
        self.store_identity(cfg.storage_dir, ident, self.token_hash(cfg.token))  # join.join stores before returning
        return ident

    def ping(self, addr, cfg):
        if self.fail:
            raise self.fail
        return SimpleNamespace(cluster_name="lanyard-testbed", tls_routing=True, kube_public_addr=None,
                               kube_listen_addr=None, web_addr=addr, raw={})

    def client(self, cfg, ident, facts):
        return FakeClient(self, ident)


class FakeClient:
    def __init__(self, be, ident):
        self.be, self.ident = be, ident

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def renew_identity(self, ttl):
        if self.be.fail:
            raise self.be.fail
        self.be.calls.append(("renew", self.ident.generation))
        self.ident = FakeIdent(self.ident.generation + 1, ttl)
        self.be.store_identity(None, self.ident, None)  # renew_identity stores before returning
        return self.ident

    def host_ca_pems(self):
        return self.be.creds.host_ca_pems

    def kube_credentials(self, cluster, roles, ttl):
        if self.be.fail:  # auth down, or the bot locked: every call fails
            raise self.be.fail
        self.be.calls.append(("kube", self.ident.generation, cluster))
        return self.be.creds


def make_cfg(tmp_path, **extra):
    doc = {"auth_server": "localhost:3080", "onboarding": {"token": TOKEN},
           "storage": {"directory": str(tmp_path / "bot")},
           "destinations": [{"directory": str(tmp_path / "out"), "kubernetes_cluster": "example-k8s-cluster"}],
           "acls": "off"}
    doc.update(extra)
    p = tmp_path / "tbot.yaml"
    p.write_text(yaml.safe_dump(doc))
    return config.load(p)


def _reset_logger():
    log = logs.get()
    for h in list(log.handlers):
        log.removeHandler(h)
    log.propagate = True
    log.setLevel(0)


@pytest.fixture
def logbuf():
    buf = io.StringIO()
    log = logs.setup(debug=True, stream=buf)
    yield log, buf
    _reset_logger()  # leave logging as other tests (caplog) expect it


def test_first_cycle_joins_then_renews_and_stores_before_use(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    assert agent.attempt() is None
    assert be.calls == [("join", TOKEN), ("store", 1), ("kube", 1, "example-k8s-cluster")]
    be.calls.clear()
    assert agent.attempt() is None
    # a fresh identity is not renewed: the outputs are refreshed with it
    assert be.calls == [("kube", 1, "example-k8s-cluster")]
    be.calls.clear()
    agent._force_renew = True  # what SIGUSR1 sets
    assert agent.attempt() is None
    # renewed with gen 1, gen 2 stored durably BEFORE any use of it
    assert be.calls == [("renew", 1), ("store", 2), ("kube", 2, "example-k8s-cluster")]
    assert not agent._force_renew
    assert outputs.inspect(tmp_path / "out")["valid"]
    snap = agent.snapshot()
    assert snap["ready"] and snap["renewals"] == 3 and snap["failures"] == 0
    assert snap["outputs"][0]["seconds_to_expiry"] > 3600


def test_token_change_rejoins_same_token_never(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    agent.attempt()
    agent.attempt()
    assert [c for c in be.calls if c[0] == "join"] == [("join", TOKEN)]
    agent.cfg.token = "new-token-abcdef"
    agent.attempt()
    assert [c for c in be.calls if c[0] == "join"] == [("join", TOKEN), ("join", "new-token-abcdef")]
    assert be.hash == "h:new-token-abcdef"


def test_a_refused_new_token_keeps_the_valid_identity_renewing_and_is_not_retried(tmp_path, logbuf):
    """Seen on the real bed (CI, test_paths_real): a stored hash that no longer matched the configured, spent
    token made every cycle try to join with it and fail until the identity ran out. Teleport's refusal of a
    changed token must leave the identity in hand renewing; the token is tried again only once it changes."""
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    assert agent.attempt() is None
    be.hash = "h:something-else"  # the stored hash differs from the configured token's
    be.join_error = JoinError("the proxy refused the join token: it is used, expired or unknown", needs_token=True)
    be.calls.clear()
    assert agent.attempt() is None  # the cycle succeeds with the stored identity
    assert be.calls == [("join", TOKEN), ("kube", 1, "example-k8s-cluster")]
    assert "keeping the current identity of" in logbuf[1].getvalue()
    assert TOKEN not in logbuf[1].getvalue()
    assert be.refusal == ("h:" + TOKEN, "the proxy refused the join token: it is used, expired or unknown")
    be.calls.clear()
    agent._force_renew = True
    assert agent.attempt() is None  # not tried again; the identity is renewed as usual
    assert be.calls == [("renew", 1), ("store", 2), ("kube", 2, "example-k8s-cluster")]
    be.join_error = None
    agent.cfg.token = "new-token-abcdef"  # a new token is tried
    be.calls.clear()
    assert agent.attempt() is None
    assert be.calls[0] == ("join", "new-token-abcdef") and be.hash == "h:new-token-abcdef"
    assert be.refusal is None  # joined: status no longer reports the refusal


def test_a_refused_token_with_no_valid_identity_still_fails(tmp_path, logbuf):
    be = FakeBackend()
    be.stored, be.hash = FakeIdent(7, ttl=-5), "h:old"
    be.join_error = JoinError("the proxy refused the join token: it is used, expired or unknown", needs_token=True)
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    err = agent.attempt()
    assert isinstance(err, JoinError) and err.needs_token


def test_a_refused_token_with_a_stale_identity_still_fails(tmp_path, logbuf):
    """A locked (or lost-renewal, untrusted) identity is never presented again: nothing to keep renewing, so
    Teleport's refusal of the re-enrolment token is the cycle's error, and the token is tried at every cycle."""
    be = FakeBackend()
    be.stored, be.hash = FakeIdent(7), "h:old"
    be.stale.append(be.stored)
    be.join_error = JoinError("the proxy refused the join token: it is used, expired or unknown", needs_token=True)
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    errors = [agent.attempt(), agent.attempt()]
    assert all(isinstance(err, JoinError) and err.needs_token for err in errors), errors
    assert [c[0] for c in be.calls] == ["join", "join"] and be.refusal is None


def test_the_refusal_names_the_token_that_was_sent(tmp_path, logbuf, monkeypatch):
    """The token file is read when the cycle starts and again for the join; if it changed in between, the
    refusal (not retried, noted for status) is the one of the token Teleport was actually given."""
    be = FakeBackend()
    be.stored, be.hash = FakeIdent(1), "h:old"
    be.join_error = JoinError("the proxy refused the join token: it is used, expired or unknown", needs_token=True)
    reads = iter(["token-read-first", "token-sent-to-teleport"])
    monkeypatch.setattr(config, "read_token", lambda c, required=False: next(reads))
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    assert agent.attempt() is None
    assert be.calls[0] == ("join", "token-sent-to-teleport")
    assert be.refusal[0] == "h:token-sent-to-teleport" and agent._refused_token_hash == "h:token-sent-to-teleport"


def test_an_unreachable_proxy_during_a_token_change_is_retried(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    agent.attempt()
    agent.cfg.token = "new-token-abcdef"
    be.join_error = JoinError("the proxy localhost:1: connection refused; the join can be retried")
    assert isinstance(agent.attempt(), JoinError)
    be.join_error = None
    be.calls.clear()
    assert agent.attempt() is None
    assert be.calls[0] == ("join", "new-token-abcdef")


def test_expired_identity_rejoins(tmp_path, logbuf):
    be = FakeBackend()
    be.stored, be.hash = FakeIdent(7, ttl=-5), "h:" + TOKEN
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    assert agent.attempt() is None
    assert be.calls[0] == ("join", TOKEN)


def test_failure_keeps_outputs_reports_not_ready_and_recovers(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    agent.attempt()
    before = (tmp_path / "out" / "kubeconfig.yaml").read_bytes()
    be.fail = RenewError("the auth server localhost:3025: connection refused; check that Teleport is running")
    err = agent.attempt()
    assert isinstance(err, RenewError)
    assert (tmp_path / "out" / "kubeconfig.yaml").read_bytes() == before
    snap = agent.snapshot()
    assert not snap["ready"] and "connection refused" in snap["reason"] and snap["failures"] == 1
    assert snap["outputs"][0]["valid"], "last good outputs stay valid"
    be.fail = None
    assert agent.attempt() is None and agent.snapshot()["ready"]


def test_oneshot_exit_codes(tmp_path, logbuf):
    be = FakeBackend()
    be.join_error = JoinError("the proxy rejected the join token: it was already used; create a new one")
    assert Agent(make_cfg(tmp_path), backend=be, log=logbuf[0]).run_oneshot() == 3
    be = FakeBackend()
    be.stored, be.hash = FakeIdent(3, ttl=600), "h:" + TOKEN  # old enough to be renewed
    be.fail = LockedError("bot example is locked: generation mismatch")
    assert Agent(make_cfg(tmp_path), backend=be, log=logbuf[0]).run_oneshot() == 5
    assert "generation mismatch" in logbuf[1].getvalue()
    assert Agent(make_cfg(tmp_path), backend=FakeBackend(), log=logbuf[0]).run_oneshot() == 0


def test_second_agent_on_same_storage_is_refused(tmp_path, logbuf):
    a = Agent(make_cfg(tmp_path), backend=FakeBackend(), log=logbuf[0])
    a.acquire_lock()
    try:
        from machine_id_agent.errors import ConfigError
        with pytest.raises(ConfigError, match=r"another machine-id-agent \(pid \d+\) is already running"):
            Agent(make_cfg(tmp_path), backend=FakeBackend(), log=logbuf[0]).acquire_lock()
    finally:
        a.release_lock()


def test_reload_command_runs_after_each_renewal(tmp_path, logbuf):
    marker = tmp_path / "reloads"
    cmd = [sys.executable, "-c",
           "import os; open(%r, 'a').write(os.environ['MACHINE_ID_AGENT_DESTINATION'] + '\\n')" % str(marker)]
    cfg = make_cfg(tmp_path, destinations=[{"directory": str(tmp_path / "out"), "kubernetes_cluster": "k",
                                            "reload_command": cmd}])
    agent = Agent(cfg, backend=FakeBackend(), log=logbuf[0])
    agent.attempt()
    agent.attempt()
    assert marker.read_text().splitlines() == [str(tmp_path / "out")] * 2


def test_logs_never_hold_token_or_key(tmp_path, logbuf):
    log, buf = logbuf
    be = FakeBackend()
    be.join_error = JoinError("join with token %s failed: %s" % (TOKEN, be.creds.key_pem.decode()))
    Agent(make_cfg(tmp_path), backend=be, log=log).attempt()
    log.error("join with token %s failed", TOKEN)
    text = buf.getvalue()
    assert "failed" in text
    assert TOKEN not in text and "PRIVATE KEY" not in text and "<redacted>" in text


def test_backoff_and_jitter_bounds():
    assert [backoff_delay(n, 1200, rnd=lambda: 1.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(3, 1200, rnd=lambda: 0.0) == 2.0
    assert backoff_delay(9, 5, rnd=lambda: 1.0) == 5.0
    assert 1080 <= jittered_interval(1200) <= 1200


def test_notifier_sends_ready_and_watchdog(tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_interval == 1.5
        assert n.ready("renewed")
        assert srv.recv(4096) == b"READY=1\nSTATUS=renewed\n"
        assert n.watchdog()
        assert srv.recv(4096) == b"WATCHDOG=1\n"
        assert Notifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}).watchdog_usec == 0
        assert not Notifier({}).ready("x")
    finally:
        srv.close()


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait_for(pred, what, t=10):
    """Poll ``pred`` (from a driver thread beside the agent's loop) until true, or fail naming ``what``."""
    end = time.monotonic() + t
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


def _run_beside(agent, steps, seen=None):
    """The agent's real loop in this (main) thread while ``steps(seen)`` runs in a driver thread, which ends the
    loop with SIGTERM whatever happens. Returns (exit code, seen); a driver failure is in ``seen["error"]``."""
    seen = {} if seen is None else seen

    def driver():
        try:
            steps(seen)
        except BaseException as e:  # pragma: no cover - reported by the caller's assertion
            seen["error"] = repr(e)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=driver)
    t.start()
    rc = agent.run()
    t.join()
    return rc, seen


def _datagrams(srv):
    """Every notification queued on ``srv`` (the $NOTIFY_SOCKET stand-in), decoded; closes it."""
    msgs = []
    try:
        while True:
            msgs.append(srv.recv(4096).decode())
            srv.settimeout(0.2)
    except socket.timeout:
        pass
    srv.close()
    return msgs


def test_service_loop_signals_notify_and_diag(tmp_path, logbuf):
    """The real loop in the main thread: READY/WATCHDOG over $NOTIFY_SOCKET, SIGUSR1 renews now, SIGHUP
    reloads (new token => re-join), /readyz and /metrics track it, SIGTERM exits 0."""
    port = _free_port()
    cfg = make_cfg(tmp_path, renewal_interval="50s", certificate_ttl="10m", diag_addr="127.0.0.1:%d" % port)
    be = FakeBackend()
    sock_path = str(tmp_path / "n.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(10)
    notifier = Notifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"})
    agent = Agent(cfg, backend=be, notifier=notifier, log=logbuf[0])

    def steps(seen):
        wait_for = _wait_for
        wait_for(lambda: agent.renewals == 1, "first renewal")
        seen["ready1"] = _get("http://127.0.0.1:%d/readyz" % port)
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: agent.renewals == 2, "SIGUSR1 renewal")
        doc = yaml.safe_load(open(cfg.source))
        doc["onboarding"]["token"] = "second-token-7890"
        open(cfg.source, "w").write(yaml.safe_dump(doc))
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: agent.renewals == 3, "SIGHUP renewal")
        be.fail = RenewError("auth down")
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: agent.failures >= 1, "failure")
        seen["notready"] = _get("http://127.0.0.1:%d/readyz" % port)
        seen["metrics"] = _get("http://127.0.0.1:%d/metrics" % port)
        seen["livez"] = _get("http://127.0.0.1:%d/livez" % port)

    rc, seen = _run_beside(agent, steps)
    msgs = _datagrams(srv)
    assert "error" not in seen, seen.get("error")
    assert rc == 0
    assert seen["ready1"][0] == 200
    assert [c for c in be.calls if c[0] == "join"] == [("join", TOKEN), ("join", "second-token-7890")]
    code, body = seen["notready"]
    assert code == 503 and "auth down" in json.loads(body)["reason"]
    assert seen["livez"][0] == 200
    m = seen["metrics"][1]
    assert "machine_id_agent_renewals_total 3" in m and "machine_id_agent_renewal_failures_total 1" in m
    assert 'machine_id_agent_seconds_to_expiry{destination="%s",kubernetes_cluster="example-k8s-cluster"}' % (
        tmp_path / "out") in m
    assert any(x.startswith("READY=1") for x in msgs), msgs
    assert "WATCHDOG=1\n" in msgs
    assert any("RELOADING=1" in x for x in msgs) and any("STOPPING=1" in x for x in msgs)
    reloading = next(i for i, x in enumerate(msgs) if "RELOADING=1" in x)
    assert any(x.startswith("READY=1") for x in msgs[reloading + 1:]), "no READY=1 after RELOADING=1"
    assert TOKEN not in logbuf[1].getvalue() and "second-token-7890" not in logbuf[1].getvalue()


def test_a_dropped_ready_is_sent_again_after_the_next_good_cycle(tmp_path, logbuf):
    """READY=1 that could not be delivered (systemd's queue full, see Notifier.send_timeout) would leave the unit
    'activating' until systemd gives up: the loop sends it again after its next good cycle."""
    class Flaky(Notifier):
        def __init__(self):
            super().__init__({})
            self.addr = "\0unused"  # enabled; send() is not used below
            self.readies = []

        def send(self, **fields):
            if "READY" in fields:
                self.readies.append(fields.get("STATUS"))
                return len(self.readies) > 1  # the first READY=1 is dropped
            return True

    cfg = make_cfg(tmp_path, renewal_interval="50s", certificate_ttl="10m")
    notifier = Flaky()
    agent = Agent(cfg, backend=FakeBackend(), notifier=notifier, log=logbuf[0])

    def steps(seen):
        _wait_for(lambda: agent.renewals == 1, "first renewal")
        seen["after_first"] = list(notifier.readies)
        os.kill(os.getpid(), signal.SIGUSR1)
        _wait_for(lambda: agent.renewals == 2, "SIGUSR1 renewal")
        os.kill(os.getpid(), signal.SIGUSR1)
        _wait_for(lambda: agent.renewals == 3, "another renewal")

    rc, seen = _run_beside(agent, steps)
    assert "error" not in seen, seen.get("error")
    assert rc == 0
    assert len(seen["after_first"]) == 1
    assert len(notifier.readies) == 2 and all(r.startswith("renewed") for r in notifier.readies), notifier.readies


def test_metrics_text_format():
    text = diag.render_metrics({"renewals": 2, "failures": 1, "ready": True,
                                "outputs": [{"destination": '/a"b', "kubernetes_cluster": "k",
                                             "seconds_to_expiry": 5}]})
    assert "# TYPE machine_id_agent_renewals_total counter" in text
    assert 'machine_id_agent_seconds_to_expiry{destination="/a\\"b",kubernetes_cluster="k"} 5' in text
    assert text.endswith("\n")


def test_service_cycle_runs_in_process_and_reports_back(tmp_path, logbuf):
    """The service runs each cycle in a thread of its own process (no forked worker): results and error
    classes come back unchanged."""
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0], isolate=True)
    assert agent.attempt() is None
    assert be.calls == [("join", TOKEN), ("store", 1), ("kube", 1, "example-k8s-cluster")], "same process"
    snap = agent.snapshot()
    assert snap["ready"] and snap["renewals"] == 1 and snap["outputs"][0]["valid"]
    assert snap["identity_seconds_to_expiry"] > 3000
    assert outputs.inspect(tmp_path / "out")["valid"]
    be.stored, be.hash = FakeIdent(4, ttl=600), "h:" + TOKEN
    be.fail = LockedError("bot example is locked: generation mismatch")
    err = agent.attempt()
    assert isinstance(err, LockedError) and err.retryable is False and err.exit_code == 5
    assert "generation mismatch" in str(err)
    be.fail = RenewError("auth down", retryable=True)
    err = agent.attempt()
    assert isinstance(err, RenewError) and not isinstance(err, LockedError) and err.retryable is True
    assert not agent.snapshot()["ready"]


def test_new_agent_waits_for_a_dead_agents_worker(tmp_path, logbuf):
    """A lock held by a process whose recorded owner is dead (an orphaned worker) is waited for, not
    reported as a second agent."""
    import fcntl
    import subprocess as sp
    cfg = make_cfg(tmp_path)
    lock = cfg.storage_dir / "agent.lock"
    cfg.storage_dir.mkdir(mode=0o700, parents=True)
    lock.write_text("999999999\n")  # no such pid: the agent that wrote it is gone
    holder = sp.Popen([sys.executable, "-c", "import fcntl,time,sys; f=open(sys.argv[1],'r+'); "
                       "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.5)", str(lock)],
                      stdout=sp.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    a = Agent(cfg, backend=FakeBackend(), log=logbuf[0])
    a.acquire_lock()
    waited = time.monotonic() - t0
    a.release_lock()
    holder.wait()
    assert 0.5 < waited < 10, waited
    assert fcntl is not None


def test_journald_format_has_priority_and_no_timestamp(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    log = logs.setup(stream=buf)
    log.warning("disk %s", "full")
    assert buf.getvalue() == "<4>WARNING: disk full\n"
    monkeypatch.delenv("JOURNAL_STREAM")
    buf2 = io.StringIO()
    logs.setup(stream=buf2).info("x")
    _reset_logger()
    assert buf2.getvalue().endswith(" INFO: x\n") and buf2.getvalue()[:4].isdigit()


def test_reload_with_a_bad_file_keeps_the_old_config(tmp_path, logbuf):
    cfg = make_cfg(tmp_path)
    agent = Agent(cfg, backend=FakeBackend(), log=logbuf[0])
    cfg.source.write_text("auth_server: [broken\n")
    agent.reload_config()
    assert agent.cfg is cfg
    assert "reload:" in logbuf[1].getvalue() and "keeping the previous configuration" in logbuf[1].getvalue()


def test_watchdog_fed_while_a_worker_makes_progress(tmp_path, logbuf):
    class Slow(FakeBackend):
        def client(self, cfg, ident, facts):
            time.sleep(0.8)
            return FakeClient(self, ident)
    sock_path = str(tmp_path / "wd.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(0.1)
    got = []
    done = threading.Event()

    def read():  # systemd's side: reads as the pings come (the queue holds only max_dgram_qlen of them)
        while not done.is_set():
            try:
                got.append(srv.recv(64))
            except socket.timeout:
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        notifier = Notifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"})
        agent = Agent(make_cfg(tmp_path), backend=Slow(), notifier=notifier, log=logbuf[0], isolate=True)
        assert agent.attempt() is None
    finally:
        done.set()
        reader.join(5)
        srv.close()
    assert got.count(b"WATCHDOG=1\n") >= 4, got


def test_a_full_notify_queue_drops_the_notification_instead_of_blocking(tmp_path):
    """Seen in a unit test under load: with nobody reading $NOTIFY_SOCKET, the 11th watchdog ping (the
    kernel's default max_dgram_qlen is 10) blocked the service loop forever. A notification now waits at most
    Notifier.send_timeout for room, then is dropped."""
    sock_path = str(tmp_path / "full.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    try:
        n = Notifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"})
        n.send_timeout = 0.05
        sent = 0
        while n.watchdog():  # until the queue is full (max_dgram_qlen messages)
            sent += 1
            assert sent < 100000, "the queue never filled"
        assert sent >= 1
        t0 = time.monotonic()
        assert n.ready("renewed") is False
        assert time.monotonic() - t0 < 2
        assert srv.recv(64) == b"WATCHDOG=1\n"  # what fitted was delivered
    finally:
        srv.close()


# --- issue 11 point 3: renew only when due, storage checked first, nothing the server counted is dropped ------
def test_renewal_due_rule(tmp_path, logbuf):
    """Due when the remaining lifetime is at most credential_ttl - 0.9 x renewal_interval (1h / 20m: 2520 s),
    or when forced (SIGUSR1)."""
    agent = Agent(make_cfg(tmp_path), backend=FakeBackend(), log=logbuf[0])
    now = dt.datetime.now(dt.timezone.utc)
    fresh = SimpleNamespace(not_after=now + dt.timedelta(seconds=3600))
    assert not agent.renewal_due(fresh, now)
    assert not agent.renewal_due(SimpleNamespace(not_after=now + dt.timedelta(seconds=2521)), now)
    assert agent.renewal_due(SimpleNamespace(not_after=now + dt.timedelta(seconds=2520)), now)
    assert agent.renewal_due(SimpleNamespace(not_after=now + dt.timedelta(seconds=10)), now)
    agent._force_renew = True
    assert agent.renewal_due(fresh, now)


def test_restarts_with_a_fresh_identity_never_renew(tmp_path, logbuf):
    be = FakeBackend()
    assert Agent(make_cfg(tmp_path), backend=be, log=logbuf[0]).attempt() is None
    for _n in range(50):  # 50 restarts: a new Agent each time, identity loaded from "disk"
        assert Agent(make_cfg(tmp_path), backend=be, log=logbuf[0]).attempt() is None
    assert [c for c in be.calls if c[0] in ("renew", "join")] == [("join", TOKEN)]
    assert be.stored.generation == 1


def test_sigusr1_forces_a_renewal_sighup_does_not(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    agent.attempt()
    be.calls.clear()
    agent._renew_now = True  # SIGHUP after the reload: a cycle, no forced renewal
    agent.attempt()
    assert not [c for c in be.calls if c[0] == "renew"]
    agent._force_renew = True  # SIGUSR1
    agent.attempt()
    assert [c for c in be.calls if c[0] == "renew"] == [("renew", 1)]


def test_full_storage_skips_the_renewal_keeps_outputs_fresh_and_recovers(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    agent.attempt()
    be.stored = FakeIdent(1, ttl=600)  # due
    be.calls.clear()
    be.storage_error = StorageError("storage /x: only 12 KiB free, a renewal needs 320 KiB; not renewing")
    err = agent.attempt()
    assert isinstance(err, StorageError) and "only 12 KiB free" in str(err)
    assert be.calls == [("kube", 1, "example-k8s-cluster")], "no renewal asked, outputs still refreshed"
    snap = agent.snapshot()
    assert not snap["ready"] and "only 12 KiB free" in snap["reason"]
    assert snap["outputs"][0]["valid"]
    be.storage_error = None  # space returns: the next (backoff) attempt renews by itself
    be.calls.clear()
    assert agent.attempt() is None
    assert be.calls == [("renew", 1), ("store", 2), ("kube", 2, "example-k8s-cluster")]
    assert agent.snapshot()["ready"]


def test_full_storage_never_spends_the_token(tmp_path, logbuf):
    be = FakeBackend()
    be.storage_error = StorageError("storage /x: no space left")
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    assert isinstance(agent.attempt(), StorageError)
    assert be.calls == []


def test_unsaved_renewal_is_kept_in_memory_used_and_stored_later(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    agent.attempt()
    be.stored = FakeIdent(1, ttl=600)
    be.calls.clear()
    be.store_error = True
    err = agent.attempt()
    assert isinstance(err, UnsavedIdentityError)
    assert be.calls == [("renew", 1), ("store-failed", 2), ("kube", 2, "example-k8s-cluster")]
    assert be.stored.generation == 1  # the disk still holds the old one ...
    be.calls.clear()
    agent._force_renew = True
    err = agent.attempt()  # ... which is never presented again: gen 2 from memory, no renewal on top of it
    assert isinstance(err, UnsavedIdentityError)
    assert be.calls == [("store-failed", 2), ("kube", 2, "example-k8s-cluster")]
    be.store_error = None
    be.calls.clear()
    assert agent.attempt() is None  # stored first; then the forced renewal goes on from gen 2
    assert be.calls == [("store", 2), ("renew", 2), ("store", 3), ("kube", 3, "example-k8s-cluster")]


def test_unsaved_join_is_kept_and_the_token_not_spent_again(tmp_path, logbuf):
    be = FakeBackend()
    be.store_error = True
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    assert isinstance(agent.attempt(), UnsavedIdentityError)
    assert be.calls == [("join", TOKEN), ("store-failed", 1), ("kube", 1, "example-k8s-cluster")]
    be.calls.clear()
    assert isinstance(agent.attempt(), UnsavedIdentityError)
    assert [c for c in be.calls if c[0] == "join"] == []
    be.store_error = None
    assert agent.attempt() is None
    assert be.stored.generation == 1 and be.hash == "h:" + TOKEN


def test_lost_renewal_is_not_presented_outputs_keep_working(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    agent.attempt()
    be.stored = FakeIdent(1, ttl=600)
    be.calls.clear()
    be.fail = None

    class LostClient(FakeClient):
        def renew_identity(self, ttl):
            raise LockedError("the bot identity in /x lost a renewal: ...; needs re-enrolment", lost_renewal=True)
    be.client = lambda cfg, ident, facts: LostClient(be, ident)
    err = agent.attempt()
    assert isinstance(err, LockedError) and "lost a renewal" in str(err) and err.exit_code == 5
    assert be.calls == [("kube", 1, "example-k8s-cluster")]
    assert outputs.inspect(tmp_path / "out")["valid"]


# --- issue 11 point 7: the token file is read when a join needs it ---------------------------------------------
def test_token_file_deleted_restart_keeps_renewing_new_token_picked_up(tmp_path, logbuf):
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    be = FakeBackend()
    cfg = make_cfg(tmp_path, onboarding={"token": str(tok)})
    assert Agent(cfg, backend=be, log=logbuf[0]).attempt() is None
    assert be.calls[0] == ("join", TOKEN)
    tok.unlink()  # the spent token is deleted; a restart loads the config without it
    cfg = make_cfg(tmp_path, onboarding={"token": str(tok)})
    assert cfg.token is None and cfg.token_path == tok
    agent = Agent(cfg, backend=be, log=logbuf[0])
    agent._force_renew = True
    assert agent.attempt() is None
    assert [c[0] for c in be.calls].count("renew") == 1 and [c[0] for c in be.calls].count("join") == 1
    # identity expired and no token: one clear line naming the file
    be.stored = FakeIdent(2, ttl=-5)
    err = agent.attempt()
    assert err is not None and "token file %s does not exist" % tok in str(err)
    # a new token written later is used at the next cycle, without a restart
    tok.write_text("second-token-abcdef\n")
    assert agent.attempt() is None
    assert be.calls[-2:] == [("store", 1), ("kube", 1, "example-k8s-cluster")]
    assert ("join", "second-token-abcdef") in be.calls and be.hash == "h:second-token-abcdef"
    assert "second-token-abcdef" not in logbuf[1].getvalue()


def test_a_ca_rotation_step_renews_identity_and_outputs_even_mid_cycle(tmp_path, logbuf):
    """RotationWatcher.renew -> Agent.request_renewal from another thread: the loop wakes at once and runs a cycle
    that renews the (fresh) bot identity; a request that arrives while a cycle runs is not lost to it."""
    cfg = make_cfg(tmp_path, renewal_interval="50s", certificate_ttl="10m", watch_ca_rotations=False)
    be = FakeBackend()
    agent = Agent(cfg, backend=be, log=logbuf[0])
    seen = {}
    gate = threading.Event()
    orig_kube = FakeClient.kube_credentials

    def slow_kube(self, cluster, roles, ttl):
        if seen.get("hold"):
            seen["held"] = True
            gate.wait(10)
        return orig_kube(self, cluster, roles, ttl)

    def steps(seen):
        wait_for = _wait_for
        wait_for(lambda: agent.renewals == 1, "first cycle")
        renews = len([c for c in be.calls if c[0] == "renew"])
        agent.request_renewal("host CA rotation in phase init")
        wait_for(lambda: agent.renewals == 2, "the rotation cycle")
        seen["renewed"] = len([c for c in be.calls if c[0] == "renew"]) - renews
        seen["hold"] = True
        agent.request_renewal("user CA rotation in phase update_clients")  # cycle 3, held in its outputs
        wait_for(lambda: seen.get("held"), "cycle 3 running")
        seen["hold"] = False
        agent.request_renewal("user CA rotation in phase update_servers")  # arrives mid-cycle
        gate.set()
        wait_for(lambda: agent.renewals == 4, "the request that came mid-cycle")
        seen["renewed_after"] = len([c for c in be.calls if c[0] == "renew"]) - renews

    FakeClient.kube_credentials = slow_kube
    try:
        rc, seen = _run_beside(agent, steps, seen)
    finally:
        FakeClient.kube_credentials = orig_kube
    assert "error" not in seen, seen.get("error")
    assert rc == 0 and seen["renewed"] == 1, "a fresh identity renewed for the rotation step"
    assert seen["renewed_after"] == 3, "one renewal per request, none lost"
    log = logbuf[1].getvalue()
    assert "for a CA rotation: host CA rotation in phase init" in log
    assert "update_servers" in log


@pytest.mark.parametrize("case", ["spent-token", "expired", "locked"])
def test_start_that_only_a_new_token_can_fix_exits_78_at_once(tmp_path, logbuf, case):
    """A service that never got ready and needs a new join token exits with status 78 on the first cycle (the
    unit's RestartPreventExitStatus=): it does not sit in "activating", holding up boot, until TimeoutStartSec."""
    be = FakeBackend()
    if case == "spent-token":  # storage wiped, the token already used: the server refuses it
        be.join_error = JoinError("the proxy p:443 refused the join token: it is used, expired or unknown (x); fix",
                                  needs_token=True)
    elif case == "expired":
        be.stored, be.hash = FakeIdent(4, ttl=600), "h:" + TOKEN
        be.fail = RenewError("the bot identity in /x expired at ... and cannot be renewed; a fresh join is needed",
                             retryable=False, needs_token=True)
    else:
        be.stored, be.hash = FakeIdent(4, ttl=600), "h:" + TOKEN
        be.fail = LockedError("bot example is locked: generation mismatch")
    sock_path = str(tmp_path / "n.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(0.5)
    agent = Agent(make_cfg(tmp_path), backend=be, notifier=Notifier({"NOTIFY_SOCKET": sock_path}), log=logbuf[0])
    t0 = time.monotonic()
    assert agent.run() == 78
    assert time.monotonic() - t0 < 10
    msgs = _datagrams(srv)
    assert not any(m.startswith("READY=1") for m in msgs), msgs
    assert any("needs a new join token" in m for m in msgs), msgs
    assert "exiting with status 78" in logbuf[1].getvalue()
    assert TOKEN not in logbuf[1].getvalue()


def test_start_keeps_retrying_what_may_pass_and_a_ready_agent_never_exits(tmp_path, logbuf):
    """Auth down at start: no exit (retried with back-off). A ready agent whose bot is then locked keeps running
    (its status, metrics and last good outputs stay), only SIGTERM ends it."""
    be = FakeBackend()
    be.fail = RenewError("the auth server localhost:3025: connection refused")
    be.stored, be.hash = FakeIdent(2, ttl=600), "h:" + TOKEN
    agent = Agent(make_cfg(tmp_path, renewal_interval="50s"), backend=be, log=logbuf[0])

    def steps(seen):
        _wait_for(lambda: agent.failures >= 1, "first failure")
        be.fail = None
        os.kill(os.getpid(), signal.SIGUSR1)
        _wait_for(lambda: agent.renewals >= 1, "renewal once auth is back")
        be.fail = LockedError("bot example is locked: generation mismatch")
        os.kill(os.getpid(), signal.SIGUSR1)
        _wait_for(lambda: agent.failures >= 2, "locked")
        time.sleep(0.3)
        seen["alive"] = True

    rc, seen = _run_beside(agent, steps)
    assert "error" not in seen, seen.get("error")
    assert rc == 0 and seen["alive"]
