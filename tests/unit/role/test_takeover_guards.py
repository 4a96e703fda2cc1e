# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The role's guards for what goes wrong around a tbot takeover and the reader reload units, run by real Ansible
with the facts they judge: a run with only some phases refuses to stop tbot (tasks/takeover.yml), a running tbot
with a damaged storage is refused before a token (tasks/status.yml), and verify names a reload .path unit that
is not active (tasks/verify_ready.yml). The real-host proof is tests/integration/rollout/test_adopt_tbot_edges.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers.playbook import run_playbook

TASKS = Path(__file__).resolve().parents[3] / "roles" / "machine_id" / "tasks"
UNIT = {"name": "tbot.service", "own": False, "active": True, "enabled": True}


def _task(file: str, name: str) -> dict:
    for t in yaml.safe_load((TASKS / file).read_text()):
        if t.get("name") == name:
            return t
    raise AssertionError(f"{file} has no task {name!r}")


def _run(tmp_path, task, variables, extra_args=()):
    play = [{"hosts": "localhost", "gather_facts": False, "vars": variables, "tasks": [task]}]
    return run_playbook(tmp_path, yaml.safe_dump(play, sort_keys=False) + "\n", extra_args=list(extra_args))


@pytest.mark.parametrize("args,skipped", [
    ([], None),
    (["--tags", "machine_id"], None),
    (["--tags", "machine_id_install,machine_id_configure,machine_id_service"], None),
    (["--tags", "machine_id_configure"], "machine_id_install, machine_id_service"),
    (["--tags", "machine_id_service"], "machine_id_install, machine_id_configure"),
    (["--tags", "machine_id_configure,machine_id_service"], "machine_id_install"),
    (["--skip-tags", "machine_id_install"], "machine_id_install"),
])
def test_takeover_refuses_a_run_that_skips_a_phase(tmp_path, args, skipped):
    task = dict(_task("takeover.yml", "Refuse to take over tbot in a run that skips a phase the takeover needs"),
                tags=["machine_id", "machine_id_configure", "machine_id_service"])
    run = _run(tmp_path, task, {"_machine_id_state": {"tbot_units": [UNIT]},
                                "machine_id_storage_dir": "/var/lib/teleport/bot"},
               args)
    if skipped is None:
        assert run.rc == 0, run.stdout[-3000:]
        return
    assert run.rc != 0, run.stdout[-3000:]
    msg = run.result(task["name"])["msg"]
    assert msg.startswith("machine_id on localhost: tbot.service runs tbot on /var/lib/teleport/bot; taking it over")
    assert f"this run skips {skipped}, so" in msg and "Fix: run again without --tags" in msg, msg


def test_takeover_guard_ignores_a_host_without_tbot(tmp_path):
    task = dict(_task("takeover.yml", "Refuse to take over tbot in a run that skips a phase the takeover needs"),
                tags=["machine_id_configure"])
    run = _run(tmp_path, task, {"_machine_id_state": {"tbot_units": []}, "machine_id_storage_dir": "/x"},
               ["--tags", "machine_id_configure"])
    assert run.rc == 0, run.stdout[-3000:]


DAMAGED = {"source": "tbot", "state": "damaged", "valid": False,
           "problem": "tbot's identity in /var/lib/teleport/bot is incomplete (key missing or empty), so it cannot "
                      "be adopted"}


@pytest.mark.parametrize("identity,units,fails", [
    (DAMAGED, [UNIT], True),
    (DAMAGED, [dict(UNIT, active=False)], False),  # tbot not running: re-enrolled like an expired one
    (dict(DAMAGED, state="expired"), [UNIT], False),
    ({"source": "tbot", "state": "ok", "valid": True}, [UNIT], False),
    (dict(DAMAGED, source=None), [], False),  # the agent's own identity.json damaged: a token, as before
])
def test_status_refuses_a_running_tbot_with_a_damaged_storage(tmp_path, identity, units, fails):
    task = _task("status.yml", "Refuse to take over a running tbot whose stored identity cannot be adopted")
    run = _run(tmp_path, task, {"_machine_id_state": {"status": {"identity": identity}, "tbot_units": units}})
    if not fails:
        assert run.rc == 0, run.stdout[-3000:]
        return
    assert run.rc != 0
    msg = run.result(task["name"])["msg"]
    assert msg.startswith("machine_id on localhost: tbot.service runs tbot, but tbot's identity in "
                          "/var/lib/teleport/bot is incomplete (key missing or empty)"), msg
    assert "no token was minted" in msg and "`systemctl reload tbot.service`" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("stdout,down", [
    ("active\nactive\nactive", None),
    ("active\nfailed\nactive", "machine-id-reload-a.path is failed"),
    ("active\nactive\ninactive", "machine-id-reload-b.path is inactive"),
    ("active", "machine-id-reload-a.path is unknown, machine-id-reload-b.path is unknown"),
])
def test_verify_names_a_reload_path_unit_that_is_not_active(tmp_path, stdout, down):
    task = _task("verify_ready.yml", "Assert the readers' reload path units are active")
    units = [{"name": "machine-id-reload-a.path", "enabled": True, "active": True},
             {"name": "machine-id-reload-b.path", "enabled": True, "active": True}]
    run = _run(tmp_path, task, {"_machine_id_reload_path_units": units, "__machine_id_active": {"stdout": stdout}})
    if down is None:
        assert run.rc == 0, run.stdout[-3000:]
        return
    assert run.rc != 0
    msg = run.result(task["name"])["msg"]
    assert msg.startswith(f"machine_id on localhost: {down}, expected active"), msg
    assert "Fix: `systemctl reset-failed machine-id-reload-" in msg and "\n" not in msg, msg
