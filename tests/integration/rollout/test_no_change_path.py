# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The role's no-change path (issue: fleet scale, point 1) on a real systemd host and the real bed.

A converged, healthy host is confirmed with one agent_state run instead of the install, configure and service
phases; and each kind of drift a host can have -- its config, its unit, a mode, the reader's ACL, the agent's
version, a stopped service -- is still found (named in the output), sends the host down the full path, is fixed
on the host, and the run after that is back on the no-change path. Everything at the role's defaults.
"""

from __future__ import annotations

import pytest

from helpers.fleet import Fleet, changed_by_host

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

HOST = "nc-1"
STATE_TASK = "Read the agent's install, identity and unit, and what differs from this role's settings"
# the wheel build runs on the controller (delegate_to: localhost, once per run), not on the host
BUILD_TASK = "Build the agent's wheel sets on the controller (one per host Python, machine and glibc)"
# actions that run a module on the host (every other task of the no-change path runs on the controller)
ON_HOST_ACTIONS = ("agent_state", "setup", "gather_facts", "command", "shell", "stat", "file", "copy", "template",
                   "systemd_service", "systemd", "user", "group", "pip", "wait_for", "slurp")
ROLE_TASKS = "Roll out the agent, in batches"
# verify's own question on the full path (module cluster_check); on the no-change path agent_state asks it
VERIFY_TASK = "Ask the cluster, as the reader, the verify question (kubectl auth can-i)"
# tasks of the install, configure and service phases: none may run on the no-change path
FULL_PATH_TASKS = ("Create the bot group", "Copy the agent's wheels to the host", "Write the agent config",
                   "Create the storage directory (0700, bot user)", "Install the systemd unit",
                   "Enable and start the service (systemd reloaded first when the unit changed)",
                   "Wait until the service is active (with Type=notify that means ready)")


@pytest.fixture(scope="module")
def fleet(bed, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"), teleport=bed.teleport["multiplex"], kube=bed.kube)
    try:
        f.add_hosts([HOST])
        yield f
    finally:
        f.stop()


def _ran(run, host=HOST):
    """Names of the tasks that ran (not skipped) on the host."""
    return [r["task"].split(" : ", 1)[-1] for r in run.results
            if r["host"] == host and r["status"] != "skipped" and not r["result"].get("skipped")]


def _sh(fleet, script):
    return fleet.hosts[HOST].run(["sh", "-c", script], check=False)


def _assert_no_change_path(fleet):
    calls = fleet.tctl_calls()
    run = fleet.rollout()
    assert run.rc == 0, run.stdout[-6000:]
    assert changed_by_host(run)[HOST] == 0, run.stdout[-4000:]
    ran = _ran(run)
    drift = [r["result"].get("msg") for r in run.results if r["task"].endswith("Report what differs from this role's settings")]
    assert not set(ran) & set(FULL_PATH_TASKS), (drift, set(ran) & set(FULL_PATH_TASKS))
    # once per host and run: the role reuses the answer the playbook got at the top of the play; it is the only
    # module run on the host (no fact gathering, and the cluster question is asked inside it)
    assert ran.count(STATE_TASK) == 1
    on_host = [r["task"].split(" : ", 1)[-1] for r in run.results if r["host"] == HOST and r["status"] != "skipped"
               and not r["result"].get("skipped") and r.get("action", "").split(".")[-1] in ON_HOST_ACTIONS
               and not r["task"].endswith(BUILD_TASK)]
    assert on_host == [STATE_TASK], on_host
    # only the control plane's own reads (cluster, locks, role): nothing per host, no bot, no token
    new_calls = fleet._calls()[calls:]
    assert new_calls and not [c for c in new_calls if c[:1] in (["bots"], ["tokens"])], new_calls
    return run, ran


def test_1_first_rollout_then_a_rerun_on_the_no_change_path(fleet):
    run = fleet.rollout()
    assert run.rc == 0, run.stdout[-6000:]
    assert "Write the agent config" in _ran(run) and VERIFY_TASK in _ran(run)
    run, ran = _assert_no_change_path(fleet)
    # the reader still gets checked against the cluster on the no-change path when kubectl is on the host: by
    # agent_state, in the same module run, as the reader through the destination's kubeconfig
    state = [r["result"] for r in run.results if r["host"] == HOST and r["task"].endswith(STATE_TASK)][0]
    assert [(c["directory"], c["stdout"]) for c in state["cluster_check"]] == [("/opt/machine-id", "yes")], state
    assert VERIFY_TASK not in ran
    assert "The reader reaches the cluster through the kubeconfig" not in ran
    assert fleet.reader_get_pods(HOST).returncode == 0


DRIFTS = {
    # what the drift does on the host, what the run must name, and how to see it is fixed
    "config": ("echo '# edited by hand' >> /etc/tbot.yaml", "/etc/tbot.yaml: content differs",
               "! grep -q 'edited by hand' /etc/tbot.yaml"),
    "unit": ("sed -i 's/^RestartSec=.*/RestartSec=1/' /etc/systemd/system/machine-id.service",
             "/etc/systemd/system/machine-id.service: content differs",
             "systemctl show machine-id -p RestartUSec | grep -qx 'RestartUSec=5s' && "
             "systemctl show machine-id -p NeedDaemonReload | grep -qx 'NeedDaemonReload=no'"),
    # (not the storage directory: a storage mode that lets others read, the agent tightens to 0700 by itself)
    "mode": ("chmod 0750 /etc/machine-id-agent", "/etc/machine-id-agent: mode 0750, expected 0755",
             "[ \"$(stat -c %a /etc/machine-id-agent)\" = 755 ]"),
    "acl": ("setfacl -x u:app /opt/machine-id /opt/machine-id/kubeconfig.yaml", "/opt/machine-id: ",
            "runuser -u app -- head -c 10 /opt/machine-id/kubeconfig.yaml >/dev/null"),
    "agent-version": ("sed -i 's/^__version__ = .*/__version__ = \"0.0.1\"/' "
                      "/opt/machine-id-agent/releases/*/lib/python3*/site-packages/machine_id_agent/__init__.py",
                      "agent version: 0.0.1, expected ",
                      "/opt/machine-id-agent/bin/machine-id-agent --version | grep -vq 0.0.1"),
    "bot-shell": ("usermod -s /bin/bash teleport", "user teleport: shell /bin/bash, expected /usr/sbin/nologin",
                  "[ \"$(getent passwd teleport | cut -d: -f7)\" = /usr/sbin/nologin ]"),
    "stopped": ("systemctl stop machine-id", "machine-id.service: inactive, expected active",
                "systemctl is-active -q machine-id"),
}


@pytest.mark.parametrize("kind", list(DRIFTS))
def test_2_each_drift_is_found_fixed_and_then_the_no_change_path_is_back(fleet, kind):
    do, named, fixed = DRIFTS[kind]
    r = _sh(fleet, do)
    assert r.returncode == 0, r.stderr
    assert _sh(fleet, fixed).returncode != 0, f"the {kind} drift did not take on the host"
    calls = fleet.tctl_calls()
    run = fleet.rollout()
    assert run.rc == 0, run.stdout[-6000:]
    assert named in run.stdout, run.stdout[-4000:]
    assert changed_by_host(run)[HOST] > 0
    # a drift is fixed in place: the host keeps its bot and identity (no new bot, no token), even when the drift
    # keeps the agent's user from reading its config (the mode drift)
    minted = [c for c in fleet._calls()[calls:] if c[:1] in (["bots"], ["tokens"])]
    assert not minted, minted
    assert _sh(fleet, fixed).returncode == 0, f"the {kind} drift is still there after the rollout"
    assert fleet.reader_get_pods(HOST).returncode == 0
    _assert_no_change_path(fleet)


def test_3_an_application_user_as_the_reader_keeps_its_shell(fleet):
    # the reader is the application's user: the role only needs it to exist, and never changes it
    assert _sh(fleet, "usermod -s /bin/bash app").returncode == 0
    _assert_no_change_path(fleet)
    assert _sh(fleet, "[ \"$(getent passwd app | cut -d: -f7)\" = /bin/bash ]").returncode == 0
    assert fleet.reader_get_pods(HOST).returncode == 0


def test_4_the_no_change_path_still_fails_a_host_the_cluster_refuses(fleet):
    """The cluster's answer on the no-change path is real: with the RoleBinding gone (and the rollout told not to
    touch the control plane, which would put it back), the converged host fails verify, naming kubectl's answer."""
    fleet.kube.kubectl("-n", "demo", "delete", "rolebinding", "example-rolebinding-group", check=True)
    try:
        run = fleet.rollout(extra_args=["--skip-tags", "machine_id_control_plane"])
        assert run.rc != 0, run.stdout[-4000:]
        assert changed_by_host(run)[HOST] == 0, run.stdout[-4000:]
        assert "kubectl auth can-i list pods -n demo answered no" in run.stdout, run.stdout[-4000:]
        assert VERIFY_TASK not in _ran(run)
    finally:
        run = fleet.rollout()  # the control plane play puts the RoleBinding back
    assert run.rc == 0, run.stdout[-6000:]
    _assert_no_change_path(fleet)


