# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""teleport_role / teleport_bot / teleport_bot_token / teleport_cluster_info through real ansible-playbook
against the real Teleport v13.3.8 of the test bed, in both listener modes.

Every module runs check -> real -> check -> real (changed, changed, unchanged, unchanged) and the
result is confirmed by another route (``tctl get`` as the bed's local admin, ``tbot``).
Names carry the listener mode and a per-test suffix, so tests never share objects with each other
or with other test modules on the session bed.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import testbed as tb
from helpers.playbook import run_playbook

pytestmark = [pytest.mark.testbed]

GUIDE_SPEC = {
    "allow": {
        "kubernetes_labels": {"*": "*"},
        "kubernetes_resources": [{"kind": "pod", "namespace": "*", "name": "*"}],
        "kubernetes_groups": ["example"],
        "kubernetes_users": ["alice"],
    }
}


def conn(tp, style: str = "local") -> dict:
    """module_defaults: local admin (-c), remote identity (-i) to auth, or the same identity through the proxy."""
    base = {"tctl_path": str(tp.bins["tctl"])}
    if style == "local":
        base["config_file"] = str(tp.config_path)
    elif style == "proxy":  # tctl through the proxy's web port, trusting the bed's web CA
        base.update(auth_server=tp.proxy_addr, identity_file=str(tp.admin_identity), ca_path=str(tp.web_ca_path))
    else:
        base.update(auth_server=tp.auth_addr, identity_file=str(tp.admin_identity))
    return base


def play(tasks: list[dict], defaults: dict) -> str:
    return yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False,
        "module_defaults": {"group/lanyard.machine_id.teleport": defaults},
        "tasks": tasks,
    }], sort_keys=False)


def four_runs(tmp_path: Path, playbook: str, task: str, **kw) -> list[dict]:
    """check, real, check, real; returns the four results of ``task`` (fails on any failed run)."""
    results = []
    for i, check in enumerate((True, False, True, False)):
        run = run_playbook(tmp_path / f"run{i}", playbook, check=check, diff=True, **kw)
        res = run.result(task)
        assert run.rc == 0 and res["_status"] == "ok", run.stdout[-3000:]
        results.append(res)
    return results


def tctl_json(tp, *args):
    return json.loads(tp.tctl(*args, "--format=json", check=True).stdout or "null")


