# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""playbooks/rollout.yml on the real test bed with real systemd hosts (issue: fleet rollout).

One private bed (TLS routing) and a fleet of systemd-nspawn hosts; the steps run in order:
first rollout (batches of 2 set in the inventory) -> no-change rerun -> a 4th host (the default ramp: a canary
first) -> one host removed -> a host unreachable in the first batch stops the rollout -> a dead host marked
absent is revoked on the control plane.

Batches are read from the run itself (when each host started and finished the rollout play's tasks), never from
the variable.
"""

from __future__ import annotations

import json

import pytest

import testbed as tb
from helpers.fleet import Fleet, agent_status, changed_by_host, wait_for

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

FIRST = ["app-1", "app-2", "app-3"]
ROLLOUT_PLAY = "Roll out the agent, in batches"


@pytest.fixture(scope="module")
def fleet(testbed_bins, tmp_path_factory):
    try:
        bed = tb.Testbed.start(modes=("multiplex",))
    except (tb.TestbedError, tb.BuildError) as exc:
        pytest.fail(f"the real test bed failed to start: {exc}", pytrace=False)
    f = Fleet(tmp_path_factory.mktemp("fleet"), teleport=bed.teleport["multiplex"], kube=bed.kube, serial=2)
    try:
        f.add_hosts(FIRST)
        yield f
    finally:
        f.stop()
        bed.stop()


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
        run = fleet.rollout(extra_args=tags)
        assert run.rc == 0, (tags, run.stdout[-3000:])
        assert all(n == 0 for n in changed_by_host(run).values()), (tags, changed_by_host(run))
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


def _back_in_one_rollout(fleet, host, extra_args=None):
    """One rollout brings ``host`` back: one token (its bot recreated), the reader works, the other hosts untouched."""
    before = fleet.token_creations()
    run = fleet.rollout(extra_args=extra_args)
    _assert_ok(run)
    assert fleet.token_creations() - before == 1
    changed = changed_by_host(run)
    assert all(changed.get(h, 0) == 0 for h in FIRST if h != host), changed
    assert wait_for(lambda: fleet.reader_get_pods(host).returncode == 0, 60, 1), fleet.reader_get_pods(host).stderr
    st = _agent_status(fleet, host)
    assert st["identity"]["state"] == "ok" and st["identity"]["generation"] >= 1, st
    token = fleet.hosts[host].run(["cat", "/etc/machine-id-agent/token"]).stdout.strip()
    assert len(token) >= 16 and token not in run.stdout  # the new token is in no output
    return run


def test_2c_a_host_whose_identity_was_removed_is_back_in_one_rollout(fleet):
    """Disk swapped / storage wiped: Teleport v13 refuses a second join of the same bot ("already been issued a
    renewable certificate"), so the rollout recreates the host's bot and joins with its new token."""
    host = "app-1"
    assert _bot_generation(fleet, host) >= 1
    h = fleet.hosts[host]
    h.run(["systemctl", "stop", "machine-id"])
    h.run(["sh", "-c", "rm -rf /var/lib/teleport/bot/* /var/lib/teleport/bot/.[!.]*"])
    h.run(["systemctl", "start", "--no-block", "machine-id"])  # it cannot join with the spent token
    assert _agent_status(fleet, host)["identity"]["state"] == "none"
    removals = sum(1 for c in fleet._calls() if c[:3] == ["bots", "rm", f"{fleet.bot_name}-{host}"])
    # check mode on a host that needs re-enrolment: it runs through, mints nothing, deletes no bot, writes nothing
    tokens, calls = fleet.token_creations(), len(fleet._calls())
    token_file = h.run(["cat", "/etc/machine-id-agent/token"]).stdout
    run = fleet.rollout(check=True, diff=True)
    _assert_ok(run)
    assert fleet.token_creations() == tokens
    assert not [c for c in fleet._calls()[calls:] if c[:2] in (["bots", "rm"], ["bots", "add"])]
    assert h.run(["cat", "/etc/machine-id-agent/token"]).stdout == token_file
    assert _agent_status(fleet, host)["identity"]["state"] == "none"
    _back_in_one_rollout(fleet, host)
    assert sum(1 for c in fleet._calls() if c[:3] == ["bots", "rm", f"{fleet.bot_name}-{host}"]) == removals + 1


def test_2d_a_host_that_lost_a_renewal_is_back_in_one_rollout(fleet):
    """A backup restored over the storage (an identity one renewal older than what Teleport counts): the agent
    does not present it (no lock), status says lost-renewal, and one rollout re-enrols the host."""
    host = "app-2"
    h = fleet.hosts[host]
    storage = "/var/lib/teleport/bot"
    h.run(["cp", "-p", f"{storage}/identity.json", "/root/identity.backup"])
    gen = _agent_status(fleet, host)["identity"]["generation"]
    h.run(["systemctl", "kill", "--kill-whom=main", "-s", "USR1", "machine-id"])
    assert wait_for(lambda: _agent_status(fleet, host)["identity"]["generation"] == gen + 1, 60, 1)
    h.run(["systemctl", "stop", "machine-id"])
    h.run(["cp", "-p", "/root/identity.backup", f"{storage}/identity.json"])  # the restored backup
    h.run(["systemctl", "start", "machine-id"])
    h.run(["systemctl", "kill", "--kill-whom=main", "-s", "USR1", "machine-id"])  # a renewal: the agent must refuse to present it
    assert wait_for(lambda: _agent_status(fleet, host)["identity"]["state"] == "lost-renewal", 60, 1), \
        _agent_status(fleet, host)
    assert not _locks_on(fleet, host)
    _back_in_one_rollout(fleet, host)
    assert not _locks_on(fleet, host)


def test_2e_a_locked_host_is_named_then_re_enrolled_when_allowed(fleet):
    """Teleport locks the bot (here an admin's `tctl lock`, as after a leaked copy; v13 answers the locked bot
    with a bare "access denied", so the host cannot tell): the rollout names the lock and stops unless
    machine_id_reenrol_locked is true; then one rollout removes the lock, recreates the bot and the host is back."""
    host = "app-3"
    fleet.teleport.tctl("lock", f"--user=bot-{fleet.bot_name}-{host}", "--message=suspected copy of the identity",
                        check=True)
    assert wait_for(lambda: _locks_on(fleet, host), 30, 1)
    before = fleet.token_creations()
    run = fleet.rollout()
    assert run.rc != 0
    assert f"bot {fleet.bot_name}-{host} is locked" in run.stdout and "machine_id_reenrol_locked" in run.stdout
    assert "suspected copy of the identity" in run.stdout
    assert fleet.token_creations() == before and _locks_on(fleet, host)
    _back_in_one_rollout(fleet, host, extra_args=["-e", "machine_id_reenrol_locked=true"])
    assert not _locks_on(fleet, host)


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
    # Keep the host's kubeconfig (inline credentials) to show afterwards that its identity is dead.
    saved = fleet.workdir / f"{gone}.kubeconfig"
    saved.write_bytes(fleet.hosts[gone].run(["cat", "/opt/machine-id/kubeconfig.yaml"]).stdout.encode())
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
