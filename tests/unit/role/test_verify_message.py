# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The role's final assertion (tasks/verify.yml "Assert the agent works") run by real Ansible with the results
it judges: it passes a working agent and, for a broken one, fails with a message that names the unit state,
the reader's `kubectl auth can-i` answer and the journal."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers.playbook import run_playbook

VERIFY = Path(__file__).resolve().parents[3] / "roles" / "machine_id" / "tasks" / "verify.yml"


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
CASES = {
    "ok": ({"__machine_id_active": {"stdout": "active"}, "__machine_id_journal": SKIPPED,
            "__machine_id_can_i": {"results": [{"stdout": "yes", "stderr": ""}, {"skipped": True}]}}, None),
    "inactive": ({"__machine_id_active": {"stdout": "activating"}, "__machine_id_can_i": SKIPPED,
                  "__machine_id_journal": {"stdout_lines": ["joining the cluster", "join failed: token expired"]}},
                 ["machine-id.service is activating", "Journal: joining the cluster | join failed: token expired"]),
    # the no-change path: agent_state saw the unit active, verify waited for nothing
    "converged": ({"_machine_id_converged": True, "__machine_id_active": SKIPPED, "__machine_id_journal": SKIPPED,
                   "__machine_id_can_i": {"results": [{"stdout": "yes", "stderr": ""}]}}, None),
    "converged-refused": ({"_machine_id_converged": True, "__machine_id_active": SKIPPED,
                           "__machine_id_journal": SKIPPED,
                           "__machine_id_can_i": {"results": [{"stdout": "no", "stderr": "Forbidden"}]}},
                          ["machine-id.service is active; kubectl auth can-i list pods -n demo answered no"]),
    # a long journal keeps its most recent lines (the agent's own words), e.g. after a tbot under the same unit name
    "long-journal": ({"__machine_id_active": {"stdout": "activating"}, "__machine_id_can_i": SKIPPED,
                      "__machine_id_journal": {"stdout_lines": ["INFO [TBOT] renewed " + "x" * 200] * 20
                                               + ["ERROR: renewal failed: storage full; free space"]}},
                     ["machine-id.service is activating", "Journal: ...", "ERROR: renewal failed: storage full; free space"]),
    "refused": ({"__machine_id_active": {"stdout": "active"}, "__machine_id_journal": SKIPPED,
                 "__machine_id_can_i": {"results": [{"stdout": "no", "stderr": "Forbidden"}]}},
                ["kubectl auth can-i list pods -n demo answered no (Forbidden)"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_assertion(tmp_path, case):
    registered, words = CASES[case]
    play = [{"hosts": "localhost", "gather_facts": False,
             "vars": dict(registered, machine_id_service_name="machine-id", machine_id_verify_namespace="demo"),
             "tasks": [_assert_task()]}]
    run = run_playbook(tmp_path, yaml.safe_dump(play, sort_keys=False) + "\n")
    if words is None:
        assert run.rc == 0, run.stdout[-3000:]
        return
    assert run.rc != 0
    msg = run.result("Assert the agent works")["msg"]
    for w in words:
        assert w in msg, msg
    assert "{{" not in msg and "{%" not in msg, msg