def eventually(fn, timeout: float = 5.0):
    """Teleport v13 serves reads from a cache that lags writes by up to ~1s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def uniq(tp, what: str) -> str:
    return f"it-{tp.mode}-{what}-{secrets.token_hex(3)}"


# -- teleport_role -------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["local", "remote", "proxy"])
def test_role_guide_round_trip(teleport, tmp_path, style):
    name = uniq(teleport, "role")
    pb = play([{"name": "role", "lanyard.machine_id.teleport_role": {"name": name, "spec": GUIDE_SPEC}}],
              conn(teleport, style))
    runs = four_runs(tmp_path, pb, "role")
    assert [r["changed"] for r in runs] == [True, True, False, False]
    stored = tctl_json(teleport, "get", f"role/{name}")[0]
    assert stored["version"] == "v6"
    for key, value in GUIDE_SPEC["allow"].items():
        assert stored["spec"]["allow"][key] == value, key
    # an edit shows up as a change with a YAML diff, then settles
    spec = json.loads(json.dumps(GUIDE_SPEC))
    spec["allow"]["kubernetes_groups"] = ["viewers"]
    pb2 = play([{"name": "role", "lanyard.machine_id.teleport_role": {"name": name, "spec": spec}}],
               conn(teleport, style))
    edit = run_playbook(tmp_path / "edit", pb2, diff=True)
    assert edit.rc == 0 and edit.changed("role")
    assert "-    - example" in edit.stdout and "+    - viewers" in edit.stdout
    # the module returns once its write shows in a read: no waiting here (issue 13)
    assert tctl_json(teleport, "get", f"role/{name}")[0]["spec"]["allow"]["kubernetes_groups"] == ["viewers"]
    assert not run_playbook(tmp_path / "edit2", pb2).changed("role")
    # absent: check, real, check, real -- the check right after the delete must see it gone (the fresh-clone CI
    # failure of issue 13 was this third run reporting changed, from Teleport's cache)
    pb3 = play([{"name": "role", "lanyard.machine_id.teleport_role": {"name": name, "state": "absent"}}],
               conn(teleport, style))
    absent = four_runs(tmp_path / "absent", pb3, "role")
    assert [r["changed"] for r in absent] == [True, True, False, False]
    assert not absent[1].get("warnings")
    assert teleport.tctl("get", f"role/{name}", "--format=json").returncode != 0


NARROW_DENY = {"kubernetes_groups": ["system:masters"], "node_labels": {"env": "prod"}}


def test_role_narrowed_on_the_server(teleport, tmp_path):
    """Issue 13: dropping kubernetes_users and the whole deny block removes them from the server, --diff shows
    exactly that, and the rerun is unchanged."""
    name = uniq(teleport, "narrow")
    defaults = conn(teleport, "remote")
    wide = json.loads(json.dumps(GUIDE_SPEC))
    wide["deny"] = NARROW_DENY
    wide["options"] = {"max_session_ttl": "8h"}
    setup = run_playbook(tmp_path / "wide", play([{"name": "role", "lanyard.machine_id.teleport_role":
                                                   {"name": name, "spec": wide}}], defaults))
    assert setup.rc == 0 and setup.changed("role"), setup.stdout[-3000:]
    stored = tctl_json(teleport, "get", f"role/{name}")[0]["spec"]
    assert stored["allow"]["kubernetes_users"] == ["alice"]
    assert stored["deny"]["kubernetes_groups"] == ["system:masters"]
    assert stored["options"]["max_session_ttl"] == "8h0m0s"

    narrow = {"allow": dict((k, v) for k, v in GUIDE_SPEC["allow"].items() if k != "kubernetes_users")}
    pb = play([{"name": "role", "lanyard.machine_id.teleport_role": {"name": name, "spec": narrow}}], defaults)
    check = run_playbook(tmp_path / "check", pb, check=True, diff=True)
    res = check.result("role")
    assert check.rc == 0 and res["changed"], check.stdout[-3000:]
    for removed in ("spec.allow.kubernetes_users (removed)", "spec.deny (removed)",
                    "spec.options.max_session_ttl (changed)"):
        assert removed in res["msg"], res["msg"]
    before, after = (yaml.safe_load(res["diff"][k]) for k in ("before", "after"))
    assert before["spec"]["allow"]["kubernetes_users"] == ["alice"]
    assert before["spec"]["deny"] == NARROW_DENY and "deny" not in after["spec"]
    assert "kubernetes_users" not in after["spec"]["allow"]
    assert after["spec"]["options"]["max_session_ttl"] == "30h0m0s"      # back to Teleport's default
    assert tctl_json(teleport, "get", f"role/{name}")[0]["spec"] == stored  # check mode wrote nothing

    real = run_playbook(tmp_path / "real", pb, diff=True)
    res = real.result("role")
    assert real.rc == 0 and res["changed"] and not res.get("warnings"), real.stdout[-3000:]
    assert res["diff"] == check.result("role")["diff"]                     # --diff showed what the write did
    # read right away (the module waited for its write to show), as the local admin, by another route
    server = tctl_json(teleport, "get", f"role/{name}")[0]
    assert "kubernetes_users" not in server["spec"]["allow"] and server["spec"].get("deny", {}) == {}
    assert server["spec"]["options"]["max_session_ttl"] == "30h0m0s"
    after_spec = yaml.safe_load(res["diff"]["after"])["spec"]
    assert {k: v for k, v in server["spec"].items() if v} == after_spec   # after == what is on the server
    reruns = [run_playbook(tmp_path / f"rerun{i}", pb, check=c, diff=True) for i, c in enumerate((True, False))]
    assert [r.result("role")["changed"] for r in reruns] == [False, False]


def test_role_server_defaults_cause_no_changes(teleport_multiplex, tmp_path):
    """Roles whose stored form differs from the task only by Teleport's own defaults and forms settle at once:
    a v5 role (the server adds kubernetes_resources), declared defaults, durations and one-element label lists."""
    tp = teleport_multiplex
    v5, explicit = uniq(tp, "v5"), uniq(tp, "defaults")
    tasks = [
        {"name": "v5", "lanyard.machine_id.teleport_role": {
            "name": v5, "role_version": "v5",
            "spec": {"allow": {"kubernetes_labels": {"env": ["dev"]}, "kubernetes_groups": ["viewers"]}}}},
        {"name": "explicit", "lanyard.machine_id.teleport_role": {"name": explicit, "spec": {
            "allow": {"kubernetes_labels": {"*": ["*"]}, "logins": []},
            "deny": {},
            "options": {"max_session_ttl": "30h", "forward_agent": False, "cert_format": "standard",
                        "record_session": {"desktop": True, "default": "best_effort"}}}}},
    ]
    pb = play(tasks, conn(tp, "local"))
    for task in ("v5", "explicit"):
        runs = four_runs(tmp_path / task, play([t for t in tasks if t["name"] == task], conn(tp, "local")), task)
        assert [r["changed"] for r in runs] == [True, True, False, False], task
    stored = tctl_json(tp, "get", f"role/{v5}")[0]
    assert stored["version"] == "v5"
    assert stored["spec"]["allow"]["kubernetes_resources"] == [{"kind": "pod", "namespace": "*", "name": "*"}]
    assert not run_playbook(tmp_path / "both", pb).changed("v5")


# -- teleport_bot ---------------------------------------------------------------------------------------
def test_bot_lifecycle(teleport, tmp_path):
    role, other, bot = uniq(teleport, "r"), uniq(teleport, "r2"), uniq(teleport, "bot")
    defaults = conn(teleport, "remote")
    setup = play([{"name": f"role {r}", "lanyard.machine_id.teleport_role": {"name": r, "spec": GUIDE_SPEC}}
                  for r in (role, other)], defaults)
    setup_run = run_playbook(tmp_path / "setup", setup)
    assert setup_run.rc == 0, setup_run.stdout[-3000:]

    pb = play([{"name": "bot", "lanyard.machine_id.teleport_bot": {"name": bot, "roles": [role]}}], defaults)
    runs = four_runs(tmp_path / "create", pb, "bot")
    assert [r["changed"] for r in runs] == [True, True, False, False]
    assert all("token" not in r for r in runs)
    bot_role = tctl_json(teleport, "get", f"role/bot-{bot}")[0]
    assert bot_role["spec"]["allow"]["impersonate"]["roles"] == [role]
    # the token `tctl bots add` made was revoked: no pending token for this bot
    assert not [t for t in tctl_json(teleport, "get", "tokens") or [] if t["spec"].get("bot_name") == bot]

    # a host joins with a token of this bot
    token_file = tmp_path / "token"
    mint = play([{"name": "token", "lanyard.machine_id.teleport_bot_token": {"bot": bot, "name": "h1"},
                  "register": "join"},
                 {"name": "save", "ansible.builtin.copy": {"content": "{{ join.token }}", "dest": str(token_file)},
                  "no_log": True}], defaults)
    setup_run = run_playbook(tmp_path / "mint", mint)
    assert setup_run.rc == 0, setup_run.stdout[-3000:]
    joined = tbot_oneshot(teleport, token_file, tmp_path / "tbot")
    assert joined.returncode == 0 and f"roles=[{role}]" in joined.stderr, joined.stderr[-2000:]

    # v13 has no `bots update`, but a roles change goes into the bot's role bot-<name> in place ...
    pb2 = play([{"name": "bot", "lanyard.machine_id.teleport_bot": {"name": bot, "roles": [role, other]}}],
               defaults)
    runs = four_runs(tmp_path / "roles", pb2, "bot")
    assert [r["changed"] for r in runs] == [True, True, False, False]
    assert "next renewal" in runs[1]["msg"] and not runs[1].get("warnings")

    def roles_updated():
        bot_role = tctl_json(teleport, "get", f"role/bot-{bot}")[0]
        assert sorted(bot_role["spec"]["allow"]["impersonate"]["roles"]) == sorted([role, other])
    roles_updated()   # no waiting: the module returned once its write showed
    # ... and the joined host's next renewal (same storage, no new join) impersonates both roles
    renewed = tbot_oneshot(teleport, token_file, tmp_path / "tbot")
    assert renewed.returncode == 0, renewed.stderr[-2000:]
    line = [ln for ln in renewed.stderr.splitlines() if "impersonated certificates" in ln][-1]
    assert role in line and other in line, line

    # a logins change cannot be made in place on v13: clear failure without force ...
    pb3 = play([{"name": "bot", "lanyard.machine_id.teleport_bot":
                 {"name": bot, "roles": [role, other], "logins": ["deploy"]}}], defaults)
    fail = run_playbook(tmp_path / "noforce", pb3)
    res = fail.result("bot")
    assert fail.rc != 0 and res["_status"] == "failed"
    assert "bots update" in res["msg"] and "force: true" in res["msg"] and "Traceback" not in fail.stdout
    # ... and a recreate with force (changed, changed, unchanged, unchanged), warning about identities
    pb4 = play([{"name": "bot", "lanyard.machine_id.teleport_bot":
                 {"name": bot, "roles": [role, other], "logins": ["deploy"], "force": True}}], defaults)
    runs = four_runs(tmp_path / "force", pb4, "bot")
    assert [r["changed"] for r in runs] == [True, True, False, False]
    assert "stop working" in json.dumps(runs[1].get("warnings"))

    def logins_updated():
        user = tctl_json(teleport, "get", f"user/bot-{bot}")[0]
        assert user["spec"]["traits"]["logins"] == ["deploy"]
    logins_updated()   # no waiting: the module returned once its write showed

    # unknown role: clear message naming the role
    pb5 = play([{"name": "bot", "lanyard.machine_id.teleport_bot": {"name": uniq(teleport, "b"),
                                                                    "roles": ["no-such-role"]}}], defaults)
    run = run_playbook(tmp_path / "unknown", pb5)
    assert run.rc != 0 and "no-such-role do not exist" in run.result("bot")["msg"]

    pb6 = play([{"name": "bot", "lanyard.machine_id.teleport_bot": {"name": bot, "state": "absent"}}], defaults)
    runs = four_runs(tmp_path / "absent", pb6, "bot")
    assert [r["changed"] for r in runs] == [True, True, False, False]

    def bot_gone():
        assert teleport.tctl("get", f"user/bot-{bot}", "--format=json").returncode != 0
    bot_gone()   # no waiting: the module returned once its write showed


# -- teleport_bot_token + tbot --------------------------------------------------------------------------------
def tbot_oneshot(tp, token_file: Path, workdir: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """The bed's real tbot v13, config v1 as in the guide, joining through the proxy once."""
    storage, dest = workdir / "storage", workdir / "out"
    storage.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "tbot.yaml"
    cfg.write_text(yaml.safe_dump({
        "auth_server": tp.proxy_addr,
        "onboarding": {"join_method": "token", "token": str(token_file)},
        "storage": {"directory": str(storage)},
        "destinations": [{"directory": str(dest), "kubernetes_cluster": tb.KUBE_CLUSTER_NAME}],
    }))
    return subprocess.run([str(tp.bins["tbot"]), "start", "-c", str(cfg), "--oneshot"], capture_output=True,
                          text=True, timeout=timeout, env=tp.env, check=False)