def test_5_the_verify_question_is_the_one_the_user_chose(fleet):
    """machine_id_verify_verb / machine_id_verify_resource: an app whose Kubernetes role grants something else than
    the guide's pods asks about that. The fleet's Kubernetes role grants get and list on pods, nothing on secrets."""
    run = fleet.rollout(extra_args=["-e", "machine_id_verify_verb=get", "-e", "machine_id_verify_resource=secrets"])
    assert run.rc != 0, run.stdout[-4000:]
    assert changed_by_host(run)[HOST] == 0, run.stdout[-4000:]
    assert "kubectl auth can-i get secrets -n demo answered no" in run.stdout, run.stdout[-4000:]
    run = fleet.rollout(extra_args=["-e", "machine_id_verify_verb=get"])
    assert run.rc == 0, run.stdout[-4000:]
    assert changed_by_host(run)[HOST] == 0, run.stdout[-4000:]
    state = [r["result"] for r in run.results if r["host"] == HOST and r["task"].endswith(STATE_TASK)][0]
    assert [c["stdout"] for c in state["cluster_check"]] == ["yes"], state
    # a flag in place of a resource is refused, naming the setting, and never reaches kubectl
    run = fleet.rollout(extra_args=["-e", "machine_id_verify_resource=--as=system:admin"])
    assert run.rc != 0, run.stdout[-4000:]
    assert "machine_id_verify_resource" in run.stdout and "'--as=system:admin' is not one kubectl word" in \
        run.stdout, run.stdout[-4000:]
    assert changed_by_host(run).get(HOST, 0) == 0 and "Traceback" not in run.stdout
