# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""playbooks/rollout.yml on the real test bed with real systemd hosts (issue: fleet rollout).

One private bed (TLS routing) and a fleet of systemd-nspawn hosts; the steps run in order:
first rollout -> no-change rerun -> a 4th host -> one host removed.
"""

from __future__ import annotations

import json

import pytest

import testbed as tb
from helpers.fleet import Fleet, changed_by_host, wait_for

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

FIRST = ["app-1", "app-2", "app-3"]


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


def test_1_first_rollout_reaches_the_cluster_from_every_host(fleet):
    before = fleet.token_creations()
    run = fleet.rollout()
    _assert_ok(run)
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


def test_3_a_fourth_host_gets_exactly_one_token(fleet):
    fleet.add_hosts(["app-4"])
    before = fleet.token_creations()
    run = fleet.rollout()
    _assert_ok(run)
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
