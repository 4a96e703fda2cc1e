# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The role's final assertion (tasks/verify.yml "Assert the agent works") run by real Ansible with the results
it judges: it passes a working agent and, for a broken one, fails with a message that names the unit state,
the reader's `kubectl auth can-i` answer (verify's own on the full path, agent_state's on the no-change path) and
the journal."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers.playbook import run_playbook

VERIFY = Path(__file__).resolve().parents[3] / "roles" / "machine_id" / "tasks" / "verify.yml"
# the role variable the assert reads the agent's state through (verify_ready.yml's is-active, first line)
ROLE_VARS = yaml.safe_load((VERIFY.parents[1] / "vars" / "main.yml").read_text())


def _assert_task() -> dict:
    """The task, with the variables of the blocks around it (they define what it reads)."""
    def walk(tasks, scope):
        for t in tasks:
            if t.get("name") == "Assert the agent works":
                return dict(t, vars=dict(scope, **t.get("vars", {})))
            found = walk(t.get("block", []) + t.get("rescue", []) + t.get("always", []),
                         dict(scope, **t.get("vars", {})))
            if found:
                return found
        return None

    task = walk(yaml.safe_load(VERIFY.read_text()), {})
    assert task, "verify.yml has no task 'Assert the agent works'"
    return task


SKIPPED = {"skipped": True, "changed": False}


def _check(stdout, stderr="", directory="/opt/machine-id", context=None, **extra):
    return dict({"directory": directory, "context": context, "rc": 0 if stdout == "yes" else 1, "stdout": stdout,
                 "stderr": stderr}, **extra)


V2 = "/opt/machine-id-fleet"
CASES = {
    "ok": ({"__machine_id_active": {"stdout": "active"}, "__machine_id_journal": SKIPPED,
            "__machine_id_cluster_check": {"checks": [_check("yes")]}}, None),
    "inactive": ({"__machine_id_active": {"stdout": "activating"}, "__machine_id_cluster_check": SKIPPED,
                  "__machine_id_journal": {"stdout_lines": ["joining the cluster", "join failed: token expired"]}},
                 ["machine-id.service is activating", "Journal: joining the cluster | join failed: token expired"]),
    "refused": ({"__machine_id_active": {"stdout": "active"}, "__machine_id_journal": SKIPPED,
                 "__machine_id_cluster_check": {"checks": [_check("no", "Forbidden")]}},
                ["kubectl auth can-i list pods -n demo answered no (Forbidden)"]),
    # kubectl is not on the host: no answer, nothing to judge
    "no-kubectl": ({"__machine_id_active": {"stdout": "active"}, "__machine_id_journal": SKIPPED,
                    "__machine_id_cluster_check": SKIPPED}, None),
    # the no-change path: agent_state saw the unit active and asked the cluster (cluster_check); verify waited for
    # nothing and asked nothing itself
    "converged": ({"_machine_id_converged": True, "__machine_id_active": SKIPPED, "__machine_id_journal": SKIPPED,
                   "_machine_id_state": {"cluster_check": [_check("yes")]}}, None),
    "converged-refused": ({"_machine_id_converged": True, "__machine_id_active": SKIPPED,
                           "__machine_id_journal": SKIPPED,
                           "_machine_id_state": {"cluster_check": [_check("no", "Forbidden")]}},
                          ["machine-id.service is active; kubectl auth can-i list pods -n demo answered no (Forbidden)"]),
    # a stale answer from an earlier full-path verify is not the no-change path's: agent_state's is judged
    "converged-stale-full-path-answer": ({"_machine_id_converged": True, "__machine_id_active": SKIPPED,
                                          "__machine_id_journal": SKIPPED,
                                          "__machine_id_cluster_check": {"checks": [_check("yes")]},
                                          "_machine_id_state": {"cluster_check": [_check("no", "Forbidden")]}},
                                         ["kubectl auth can-i list pods -n demo answered no"]),
    "converged-no-kubectl": ({"_machine_id_converged": True, "__machine_id_active": SKIPPED,
                              "__machine_id_journal": SKIPPED, "_machine_id_state": {}}, None),
    # kubernetes/v2: every context asked; the one that does not answer yes is named with its destination
    "v2-context-refused": ({"__machine_id_active": {"stdout": "active"}, "__machine_id_journal": SKIPPED,
                            "__machine_id_cluster_check": {"checks": [
                                _check("yes", directory=V2, context="mc-alpha@bed"),
                                _check("", "an error on the server", directory=V2, context="mc-down@bed")]}},
                           ["destination %s context mc-down@bed: kubectl auth can-i list pods -n demo answered '' "
                            "(an error on the server)" % V2]),
    "v2-no-context": ({"__machine_id_active": {"stdout": "active"}, "__machine_id_journal": SKIPPED,
                       "__machine_id_read": {"results": [{"item": {"directory": V2}, "rc": 1,
                                                          "stderr_lines": ["kubeconfig.yaml has no context"]}]},
                       "__machine_id_cluster_check": {"checks": [_check("", directory=V2, no_context=True)]}},
                      ["destination %s: its kubeconfig has no context, the selectors match no Kubernetes cluster" % V2]),
    "unread": ({"__machine_id_active": {"stdout": "active"}, "__machine_id_journal": SKIPPED,
                "__machine_id_read": {"results": [{"item": {"directory": "/opt/machine-id"}, "rc": 1,
                                                   "stderr_lines": ["permission denied"]}]},
                "__machine_id_cluster_check": SKIPPED},
               ["the reader app cannot use /opt/machine-id: permission denied"]),
    # a long journal keeps its most recent lines (the agent's own words), e.g. after a tbot under the same unit name
    "long-journal": ({"__machine_id_active": {"stdout": "activating"}, "__machine_id_cluster_check": SKIPPED,
                      "__machine_id_journal": {"stdout_lines": ["INFO [TBOT] renewed " + "x" * 200] * 20
                                               + ["ERROR: renewal failed: storage full; free space"]}},
                     ["machine-id.service is activating", "Journal: ...", "ERROR: renewal failed: storage full; free space"]),
    # the reload .path units are asked in the same is-active: the agent's state is the first line
    "path-units-listed": ({"__machine_id_active": {"stdout": "active\nactive\nfailed"}, "__machine_id_journal": SKIPPED,
                           "__machine_id_cluster_check": {"checks": [_check("yes")]}}, None),
}