def test_bot_token_mints_joins_once_and_never_leaks(teleport, tmp_path):
    role, bot = uniq(teleport, "r"), uniq(teleport, "bot")
    defaults = conn(teleport, "local")
    setup = play([{"name": "role", "lanyard.machine_id.teleport_role": {"name": role, "spec": GUIDE_SPEC}},
                  {"name": "bot", "lanyard.machine_id.teleport_bot": {"name": bot, "roles": [role]}}], defaults)
    setup_run = run_playbook(tmp_path / "setup", setup)
    assert setup_run.rc == 0, setup_run.stdout[-3000:]

    token_file = tmp_path / "join-token"
    facts_file = tmp_path / "facts.json"
    pb = play([
        {"name": "token", "lanyard.machine_id.teleport_bot_token": {"bot": bot, "name": "host1", "ttl": "15m"},
         "register": "join"},
        {"name": "save token", "ansible.builtin.copy": {"content": "{{ join.token }}", "dest": str(token_file),
                                                        "mode": "0600"},
         "no_log": True, "when": "join.token is defined"},
        {"name": "save facts", "ansible.builtin.copy": {
            "content": "{{ {'expires': join.expires, 'ca_pins': join.ca_pins, 'proxy_addr': join.proxy_addr} "
                       "| to_json }}", "dest": str(facts_file)},
         "when": "not ansible_check_mode"},
    ], defaults)
    outputs = []
    results = []
    for i, check in enumerate((True, False, True, False)):
        run = run_playbook(tmp_path / f"run{i}", pb, check=check, diff=True, verbosity=3)
        assert run.rc == 0, run.stdout[-3000:]
        results.append(run.result("token"))
        outputs.append(run.stdout)
    assert [r["changed"] for r in results] == [True, True, False, False]
    token = token_file.read_text()
    assert len(token) == 32
    # the token is nowhere in the -vvv output of any run (the module's result is hidden when it holds one)
    for out in outputs:
        assert token not in out
    assert "the output has been hidden" in outputs[1]
    facts = json.loads(facts_file.read_text())
    assert facts["ca_pins"] == [teleport.status_ca_pin()] and facts["proxy_addr"] == teleport.proxy_addr
    # confirm by another route: a Bot token bound to this bot with our label exists
    mine = [t for t in tctl_json(teleport, "get", "tokens") if t["metadata"]["name"] == token]
    assert mine and mine[0]["spec"]["bot_name"] == bot and mine[0]["spec"]["roles"] == ["Bot"]
    assert mine[0]["metadata"]["labels"]["lanyard.machine_id/name"] == "host1"

    # the real tbot joins with it, and writes a kubeconfig ...
    first = tbot_oneshot(teleport, token_file, tmp_path / "tbot1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "tbot1" / "out" / "kubeconfig.yaml").exists()
    # ... and the same token used twice fails
    second = tbot_oneshot(teleport, token_file, tmp_path / "tbot2")
    assert second.returncode != 0
    # v13 says either (the second depends on whether the auth cache still listed the used token)
    assert ("token expired or not found" in second.stderr
            or "already been issued a renewable certificate" in second.stderr), second.stderr[-2000:]

    # the used token is gone (once the auth cache catches up), so the next run mints a new one for host1
    def used_token_gone():
        assert token not in json.dumps(tctl_json(teleport, "get", "tokens"))
    eventually(used_token_gone)
    again = run_playbook(tmp_path / "again", pb)
    assert again.changed("token") and token_file.read_text() != token

    # state: absent revokes it (check mode first); a revoked token no longer joins
    revoked_value = token_file.read_text()
    pb_absent = play([{"name": "token", "lanyard.machine_id.teleport_bot_token":
                       {"bot": bot, "name": "host1", "state": "absent"}}], defaults)
    runs = four_runs(tmp_path / "absent", pb_absent, "token")
    assert [r["changed"] for r in runs] == [True, True, False, False]
    assert revoked_value not in json.dumps(tctl_json(teleport, "get", "tokens"))
    third = tbot_oneshot(teleport, token_file, tmp_path / "tbot3")
    assert third.returncode != 0


def test_bot_return_token_is_hidden_at_vvv(teleport_multiplex, tmp_path):
    tp = teleport_multiplex
    role, bot = uniq(tp, "r"), uniq(tp, "bot")
    token_file = tmp_path / "token"
    pb = play([
        {"name": "role", "lanyard.machine_id.teleport_role": {"name": role, "spec": GUIDE_SPEC}},
        {"name": "bot", "lanyard.machine_id.teleport_bot": {"name": bot, "roles": [role], "return_token": True},
         "register": "created"},
        {"name": "save", "ansible.builtin.copy": {"content": "{{ created.token }}", "dest": str(token_file)},
         "no_log": True},
    ], conn(tp, "remote"))
    run = run_playbook(tmp_path / "run", pb, diff=True, verbosity=3)
    assert run.rc == 0, run.stdout[-3000:]
    token = token_file.read_text()
    assert len(token) == 32 and token not in run.stdout
    joined = tbot_oneshot(tp, token_file, tmp_path / "tbot")
    assert joined.returncode == 0, joined.stderr[-2000:]


def _bot_tokens(tp, bot: str) -> list[dict]:
    return [t for t in tctl_json(tp, "get", "tokens", "--with-secrets") or [] if t["spec"].get("bot_name") == bot]


def test_token_modules_refuse_async(teleport, tmp_path):
    """Issue 13: with async + async_status the token used to print in clear and sit in a 0644 job file. A task that
    may return a token now fails before anything is minted; async still works for a task that returns none."""
    role, bot, new_bot = uniq(teleport, "r"), uniq(teleport, "bot"), uniq(teleport, "nbot")
    defaults = conn(teleport, "remote")
    setup = run_playbook(tmp_path / "setup", play([
        {"name": "role", "lanyard.machine_id.teleport_role": {"name": role, "spec": GUIDE_SPEC}},
        {"name": "bot", "lanyard.machine_id.teleport_bot": {"name": bot, "roles": [role]}}], defaults))
    assert setup.rc == 0, setup.stdout[-3000:]
    async_dir = tmp_path / "async"
    env = {"ANSIBLE_ASYNC_DIR": str(async_dir)}

    def status(job: str) -> dict:
        return {"name": f"status {job}", "ansible.builtin.async_status": {"jid": "{{ %s.ansible_job_id }}" % job},
                "register": f"{job}_status", "until": f"{job}_status.finished", "retries": 30, "delay": 1,
                "when": f"{job}.ansible_job_id is defined"}

    pb = play([
        {"name": "token poll 0", "lanyard.machine_id.teleport_bot_token": {"bot": bot, "name": "h-async"},
         "async": 60, "poll": 0, "register": "job1", "ignore_errors": True},
        status("job1"),
        {"name": "token poll 2", "lanyard.machine_id.teleport_bot_token": {"bot": bot, "name": "h-async2"},
         "async": 60, "poll": 2, "register": "job2", "ignore_errors": True},
        {"name": "new bot with token", "lanyard.machine_id.teleport_bot":
            {"name": new_bot, "roles": [role], "return_token": True},
         "async": 60, "poll": 0, "register": "job3", "ignore_errors": True},
        status("job3"),
        # no token can come back from a revoke: async runs as usual
        {"name": "revoke async", "lanyard.machine_id.teleport_bot_token": {"bot": bot, "name": "h-async",
                                                                           "state": "absent"},
         "async": 60, "poll": 0, "register": "job4"},
        status("job4"),
    ], defaults)
    run = run_playbook(tmp_path / "run", pb, verbosity=3, env=env)
    assert run.rc == 0, run.stdout[-3000:]
    for task in ("token poll 0", "token poll 2", "new bot with token"):
        res = run.result(task)
        assert res["_status"] == "failed" and "async is not supported" in res["msg"] and "Fix:" in res["msg"], res
        assert "ansible_job_id" not in res
    assert run.result("status job1")["_status"] == "skipped" and run.result("status job3")["_status"] == "skipped"
    assert run.result("status job4")["_status"] == "ok" and run.result("status job4")["finished"]
    # nothing was minted or created ...
    assert _bot_tokens(teleport, bot) == []
    assert teleport.tctl("get", f"user/bot-{new_bot}", "--format=json").returncode != 0
    # ... and no job file holds anything shaped like a token (the revoke's job file is there, token-free)
    job_files = [f for f in async_dir.rglob("*") if f.is_file()]
    assert job_files, "the async revoke wrote no job file"
    for f in job_files:
        text = f.read_text()
        assert not re.search(r"[0-9a-f]{32}", text), (f, text[:500])
    assert not re.search(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])", run.stdout)

    # the same token task without async mints, and its token is nowhere in the output or the async dir
    plain = run_playbook(tmp_path / "plain", play([
        {"name": "token", "lanyard.machine_id.teleport_bot_token": {"bot": bot, "name": "h-async"},
         "register": "join"}], defaults), verbosity=3, env=env)
    assert plain.rc == 0 and plain.changed("token"), plain.stdout[-3000:]
    minted = [t["metadata"]["name"] for t in _bot_tokens(teleport, bot)]
    assert len(minted) == 1 and minted[0] not in plain.stdout
    assert not any(minted[0] in f.read_text() for f in async_dir.rglob("*") if f.is_file())


