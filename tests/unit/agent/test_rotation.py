# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""CA rotations: the watch that asks for a renewal at every rotation step, and the recovery after a rotation the
agent missed, against the stand-in auth server of test_renew (grpcio, mTLS, WatchEvents and GetCertAuthority as
v13 serves them). The same on the real Teleport: tests/integration/agent/test_rotation_real.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from machine_id_agent import identity as ident
from machine_id_agent import renew, rotation, webapi
from machine_id_agent.cli import status_doc
from machine_id_agent.errors import LockedError, RenewError
from machine_id_agent.rotation import CAState, changed

from test_renew import CA, CLUSTER, FakeAuth, cfg  # noqa: F401 - the stand-in server and its config


@pytest.fixture
def auth():
    a = FakeAuth()
    yield a
    a.stop()


def wait_for(pred, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s" % what)


# --- decisions ----------------------------------------------------------------------------------------------
def test_every_phase_change_needs_fresh_credentials_and_the_first_look_only_during_a_rotation():
    idle = CAState("host", "standby", "standby", "", "r1")
    assert not changed(None, CAState("host")), "a CA never rotated: nothing to do at start"
    assert not changed(None, idle), "a finished rotation seen at start: the start cycle handles it"
    assert changed(None, CAState("user", "in_progress", "update_clients", "manual", "r2")), "started mid-rotation"
    steps = ["init", "update_clients", "update_servers", "standby", "rollback"]
    prev = idle
    for phase in steps:
        cur = CAState("host", "in_progress", phase, "manual", "r2")
        assert changed(prev, cur), phase
        assert not changed(cur, cur), "the same state twice (an event and the read after reconnecting)"
        prev = cur
    assert changed(CAState("host", "standby", "standby", "", "r1"), CAState("host", "standby", "standby", "", "r2")), \
        "a whole rotation passed between two looks"


# --- the watch, against the stand-in server --------------------------------------------------------------
@pytest.fixture
def watched(tmp_path, auth, monkeypatch):
    """A RotationWatcher on the stand-in server; ``asked`` collects the renewal reasons."""
    monkeypatch.setattr(rotation, "DEBOUNCE", 0.3)
    monkeypatch.setattr(rotation, "RETRY_MIN", 0.05)
    c = cfg(tmp_path, auth)
    box = {"ident": auth.join()}
    asked = []
    w = rotation.RotationWatcher(lambda: (c, box["ident"], None), renew.AuthClient, asked.append)
    w.start()
    wait_for(lambda: w.connected, what="the watch to open")
    yield SimpleNamespace(w=w, asked=asked, box=box, cfg=c)
    w.stop()


def test_each_rotation_step_asks_for_one_renewal(watched, auth):
    w, asked = watched.w, watched.asked
    req = auth.watch_requests[0]
    assert [k.kind for k in req.kinds] == ["cert_authority"]
    assert {(f.key, f.value) for f in req.kinds[0].filter} == {("host", CLUSTER), ("user", CLUSTER)}
    time.sleep(0.5)
    assert asked == [], "no renewal without a rotation"
    for n, phase in enumerate(["init", "update_clients", "update_servers", "standby"], 1):
        auth.rotate("host", phase)
        wait_for(lambda: len(asked) == n, what="the renewal for %s" % phase)
        assert ("phase %s" % phase in asked[-1]) if phase != "standby" else "rotated" in asked[-1]
    auth.rotate("user", "update_clients", rid="rot-2")
    wait_for(lambda: len(asked) == 5, what="the renewal for the user CA")
    assert "user CA rotation in phase update_clients" in asked[-1]
    time.sleep(0.6)
    assert len(asked) == 5 and w.events == 5


def test_steps_close_together_make_one_renewal(watched, auth):
    auth.rotate("host", "init")
    auth.rotate("host", "update_clients")
    wait_for(lambda: len(watched.asked) == 1, what="one renewal")
    time.sleep(0.6)
    assert len(watched.asked) == 1 and "init" in watched.asked[0] and "update_clients" in watched.asked[0]


def test_a_step_passed_while_the_stream_was_down_is_caught_on_reconnect(watched, auth):
    """Teleport reloads its services at phase changes and drops the stream: the phase that passed meanwhile is
    read (GetCertAuthority) once the watch is back."""
    opens = auth.watch_opens
    auth.rotate("user", "update_clients", notify=False)  # no event reaches the agent ...
    auth.drop_watchers()  # ... and the stream breaks
    wait_for(lambda: auth.watch_opens > opens and watched.w.connected, what="the watch to reopen")
    wait_for(lambda: len(watched.asked) == 1, what="the renewal for the missed step")
    assert "user CA rotation in phase update_clients" in watched.asked[0]


def test_the_watch_reopens_with_the_renewed_identity(watched, auth):
    opens = auth.watch_opens
    watched.box["ident"] = auth.join()  # what the agent holds after a renewal
    wait_for(lambda: auth.watch_opens == opens + 1 and watched.w.connected, what="the watch to reopen")
    assert watched.asked == []


def test_starting_in_the_middle_of_a_rotation_renews_once(tmp_path, auth, monkeypatch):
    monkeypatch.setattr(rotation, "DEBOUNCE", 0.1)
    auth.rotate("user", "update_clients", notify=False)
    asked = []
    c = cfg(tmp_path, auth)
    idt = auth.join()
    w = rotation.RotationWatcher(lambda: (c, idt, None), renew.AuthClient, asked.append)
    w.start()
    try:
        wait_for(lambda: len(asked) == 1, what="one renewal")
        assert "found at start" in asked[0]
        time.sleep(0.4)
        assert len(asked) == 1
        assert w.view()["watching"] and "update_clients" in w.view()["cas"]["user"]
    finally:
        w.stop()


def test_a_watch_that_keeps_failing_retries_with_backoff_and_stays_quiet(tmp_path, auth, monkeypatch, caplog):
    monkeypatch.setattr(rotation, "RETRY_MIN", 0.01)
    monkeypatch.setattr(rotation, "RETRY_MAX", 0.02)
    c = cfg(tmp_path, auth)
    idt = auth.join()
    auth.stop()  # nothing answers
    w = rotation.RotationWatcher(lambda: (c, idt, None), renew.AuthClient, lambda r: None)
    with caplog.at_level("DEBUG", logger="machine_id_agent.rotation"):
        w.start()
        time.sleep(1.0)
        w.stop()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "watching again" in warnings[0].getMessage()
    assert not w.connected and "cannot reach" in w.last_error


# --- a host CA rotation the agent missed -------------------------------------------------------------------
def _restart_with(auth, host_ca=None, user_ca=None):
    auth.stop()
    if host_ca is not None:
        auth.host_ca = host_ca
    if user_ca is not None:
        auth.user_ca = user_ca
    auth._start()


def test_missed_host_rotation_recovers_through_the_proxys_verified_answer(tmp_path, auth, monkeypatch):
    idt = auth.join()
    old_host = auth.host_ca
    _restart_with(auth, host_ca=CA())  # the whole rotation happened while the agent was stopped
    c = cfg(tmp_path, auth, ca_pins=[])
    asked = []

    def export(addr, ca_path=None, insecure=False, timeout=10):
        asked.append((addr, ca_path, insecure))
        return [auth.host_ca.pem]

    monkeypatch.setattr(webapi, "export_host_cas", export)
    facts = SimpleNamespace(web_addr="proxy.example:443", server_version="13.3.8", cluster_name=CLUSTER)
    with renew.AuthClient(c, idt, facts) as client:
        assert client.ensure_trust().startswith("the host CA served by the proxy proxy.example:443")
        assert asked == [("proxy.example:443", None, False)]
        assert auth.host_ca.pem in client.identity.tls_ca_pems and old_host.pem not in client.identity.tls_ca_pems
        assert auth.user_ca.pem in client.identity.tls_ca_pems, "the user CA that signed the bot is kept"
        new = client.renew_identity(3600)  # the cycle renews: the new trust reaches the disk
    assert ident.load(c.storage_dir).tls_ca_pems == new.tls_ca_pems
    note = rotation.read_trust_note(c.storage_dir)
    assert note["state"] == "recovered" and "proxy.example:443" in note["how"]


def test_missed_host_rotation_refuses_a_ca_that_did_not_sign_the_server(tmp_path, auth, monkeypatch):
    idt = auth.join()
    _restart_with(auth, host_ca=CA())
    c = cfg(tmp_path, auth)
    ident.store(c.storage_dir, idt, None)
    monkeypatch.setattr(webapi, "export_host_cas", lambda *a, **k: [CA().pem])  # a CA of the right name, wrong key
    facts = SimpleNamespace(web_addr="proxy.example:443", server_version="13.3.8", cluster_name=CLUSTER)
    with pytest.raises(RenewError) as err:
        with renew.AuthClient(c, idt, facts) as client:
            client.ensure_trust()
    assert not err.value.retryable and "did not sign that certificate either" in str(err.value)
    assert "re-enrol" in str(err.value)
    doc = status_doc(SimpleNamespace(storage_dir=c.storage_dir, outputs=[], token=None, token_path=None))
    assert doc["identity"]["state"] == "untrusted" and "re-enrol" in doc["identity"]["fix"]


@pytest.mark.parametrize("case", ["insecure", "no proxy, no pins"])
def test_missed_host_rotation_without_a_safe_path_is_untrusted(tmp_path, auth, monkeypatch, case):
    idt = auth.join()
    _restart_with(auth, host_ca=CA())
    monkeypatch.setattr(webapi, "export_host_cas", lambda *a, **k: pytest.fail("must not be asked"))
    if case == "insecure":
        c = cfg(tmp_path, auth, insecure=True, ca_pins=[])
        facts = SimpleNamespace(web_addr="proxy.example:443", server_version="13.3.8", cluster_name=CLUSTER)
    else:
        c, facts = cfg(tmp_path, auth, ca_pins=[]), None
    with pytest.raises(RenewError) as err:
        with renew.AuthClient(c, idt, facts) as client:
            client.ensure_trust()
    e = str(err.value)
    assert not err.value.retryable and "cannot re-establish that trust safely" in e and "Re-enrol" in e
    assert rotation.read_trust_note(c.storage_dir)["state"] == "untrusted"


def test_missed_host_rotation_recovers_through_updated_pins(tmp_path, auth, monkeypatch):
    from machine_id_agent import join

    idt = auth.join()
    new_host = CA()
    _restart_with(auth, host_ca=new_host)
    monkeypatch.setattr(join, "fetch_cluster_cas", lambda addr, timeout=15: [new_host.pem])
    c = cfg(tmp_path, auth, ca_pins=[ident.spki_pin(new_host.pem)])
    with renew.AuthClient(c, idt, None) as client:
        assert "matched against ca_pins" in client.ensure_trust()
    stale = cfg(tmp_path / "other", auth, ca_pins=["sha256:" + "0" * 64])  # pins not updated: refused
    with pytest.raises(RenewError) as err:
        with renew.AuthClient(stale, idt, None) as client:
            client.ensure_trust()
    assert "does not match ca_pins" in str(err.value) and not err.value.retryable


# --- a user CA rotation the agent missed --------------------------------------------------------------------
def proxy_serving(user_ca_pem, served=None):
    """webapi.request_bytes of a proxy that serves only the user CA export."""
    def request_bytes(addr, method, path, body=None, **kw):
        if served is not None:
            served.append(path)
        if path == rotation.EXPORT_USER_CA_PATH:
            return user_ca_pem
        raise webapi.WebAPIError("the proxy %s: not served in this test" % addr, retryable=False)
    return request_bytes


def test_missed_user_rotation_marks_the_identity_untrusted(tmp_path, auth, monkeypatch):
    monkeypatch.setattr(rotation, "USER_CA_GONE_AFTER", 0.0)
    idt = auth.join()
    new_user = CA()
    _restart_with(auth, user_ca=new_user)  # the server now refuses the bot's certificate in the handshake
    c = cfg(tmp_path, auth)
    ident.store(c.storage_dir, idt, None)
    served = []

    monkeypatch.setattr(webapi, "request_bytes", proxy_serving(new_user.pem, served))
    facts = SimpleNamespace(web_addr="proxy.example:443", server_version="13.3.8", cluster_name=CLUSTER)
    with pytest.raises(LockedError) as err:
        with renew.AuthClient(c, idt, facts) as client:
            client.renew_identity(3600)
    assert rotation.EXPORT_USER_CA_PATH in served
    assert err.value.details.get("untrusted") and "user CA" in str(err.value) and "re-enrol" in str(err.value)
    assert ident.stale_reason(c.storage_dir, idt) == ident.STALE_UNTRUSTED
    n = len(auth.requests)
    with pytest.raises(LockedError):  # never presented again
        with renew.AuthClient(c, idt, facts) as client:
            client.renew_identity(3600)
    assert len(auth.requests) == n
    doc = status_doc(SimpleNamespace(storage_dir=c.storage_dir, outputs=[], token=None, token_path=None))
    assert doc["identity"]["state"] == "untrusted"


def test_one_failure_during_a_live_user_rotation_is_no_proof(tmp_path, auth, monkeypatch):
    """update_clients .. update_servers: the proxy exports only the new user CA while the old one is still
    trusted, and Teleport's reloads break connections. Only failures with no success in between for
    USER_CA_GONE_AFTER seconds mark the identity."""
    monkeypatch.setattr(rotation, "USER_CA_GONE_AFTER", 1.2)
    idt = auth.join()
    new_user = CA()
    _restart_with(auth, user_ca=new_user)
    c = cfg(tmp_path, auth)
    ident.store(c.storage_dir, idt, None)
    monkeypatch.setattr(webapi, "request_bytes", proxy_serving(new_user.pem))
    facts = SimpleNamespace(web_addr="proxy.example:443", server_version="13.3.8", cluster_name=CLUSTER)

    def attempt():
        with renew.AuthClient(c, idt, facts) as client:
            client.renew_identity(3600)

    with pytest.raises(RenewError) as err:
        attempt()
    assert err.value.retryable and not isinstance(err.value, LockedError) and "checking again" in str(err.value)
    assert 1.0 <= err.value.details["retry_after"] <= 2.3, "the next look is due when the 1.2 s are up"
    assert ident.stale_reason(c.storage_dir, idt) is None
    assert (c.storage_dir / rotation.SUSPECT_FILE).exists(), "kept on disk: a restart does not reset the clock"
    rotation.user_ca_ok(c.storage_dir)  # a success in between (the old CA was still trusted): the clock starts over
    assert not (c.storage_dir / rotation.SUSPECT_FILE).exists()
    time.sleep(1.3)
    with pytest.raises(RenewError) as err:
        attempt()
    assert err.value.retryable and ident.stale_reason(c.storage_dir, idt) is None
    time.sleep(1.3)  # failures only, for longer than USER_CA_GONE_AFTER: now it is proof
    with pytest.raises(LockedError):
        attempt()
    assert ident.stale_reason(c.storage_dir, idt) == ident.STALE_UNTRUSTED


def test_a_dropped_connection_is_not_taken_for_a_user_rotation(tmp_path, auth, monkeypatch):
    """The proxy still serves the CA that signed the identity: an ordinary failure, retried; nothing marked."""
    idt = auth.join()
    _restart_with(auth, user_ca=CA())
    c = cfg(tmp_path, auth)
    monkeypatch.setattr(webapi, "request_bytes", proxy_serving(idt.tls_ca_pems[0]))  # the old user CA: still served
    facts = SimpleNamespace(web_addr="proxy.example:443", server_version="13.3.8", cluster_name=CLUSTER)
    with pytest.raises(RenewError) as err:
        with renew.AuthClient(c, idt, facts) as client:
            client.renew_identity(3600)
    assert not isinstance(err.value, LockedError) and err.value.retryable
    assert ident.stale_reason(c.storage_dir, idt) is None


def test_threads_left_behind():
    """No watch thread outlives its watcher (the tests above stop theirs)."""
    assert not [t for t in threading.enumerate() if t.name == "ca-rotation-watch" and t.is_alive()]