def _verify(tmp_path, registered, verb="list", resource="pods"):
    """verify.yml's assert alone, with ``registered`` as the earlier tasks' results."""
    play = [{"hosts": "localhost", "gather_facts": False,
             "vars": dict(registered, machine_id_service_name="machine-id", machine_id_verify_namespace="demo",
                          machine_id_verify_verb=verb, machine_id_verify_resource=resource,
                          machine_id_reader_user="app", _machine_id_agent_active=ROLE_VARS["_machine_id_agent_active"]),
             "tasks": [_assert_task()]}]
    return run_playbook(tmp_path, yaml.safe_dump(play, sort_keys=False) + "\n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_assertion(tmp_path, case):
    registered, words = CASES[case]
    run = _verify(tmp_path, registered)
    if words is None:
        assert run.rc == 0, run.stdout[-3000:]
        return
    assert run.rc != 0
    msg = run.result("Assert the agent works")["msg"]
    for w in words:
        assert w in msg, msg
    if case == "v2-no-context":  # named once, by the cluster check, not again by the reader's wait
        assert "cannot use" not in msg, msg
    assert "{{" not in msg and "{%" not in msg, msg


def test_the_verify_message_names_the_question_the_user_chose(tmp_path):
    registered = {"__machine_id_active": {"stdout": "active"}, "__machine_id_journal": SKIPPED,
                  "__machine_id_cluster_check": {"checks": [_check("no")]}}
    run = _verify(tmp_path, registered, verb="get", resource="configmaps/app-settings")
    assert run.rc != 0
    msg = run.result("Assert the agent works")["msg"]
    assert "kubectl auth can-i get configmaps/app-settings -n demo answered no" in msg, msg


def test_the_wheel_build_reads_only_hosts_agent_state_has_read(tmp_path):
    """install.yml's wheel build lists the wheel targets of the play's hosts; with serial batches the hosts of a
    later batch have no agent_state answer yet (every multi-batch rollout once failed on that)."""
    tasks = yaml.safe_load((VERIFY.parent / "install.yml").read_text())
    argv = [t for t in tasks if t["name"].startswith("Build the agent's wheel sets")][0]["ansible.builtin.command"]["argv"]
    expr = argv.split("+", 1)[1].strip().rstrip("}").strip()  # the list of targets after the build script's args
    play = [{"hosts": "all", "gather_facts": False, "tasks": [
        {"ansible.builtin.set_fact": {"_machine_id_state": {"wheel_target": "3.11:x86_64:2.36"}},
         "when": "inventory_hostname == 'a'"},
        {"ansible.builtin.set_fact": {"_machine_id_state": {"wheel_target": None}},
         "when": "inventory_hostname == 'b'"},
        {"name": "targets", "ansible.builtin.debug": {"msg": "{{ %s }}" % expr}, "run_once": True}]}]
    run = run_playbook(tmp_path, yaml.safe_dump(play, sort_keys=False) + "\n", inventory="a,b,c",
                       extra_args=["-c", "local"])
    assert run.rc == 0, run.stdout[-3000:]
    assert run.result("targets")["msg"] == ["3.11:x86_64:2.36"]