# -- teleport_cluster_info ---------------------------------------------------------------------------
def test_cluster_info(teleport, tmp_path):
    pb = play([{"name": "info", "lanyard.machine_id.teleport_cluster_info":
                {"proxy_addr": teleport.proxy_addr, "ca_path": str(teleport.web_ca_path)}}],
              conn(teleport, "remote"))
    runs = four_runs(tmp_path, pb, "info")
    assert [r["changed"] for r in runs] == [False] * 4
    c = runs[1]["cluster"]
    ping = teleport.ping()
    assert c["cluster_name"] == tb.CLUSTER_NAME == ping["cluster_name"]
    assert c["server_version"] == "13.3.8"
    assert c["ca_pins"] == teleport.ca_pins() == [teleport.status_ca_pin()]
    assert c["tls_routing_enabled"] is (teleport.mode == "multiplex")
    if teleport.mode == "separate":
        assert c["kube_public_addr"] == teleport.kube_public_addr == c["kube_addr"]
    else:
        assert c["kube_addr"] == teleport.proxy_addr


def test_cluster_info_tls_verification(teleport_multiplex, tmp_path):
    tp = teleport_multiplex
    pb = play([{"name": "info", "lanyard.machine_id.teleport_cluster_info":
                {"proxy_addr": tp.proxy_addr, "ca_pins": False}}], {})
    run = run_playbook(tmp_path / "noca", pb, env={"SSL_CERT_FILE": "/nonexistent", "SSL_CERT_DIR": "/nonexistent"})
    res = run.result("info")
    assert run.rc != 0 and "ca_path" in res["msg"] and tp.proxy_addr in res["msg"]
    pb2 = play([{"name": "info", "lanyard.machine_id.teleport_cluster_info":
                 {"proxy_addr": tp.proxy_addr, "ca_pins": False, "insecure": True}}], {})
    assert run_playbook(tmp_path / "insecure", pb2).result("info")["cluster"]["cluster_name"] == tb.CLUSTER_NAME


