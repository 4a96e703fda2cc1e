# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""playbooks/rollout.yml on the real test bed with real systemd hosts (issue: fleet rollout).

One private bed (TLS routing) and a fleet of systemd-nspawn hosts; the steps run in order:
check mode on a fresh fleet -> first rollout (batches of 2 set in the inventory) -> no-change rerun, check mode
and each tag alone -> ACL drift -> re-enrolment: a host unreachable, then back with an expired identity, and a
wiped host, in one batch under one tag -> a lost renewal and a locked bot -> a 4th host (the default ramp: a
canary first) -> one host removed -> a host unreachable in the first batch stops the rollout -> a dead host
marked absent is revoked on the control plane.

Batches are read from the run itself (when each host started and finished the rollout play's tasks), never from
the variable.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import time

import pytest
import yaml
from cryptography import x509

import testbed as tb
from machine_id_agent import kubecreds
from helpers.fleet import Fleet, agent_status, changed_by_host, wait_for

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

FIRST = ["app-1", "app-2", "app-3"]
ROLLOUT_PLAY = "Roll out the agent, in batches"


@pytest.fixture(scope="module")
def fleet(bed, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"), teleport=bed.teleport["multiplex"], kube=bed.kube, serial=2)
    try:
        # app-2's identity expires while it is powered off in test_2c: a short TTL there, the defaults elsewhere
        f.host_vars["app-2"] = {"machine_id_certificate_ttl": "1m", "machine_id_renewal_interval": "20s"}
        f.add_hosts(FIRST)
        yield f
    finally:
        f.stop()


def _assert_ok(run):
    assert run.rc == 0, run.stdout[-6000:]


def _bot_exists(fleet, host) -> bool:
    r = fleet.teleport.tctl("get", f"user/bot-{fleet.bot_name}-{host}", "--format=json")
    return r.returncode == 0 and json.loads(r.stdout or "[]") != []


def _host_files(fleet, host) -> str:
    """A listing of everything the role would write on the host (names, modes, owners, sizes)."""
    paths = ["/etc/tbot.yaml", "/etc/machine-id-agent", "/var/lib/teleport", "/opt/machine-id",
             "/opt/machine-id-agent", "/etc/systemd/system/machine-id.service"]
    r = fleet.hosts[host].run(["sh", "-c", "find " + " ".join(paths) + " -printf '%p %m %u %s\\n' 2>/dev/null | sort"],
                              check=False)
    return r.stdout


def test_0_check_mode_on_a_fresh_fleet_mints_nothing_and_writes_nothing(fleet):
    before_tokens = fleet.token_creations()
    before_files = {h: _host_files(fleet, h) for h in FIRST}
    run = fleet.rollout(check=True, diff=True)
    _assert_ok(run)
    assert fleet.token_creations() == before_tokens
    assert {h: _host_files(fleet, h) for h in FIRST} == before_files
    for host in FIRST:
        # per host: what a real run would change, and that it would join with a new token
        assert changed_by_host(run).get(host, 0) > 0, host
        assert run.result("lanyard.machine_id.machine_id : Report that a real run would join this host with a new token "
                          "(check mode)", host)
    for host in FIRST:
        assert not _bot_exists(fleet, host)


def test_1_first_rollout_reaches_the_cluster_from_every_host(fleet):
    before = fleet.token_creations()
    run = fleet.rollout()
    _assert_ok(run)
    # machine_id_rollout_serial: 2 is set in the inventory (group vars)
    assert run.batches(ROLLOUT_PLAY) == [["app-1", "app-2"], ["app-3"]], run.batches(ROLLOUT_PLAY)
    assert fleet.token_creations() - before == len(FIRST)
    for host in FIRST:
        r = fleet.reader_get_pods(host)
        assert r.returncode == 0 and f"pod/{tb.DEMO_POD}" in r.stdout, (host, r.stderr)


def test_2_rerun_changes_nothing_and_mints_no_token(fleet):
    before_tokens, before_calls = fleet.token_creations(), fleet.tctl_calls()
    run = fleet.rollout()
    _assert_ok(run)
    changed = changed_by_host(run)
    assert all(n == 0 for n in changed.values()), changed
    assert fleet.token_creations() == before_tokens
    fleet.calls_no_change_3 = fleet.tctl_calls() - before_calls


def test_2a_status_playbook_prints_one_row_per_host_and_changes_nothing(fleet):
    """lanyard.machine_id.status: one table of every host, read-only (a real run and --check change nothing and
    call nothing on the control plane); a host that does not answer is listed as such."""
    for check in (False, True):
        calls = fleet.tctl_calls()
        run = fleet.rollout(playbook="status", check=check)
        _assert_ok(run)
        assert all(n == 0 for n in changed_by_host(run).values()), changed_by_host(run)
        assert fleet.tctl_calls() == calls
        table = run.result("Machine ID status")["msg"]
        assert table[0].split()[:2] == ["host", "state"], table
        rows = {line.split()[0]: line.split() for line in table[1:]}
        assert sorted(rows) == FIRST, table
        for host in FIRST:
            st = _agent_status(fleet, host)
            row = rows[host]
            # state, reader, agent version; expiry and generation exactly for the hosts at the default TTL
            assert (row[1], row[5], row[6]) == ("ok", "ok", st["agent_version"]), (host, row, st)
            if host != "app-2":  # app-2 renews every 20 s
                assert (row[2], row[3], row[4], row[7]) == (
                    st["identity"]["expires"], str(st["identity"]["generation"]), st["identity"]["issued"],
                    st["outputs"][0]["expires"]), (host, row, st)
            else:
                assert all(_dt.datetime.fromisoformat(row[i]) for i in (2, 4, 7)), row
    off = fleet.hosts["app-3"]
    off.power_off()
    try:
        run = fleet.rollout(playbook="status")
    finally:
        off.power_on()
    assert run.rc != 0
    table = run.result("Machine ID status")["msg"]
    assert [line.split()[:2] for line in table if line.startswith("app-3")] == [["app-3", "NO"]], table
    assert wait_for(lambda: _agent_status(fleet, "app-3").get("identity", {}).get("state") == "ok", 60, 1)
    assert wait_for(lambda: fleet.reader_get_pods("app-3").returncode == 0, 60, 1)


def test_2b_check_mode_and_each_tag_alone_on_a_converged_fleet(fleet):
    before_tokens = fleet.token_creations()
    run = fleet.rollout(check=True, diff=True)
    _assert_ok(run)
    assert all(n == 0 for n in changed_by_host(run).values()), changed_by_host(run)
    for tags in (["--tags", "machine_id_control_plane"], ["--tags", "machine_id_preflight"],
                 ["--tags", "machine_id_install"], ["--tags", "machine_id_configure"],
                 ["--tags", "machine_id_service"], ["--tags", "machine_id_verify"],
                 ["--tags", "machine_id_final_check"], ["--skip-tags", "machine_id_control_plane"],
                 ["--skip-tags", "machine_id_final_check,machine_id_verify"]):
        # one host is enough to show what a tag runs (the whole fleet ran above), and 3x cheaper
        run = fleet.rollout(extra_args=tags + ["--limit", FIRST[0]])
        assert run.rc == 0, (tags, run.stdout[-3000:])
        assert all(n == 0 for n in changed_by_host(run).values()), (tags, changed_by_host(run))
        assert {r["host"] for r in run.results} & {FIRST[0], "localhost"}, (tags, run.stdout[-2000:])
    assert fleet.token_creations() == before_tokens


def test_2b2_check_mode_reports_acl_drift_without_repairing_it(fleet):
    """Issue 15 point 6: `--check` reports the ACL change a real run would make (machine-id-agent init --check),
    writes nothing; the real run then repairs it."""
    host = FIRST[0]
    h = fleet.hosts[host]
    h.run(["setfacl", "-m", "o::rx", "/opt/machine-id"])
    drifted = h.run(["getfacl", "-cp", "/opt/machine-id"]).stdout
    assert "other::r-x" in drifted
    run = fleet.rollout(check=True, extra_args=["--tags", "machine_id_configure"])
    _assert_ok(run)
    changed = changed_by_host(run)
    assert changed.get(host) == 1 and all(changed.get(o, 0) == 0 for o in FIRST[1:]), changed
    assert h.run(["getfacl", "-cp", "/opt/machine-id"]).stdout == drifted, "check mode wrote nothing"
    run = fleet.rollout(extra_args=["--tags", "machine_id_configure"])
    _assert_ok(run)
    assert changed_by_host(run).get(host) == 1
    assert "other::---" in h.run(["getfacl", "-cp", "/opt/machine-id"]).stdout


def _agent_status(fleet, host) -> dict:
    return agent_status(fleet.hosts[host])


def _bot_generation(fleet, host) -> int:
    r = fleet.teleport.tctl("get", f"user/bot-{fleet.bot_name}-{host}", "--format=json", check=True)
    labels = json.loads(r.stdout)[0]["metadata"].get("labels") or {}
    return int(labels.get("teleport.internal/bot-generation") or 0)


def _locks_on(fleet, host) -> list:
    out = fleet.teleport.tctl("get", "locks", "--format=json", check=True).stdout
    return [lk for lk in json.loads(out or "null") or []
            if (lk.get("spec", {}).get("target") or {}).get("user") == f"bot-{fleet.bot_name}-{host}"]


def _bots_rm_count(fleet, host) -> int:
    return sum(1 for c in fleet._calls() if c[:3] == ["bots", "rm", f"{fleet.bot_name}-{host}"])


def _assert_back(fleet, run, hosts):
    """Each of ``hosts`` is back after ``run``: ready agent, a fresh identity, the reader works, and its new
    token is in no output."""
    for host in hosts:
        assert wait_for(lambda: fleet.reader_get_pods(host).returncode == 0, 60, 1), \
            (host, fleet.reader_get_pods(host).stderr)
        st = _agent_status(fleet, host)
        assert st["identity"]["state"] == "ok" and st["identity"]["generation"] >= 1, (host, st)
        token = fleet.hosts[host].run(["cat", "/etc/machine-id-agent/token"]).stdout.strip()
        assert len(token) >= 16 and token not in run.stdout, host  # the new token is in no output


def _wait_until_expired(expires: str) -> None:
    left = (_dt.datetime.fromisoformat(expires) - _dt.datetime.now(_dt.timezone.utc)).total_seconds()
    if left > -2:
        time.sleep(left + 2)


def test_2c_unreachable_then_expired_and_wiped_hosts_are_back_in_one_batch_under_one_tag(fleet):
    """Three re-enrolment edges on the real fleet, with the batch [app-1, app-2]:

    * app-2 (credential TTL 1m) is powered off. A rollout while it is off cannot ask it whether it needs a
      token: no token is minted, its bot is neither removed nor recreated, and the rollout stops before app-3.
    * It stays off past its identity's expiry and boots with an expired identity; app-1's storage is wiped (a
      disk swap). Teleport v13 refuses a second join of the same bot, so both need their bot recreated.
    * `--check --diff` runs through, mints nothing, deletes no bot, writes nothing; then one rollout with only
      the machine_id_configure tag brings both back in one batch: one token each, readers working, and the
      agents use the new token at once (the role restarts an agent that could not get ready)."""
    wiped, expired = "app-1", "app-2"
    h1, h2 = fleet.hosts[wiped], fleet.hosts[expired]
    st = _agent_status(fleet, expired)
    assert st["identity"]["state"] == "ok", st
    h2.power_off()
    tokens, calls = fleet.token_creations(), len(fleet._calls())
    run = fleet.rollout()
    assert run.rc != 0, run.stdout[-3000:]
    assert "rollout stopped after this batch: app-2 failed or could not be reached" in run.stdout, run.stdout[-3000:]
    assert "app-3" not in run.hosts_started(ROLLOUT_PLAY)
    assert fleet.token_creations() == tokens
    assert not [c for c in fleet._calls()[calls:] if c[:2] in (["bots", "rm"], ["bots", "add"])]
    assert _bot_exists(fleet, expired)

    # the identity app-2 held when it went off expires while it is off (TTL 1m)
    _wait_until_expired(_stored_identity_expiry(h2))
    h2.power_on()
    assert _agent_status(fleet, expired)["identity"]["state"] == "expired"
    # the agent gave up at boot with status 78 (only a new token helps) instead of holding boot up; not restarted
    unit = h2.run(["systemctl", "show", "machine-id", "-p", "ActiveState", "-p", "ExecMainStatus"]).stdout.split()
    assert sorted(unit) == ["ActiveState=failed", "ExecMainStatus=78"], unit
    h1.run(["systemctl", "stop", "machine-id"])
    h1.run(["sh", "-c", "rm -rf /var/lib/teleport/bot/* /var/lib/teleport/bot/.[!.]*"])
    h1.run(["systemctl", "start", "--no-block", "machine-id"])  # it cannot join with the spent token
    assert _agent_status(fleet, wiped)["identity"]["state"] == "none"

    removals = {h: _bots_rm_count(fleet, h) for h in (wiped, expired)}
    tokens, calls = fleet.token_creations(), len(fleet._calls())
    token_files = {h: fleet.hosts[h].run(["cat", "/etc/machine-id-agent/token"]).stdout for h in (wiped, expired)}
    run = fleet.rollout(check=True, diff=True)
    _assert_ok(run)
    assert fleet.token_creations() == tokens
    assert not [c for c in fleet._calls()[calls:] if c[:2] in (["bots", "rm"], ["bots", "add"])]
    for host in (wiped, expired):
        assert fleet.hosts[host].run(["cat", "/etc/machine-id-agent/token"]).stdout == token_files[host]
        assert run.result("lanyard.machine_id.machine_id : Report that a real run would join this host with a new "
                          "token (check mode)", host), host
    assert _agent_status(fleet, wiped)["identity"]["state"] == "none"
    assert _agent_status(fleet, expired)["identity"]["state"] == "expired"

    run = fleet.rollout(extra_args=["--tags", "machine_id_configure"])
    _assert_ok(run)
    assert run.batches(ROLLOUT_PLAY)[0] == [wiped, expired], run.batches(ROLLOUT_PLAY)
    assert fleet.token_creations() - tokens == 2
    for host in (wiped, expired):
        assert _bots_rm_count(fleet, host) == removals[host] + 1, host
    assert changed_by_host(run).get("app-3", 0) == 0, changed_by_host(run)
    _assert_back(fleet, run, [wiped, expired])


def _stored_identity_expiry(host) -> str:
    """The expiry of the identity stored on a powered-off host, read from its disk."""
    doc = json.loads((host.root / "var/lib/teleport/bot/identity.json").read_text())
    cert = x509.load_pem_x509_certificate(doc["tlscert"].encode())
    return cert.not_valid_after_utc.isoformat()


def test_2d_a_host_that_lost_a_renewal_and_a_locked_host_in_one_rollout(fleet):
    """app-1: a backup restored over the storage (an identity one renewal older than what Teleport counts): the
    agent does not present it (no lock), status says lost-renewal. app-3: Teleport locks the bot (here an admin's
    `tctl lock`, as after a leaked copy; v13 answers the locked bot with a bare "access denied", so the host
    cannot tell). One rollout re-enrols app-1 and stops on app-3 naming the lock; with machine_id_reenrol_locked
    the next one removes the lock, recreates the bot and app-3 is back. One token per host."""
    lost, locked = "app-1", "app-3"
    h = fleet.hosts[lost]
    storage = "/var/lib/teleport/bot"
    h.run(["cp", "-p", f"{storage}/identity.json", "/root/identity.backup"])
    gen = _agent_status(fleet, lost)["identity"]["generation"]
    h.run(["systemctl", "kill", "--kill-whom=main", "-s", "USR1", "machine-id"])
    assert wait_for(lambda: _agent_status(fleet, lost)["identity"]["generation"] == gen + 1, 60, 1)
    h.run(["systemctl", "stop", "machine-id"])
    h.run(["cp", "-p", "/root/identity.backup", f"{storage}/identity.json"])  # the restored backup
    h.run(["systemctl", "start", "machine-id"])
    h.run(["systemctl", "kill", "--kill-whom=main", "-s", "USR1", "machine-id"])  # a renewal: the agent must refuse to present it
    assert wait_for(lambda: _agent_status(fleet, lost)["identity"]["state"] == "lost-renewal", 60, 1), \
        _agent_status(fleet, lost)
    assert not _locks_on(fleet, lost)
    fleet.teleport.tctl("lock", f"--user=bot-{fleet.bot_name}-{locked}", "--message=suspected copy of the identity",
                        check=True)
    assert wait_for(lambda: _locks_on(fleet, locked), 30, 1)

    before = fleet.token_creations()
    run = fleet.rollout()
    assert run.rc != 0
    assert f"bot {fleet.bot_name}-{locked} is locked" in run.stdout and "machine_id_reenrol_locked" in run.stdout
    assert "suspected copy of the identity" in run.stdout
    assert fleet.token_creations() - before == 1 and _locks_on(fleet, locked)
    assert changed_by_host(run).get("app-2", 0) == 0, changed_by_host(run)
    _assert_back(fleet, run, [lost])
    assert not _locks_on(fleet, lost)

    before = fleet.token_creations()
    run = fleet.rollout(extra_args=["-e", "machine_id_reenrol_locked=true"])
    _assert_ok(run)
    assert fleet.token_creations() - before == 1
    changed = changed_by_host(run)
    assert all(changed.get(o, 0) == 0 for o in FIRST if o != locked), changed
    _assert_back(fleet, run, [locked])
    assert not _locks_on(fleet, locked)


def test_3_a_fourth_host_gets_exactly_one_token(fleet):
    fleet.add_hosts(["app-4"])
    before = fleet.token_creations()
    fleet.serial = None  # the default ramp: one canary host, then up to 5, then 25% of the hosts
    try:
        run = fleet.rollout()
    finally:
        fleet.serial = 2
    _assert_ok(run)
    assert run.batches(ROLLOUT_PLAY) == [["app-1"], ["app-2", "app-3", "app-4"]], run.batches(ROLLOUT_PLAY)
    assert fleet.token_creations() - before == 1
    changed = changed_by_host(run)
    assert all(changed.get(h, 0) == 0 for h in FIRST), changed
    assert changed.get("app-4", 0) > 0
    r = fleet.reader_get_pods("app-4")
    assert r.returncode == 0 and f"pod/{tb.DEMO_POD}" in r.stdout, r.stderr


def test_4_removed_host_loses_agent_files_and_identity(fleet):
    gone = "app-3"
    assert _bot_exists(fleet, gone)
    # Keep the host's credentials, as an inline kubeconfig the controller's kubectl can use (the host's own calls
    # the exec plugin installed there), to show afterwards that its identity is dead.
    saved = fleet.workdir / f"{gone}.kubeconfig"
    doc = yaml.safe_load(fleet.hosts[gone].run(["cat", "/opt/machine-id/kubeconfig.yaml"]).stdout)
    key, cert = kubecreds.split_bundle(fleet.hosts[gone].run(["cat", "/opt/machine-id/identity"]).stdout.encode())
    doc["users"][0]["user"] = {"client-certificate-data": base64.b64encode(cert).decode(),
                               "client-key-data": base64.b64encode(key).decode()}
    saved.write_text(yaml.safe_dump(doc))
    saved.chmod(0o600)
    assert fleet.kube.kubectl("get", "pods", "-n", "demo", kubeconfig=saved).returncode == 0
    fleet.remove_host(gone)
    run = fleet.rollout()
    _assert_ok(run)
    host = fleet.hosts[gone]
    assert host.run(["systemctl", "is-active", "machine-id"], check=False).stdout.strip() != "active"
    for path in ("/etc/tbot.yaml", "/var/lib/teleport/bot", "/opt/machine-id",
                 "/etc/systemd/system/machine-id.service"):
        assert host.run(["test", "-e", path], check=False).returncode != 0, path
    # Teleport's cache serves reads about a second behind writes.
    assert wait_for(lambda: not _bot_exists(fleet, gone), 15), "the removed host's bot still exists"

    def refused():
        r = fleet.kube.kubectl("get", "pods", "-n", "demo", kubeconfig=saved)
        return r if r.returncode != 0 else None
    denied = wait_for(refused, 15)
    assert denied and "not found" in denied.stderr, denied and denied.stderr
    # The other hosts are untouched and still work.
    for other in ("app-1", "app-2", "app-4"):
        r = fleet.reader_get_pods(other)
        assert r.returncode == 0, (other, r.stderr)


def test_5_unreachable_host_stops_the_rollout_before_the_next_batch(fleet):
    # present hosts: app-1, app-2, app-4 (app-3 is absent); batches of 2: [app-1, app-2], [app-4]
    fleet.hosts["app-2"].stop()  # powered off: Ansible finds it unreachable
    run = fleet.rollout()
    assert run.rc != 0, run.stdout[-3000:]
    assert "app-4" not in run.hosts_started(ROLLOUT_PLAY), "the batch after the unreachable host ran"
    assert "app-1" in run.hosts_started(ROLLOUT_PLAY)
    assert "rollout stopped after this batch: app-2 failed or could not be reached" in run.stdout, run.stdout[-3000:]
    assert "Not rolled out: app-4" in run.stdout, run.stdout[-3000:]
    # the recap names the unreachable host
    assert "app-2" in run.stdout.split("PLAY RECAP")[-1]


def test_6_dead_host_marked_absent_is_revoked_on_the_control_plane(fleet):
    dead = "app-2"  # powered off in the previous step: it never answers
    assert _bot_exists(fleet, dead)
    fleet.remove_host(dead)
    run = fleet.rollout()
    _assert_ok(run)
    assert wait_for(lambda: not _bot_exists(fleet, dead), 15), "the dead host's bot still exists"
    r = fleet.teleport.tctl("get", "tokens", "--format=json")
    assert r.returncode == 0, r.stderr
    bots = [(t.get("spec") or {}).get("bot_name") for t in json.loads(r.stdout or "[]")]
    assert f"{fleet.bot_name}-{dead}" not in bots, bots
    # the live hosts were not touched and still read
    for other in ("app-1", "app-4"):
        assert fleet.reader_get_pods(other).returncode == 0, other