# -- errors that name the object and the fix ------------------------------------------------------------
def test_connection_errors(teleport_multiplex, tmp_path):
    tp = teleport_multiplex
    limited = tmp_path / "limited.pem"
    expired = tmp_path / "expired.pem"
    user = uniq(tp, "user")
    tp.tctl("users", "add", user, "--roles=access", check=True)
    tp.tctl("auth", "sign", f"--user={user}", "--format=file", f"--out={limited}", "--ttl=1h", "--overwrite",
            check=True)
    tp.tctl("auth", "sign", f"--user={user}", "--format=file", f"--out={expired}", "--ttl=1s", "--overwrite",
            check=True)
    task = {"name": "role", "lanyard.machine_id.teleport_role": {"name": uniq(tp, "role"), "spec": GUIDE_SPEC}}
    cases = {
        "no tctl": ({"tctl_path": str(tmp_path / "missing" / "tctl"), "config_file": str(tp.config_path)},
                    ["tctl not found at tctl_path", "Fix:"]),
        "unreachable": ({"tctl_path": str(tp.bins["tctl"]), "auth_server": "127.0.0.1:1",
                         "identity_file": str(tp.admin_identity)},
                        ["could not reach auth server 127.0.0.1:1", "Fix:"]),
        "denied": ({"tctl_path": str(tp.bins["tctl"]), "auth_server": tp.auth_addr, "identity_file": str(limited)},
                   ["permission denied for identity file %s" % limited, "access denied", "Fix:"]),
        "expired": ({"tctl_path": str(tp.bins["tctl"]), "auth_server": tp.auth_addr, "identity_file": str(expired)},
                    ["identity file %s has expired" % expired, "tctl auth sign", "Fix:"]),
    }
    time.sleep(1.5)  # let the 1s identity expire
    for case, (defaults, needles) in cases.items():
        run = run_playbook(tmp_path / case.replace(" ", "-"), play([task], defaults))
        res = run.result("role")
        assert run.rc != 0 and res["_status"] == "failed", case
        for needle in needles:
            assert needle in res["msg"], (case, res["msg"])
        assert "Traceback" not in run.stdout and "\x1b[" not in res["msg"], case
