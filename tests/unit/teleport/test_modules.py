# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The four modules end to end against a scripted tctl (recorded v13 answers): results, check mode, diff,
version adaptation and error messages."""

from __future__ import annotations

import json

import pytest

from ansible_collections.lanyard.machine_id.plugins.modules import teleport_bot
from ansible_collections.lanyard.machine_id.plugins.modules import teleport_bot_token
from ansible_collections.lanyard.machine_id.plugins.modules import teleport_cluster_info
from ansible_collections.lanyard.machine_id.plugins.modules import teleport_role
from ansible_collections.lanyard.machine_id.plugins.module_utils import _teleport_info

from conftest import FakeTctl, recorded

NOT_FOUND_ROLE = (1, "", recorded("v13_err_role_not_found.txt"))
NOT_FOUND_USER = (1, "", recorded("v13_err_user_not_found.txt"))
GUIDE = json.loads(recorded("v13_get_role_guide.json"))[0]
GUIDE_SPEC = {"allow": {"kubernetes_labels": {"*": "*"},
                        "kubernetes_resources": [{"kind": "pod", "namespace": "*", "name": "*"}],
                        "kubernetes_groups": ["example"], "kubernetes_users": ["alice"]}}


# -- teleport_role ---------------------------------------------------------------------------------
def test_role_create_check_mode_writes_nothing_and_diffs(run_module):
    fake = FakeTctl().on("get", "role/machine-id-kube-role", fn=lambda a, d: NOT_FOUND_ROLE)
    res = run_module(teleport_role.main, {"name": "machine-id-kube-role", "spec": GUIDE_SPEC}, fake,
                     check=True, diff=True)
    assert res["changed"] and "would be created" in res["msg"]
    assert fake.writes() == []
    assert res["diff"]["before"] == "" and "kubernetes_users:\n    - alice" in res["diff"]["after"]


def test_role_create_then_unchanged(run_module):
    state = {"role": None}

    def get(args, data):
        return (0, json.dumps([state["role"]]), "") if state["role"] else NOT_FOUND_ROLE

    def create(args, data):
        assert args == ["create", "-"]
        state["role"] = GUIDE          # what the v13 server stored for the guide's role
        assert json.loads(data)["spec"] == GUIDE_SPEC
        return 0, "role 'machine-id-kube-role' has been created\n", ""

    fake = FakeTctl().on("get", "role/machine-id-kube-role", fn=get).on("create", fn=create)
    args = {"name": "machine-id-kube-role", "spec": GUIDE_SPEC}
    first = run_module(teleport_role.main, args, fake)
    assert first["changed"] and first["role"]["spec"]["options"]["max_session_ttl"] == "30h0m0s"
    assert first["warnings"] == []
    second = run_module(teleport_role.main, args, fake, diff=True)
    assert not second["changed"] and second["diff"]["before"] == second["diff"]["after"]
    assert len(fake.writes()) == 1


def test_role_update_uses_force_and_shows_diff(run_module):
    fake = FakeTctl().on("get", "role/machine-id-kube-role", out=json.dumps([GUIDE])).on("create", out="")
    spec = json.loads(json.dumps(GUIDE_SPEC))
    spec["allow"]["kubernetes_groups"] = ["viewers"]
    res = run_module(teleport_role.main, {"name": "machine-id-kube-role", "spec": spec}, fake, diff=True)
    assert res["changed"]
    assert ["create", "-f", "-"] in fake.writes()
    assert "- example" in res["diff"]["before"] and "- viewers" in res["diff"]["after"]


def test_role_absent(run_module):
    state = {"role": GUIDE}
    fake = FakeTctl().on("get", "role/machine-id-kube-role",
                         fn=lambda a, d: (0, json.dumps([state["role"]]), "") if state["role"] else NOT_FOUND_ROLE)
    fake.on("rm", fn=lambda a, d: (state.update(role=None), (0, "", ""))[1])
    res = run_module(teleport_role.main, {"name": "machine-id-kube-role", "state": "absent"}, fake, check=True)
    assert res["changed"] and fake.writes() == []
    res = run_module(teleport_role.main, {"name": "machine-id-kube-role", "state": "absent"}, fake)
    assert res["changed"] and fake.writes() == [["rm", "role/machine-id-kube-role"]] and not res["warnings"]


def _lagging_role_server(role, lag_reads):
    """A server whose reads show the previous role for ``lag_reads`` reads after each write (Teleport's cache)."""
    state = {"stored": role, "seen": role, "lag": 0}

    def get(args, data):
        if state["lag"] > 0:
            state["lag"] -= 1
        else:
            state["seen"] = state["stored"]
        return (0, json.dumps([state["seen"]]), "") if state["seen"] else NOT_FOUND_ROLE

    def write(stored):
        state["stored"], state["lag"] = stored, lag_reads
        return 0, "", ""

    def create(args, data):
        res = json.loads(data)
        stored = json.loads(json.dumps(GUIDE))          # the server's defaults, as v13 prints them
        stored["metadata"] = dict(res["metadata"], id=(state["stored"] or {}).get("metadata", {}).get("id", 0) + 1)
        stored["spec"]["allow"] = res["spec"].get("allow") or {}
        stored["spec"]["deny"] = res["spec"].get("deny") or {}
        return write(stored)

    fake = FakeTctl().on("get", "role/machine-id-kube-role", fn=get)
    fake.on("create", fn=create).on("rm", fn=lambda a, d: write(None))
    return fake, state


@pytest.fixture
def short_wait(monkeypatch):
    from ansible_collections.lanyard.machine_id.plugins.module_utils import _teleport_wait
    monkeypatch.setattr(_teleport_wait, "DEFAULT_TIMEOUT", 5.0)
    monkeypatch.setattr(_teleport_wait, "DEFAULT_INTERVAL", 0.001)


def test_role_narrowed_on_the_server_and_diff_shows_the_write(run_module, short_wait):
    """Issue 13: dropping kubernetes_users and the deny block must remove them from the server."""
    server = json.loads(json.dumps(GUIDE))
    server["spec"]["deny"] = {"kubernetes_groups": ["system:masters"]}
    fake, state = _lagging_role_server(server, lag_reads=3)
    narrow = {"allow": dict((k, v) for k, v in GUIDE_SPEC["allow"].items() if k != "kubernetes_users")}
    args = {"name": "machine-id-kube-role", "spec": narrow}
    check = run_module(teleport_role.main, args, fake, check=True, diff=True)
    assert check["changed"] and fake.writes() == []
    assert "spec.allow.kubernetes_users (removed)" in check["msg"] and "spec.deny (removed)" in check["msg"]
    assert "kubernetes_users" in check["diff"]["before"] and "system:masters" in check["diff"]["before"]
    assert "kubernetes_users" not in check["diff"]["after"] and "deny" not in check["diff"]["after"]
    assert "max_session_ttl: 30h0m0s" in check["diff"]["after"]      # the defaults the write keeps
    real = run_module(teleport_role.main, args, fake, diff=True)
    assert real["changed"] and real["diff"] == check["diff"] and not real["warnings"]
    written = json.loads(fake.calls[[c[0] for c in fake.calls].index(["create", "-f", "-"])][1])
    assert written["spec"] == narrow                                 # the whole declared role, nothing else
    assert "kubernetes_users" not in state["stored"]["spec"]["allow"] and not state["stored"]["spec"]["deny"]
    # the module returned only once its write showed, so the very next run is honest despite the lag
    again = run_module(teleport_role.main, args, fake, check=True)
    assert not again["changed"], again["msg"]


def test_role_absent_returns_once_the_delete_shows(run_module, short_wait):
    """The fresh-clone CI failure: right after the delete, a cached read still showed the role."""
    fake, state = _lagging_role_server(json.loads(json.dumps(GUIDE)), lag_reads=4)
    args = {"name": "machine-id-kube-role", "state": "absent"}
    res = run_module(teleport_role.main, args, fake)
    assert res["changed"] and not res["warnings"]
    gets = [c for c in fake.commands() if c[0] == "get"]
    assert len(gets) == 1 + 4 + 1                                    # before, 4 stale reads, the one that shows it
    assert not run_module(teleport_role.main, args, fake, check=True)["changed"]


def test_role_absent_warns_when_the_delete_never_shows(run_module, monkeypatch):
    from ansible_collections.lanyard.machine_id.plugins.module_utils import _teleport_wait
    monkeypatch.setattr(_teleport_wait, "DEFAULT_TIMEOUT", 0.05)
    monkeypatch.setattr(_teleport_wait, "DEFAULT_INTERVAL", 0.01)
    fake, state = _lagging_role_server(json.loads(json.dumps(GUIDE)), lag_reads=10 ** 6)
    res = run_module(teleport_role.main, {"name": "machine-id-kube-role", "state": "absent"}, fake)
    assert res["changed"] and "still lists it" in res["warnings"][0] and "Fix:" in res["warnings"][0]


def test_role_needs_spec_or_resource(run_module):
    res = run_module(teleport_role.main, {"name": "x"}, FakeTctl())
    assert res["failed"] and "spec" in res["msg"] and "resource" in res["msg"]


# -- teleport_bot ---------------------------------------------------------------------------------------
def _bot_server(exists=True, version="Teleport v13.3.8 git: go1.21.13"):
    fake = FakeTctl(version_text=version)
    state = {"exists": exists, "roles": ["machine-id-kube-role"], "generation": "2", "locks": []}

    def get_user(args, data):
        if not state["exists"]:
            return NOT_FOUND_USER
        user = json.loads(recorded("v13_get_user_bot_example.json"))  # joined: generation label 2
        if state["generation"] is None:
            del user[0]["metadata"]["labels"]["teleport.internal/bot-generation"]
        else:
            user[0]["metadata"]["labels"]["teleport.internal/bot-generation"] = state["generation"]
        return 0, json.dumps(user), ""

    def get_role(args, data):
        if not state["exists"]:
            return NOT_FOUND_ROLE
        role = json.loads(recorded("v13_get_role_bot_example.json"))
        role[0]["spec"]["allow"]["impersonate"]["roles"] = state["roles"]
        return 0, json.dumps(role), ""

    def add(args, data):
        wanted = args[3].split("=", 1)[1].split(",")
        if [r for r in wanted if r not in state["known_roles"]]:  # v13 writes nothing then
            return 1, "", recorded("v13_err_bot_unknown_role.txt")
        state["exists"] = True
        state["generation"] = None  # a new bot has not joined yet
        state["roles"] = args[3].split("=", 1)[1].split(",")
        return 0, recorded("v13_bots_add_example2.json"), ""

    def rm(args, data):
        state["exists"] = False
        return 0, 'Bot "example" deleted successfully.\n', ""

    fake.on("get", "user/bot-example", fn=get_user).on("get", "role/bot-example", fn=get_role)
    roles = json.loads(recorded("v13_get_roles.json")) + [{"metadata": {"name": "other-role"}}]
    state["known_roles"] = [r["metadata"]["name"] for r in roles]

    def get_roles(args, data):
        return 0, json.dumps([r for r in roles if r["metadata"]["name"] in state["known_roles"]]), ""

    fake.on("get", "roles", fn=get_roles)
    # The recorded tokens expired long ago; keep them pending so the module sees them as live.
    tokens = json.loads(recorded("v13_get_tokens.json"))
    for t in tokens:
        t["metadata"]["expires"] = "2999-01-01T00:00:00Z"
    fake.on("get", "tokens", out=json.dumps(tokens))
    fake.on("bots", "add", fn=add).on("bots", "rm", fn=rm).on("create", out="")
    fake.on("bots", "update", out="")
    fake.on("get", "locks", fn=lambda args, data: (0, json.dumps(state["locks"]), ""))

    def rm_lock(args, data):
        state["locks"] = [lk for lk in state["locks"] if "lock/" + lk["metadata"]["name"] != args[1]]
        return 0, "lock has been deleted\n", ""

    fake.on("rm", fn=rm_lock)
    return fake, state


def _lock(name, user="bot-example"):
    """A lock as v13's `tctl get locks --format=json` lists it (shape checked by the real-bed rejoin test)."""
    return {"kind": "lock", "version": "v2", "metadata": {"name": name},
            "spec": {"target": {"user": user},
                     "message": "The bot user \"bot-example\" has been locked due to a certificate generation "
                                "mismatch, possibly indicating a stolen certificate."}}


def test_bot_create_never_returns_or_logs_the_token(run_module):
    fake = _bot_server(exists=False)[0]
    token = json.loads(recorded("v13_bots_add_example2.json"))["token_id"]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["machine-id-kube-role"]}, fake, diff=True)
    assert res["changed"] and res["msg"] == "bot example created"
    assert token not in json.dumps(res)
    # the token bots add printed is revoked on stdin, never named in argv
    create = [(a, d) for a, d in fake.calls if a[:1] == ["create"]]
    assert len(create) == 1 and create[0][0] == ["create", "-f", "-"]
    revoked = json.loads(create[0][1])
    assert revoked["metadata"]["name"] == token and revoked["metadata"]["expires"] < _now()
    assert not any(token in a for argv in fake.argvs for a in argv)


def test_bot_create_with_return_token(run_module):
    fake = _bot_server(exists=False)[0]
    token = json.loads(recorded("v13_bots_add_example2.json"))["token_id"]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["machine-id-kube-role"], "return_token": True},
                     fake)
    assert res["token"] == token and res["token_ttl"] == "10m"
    assert token not in res["msg"]


def test_bot_unchanged_and_check_mode(run_module):
    fake = _bot_server(exists=True)[0]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["machine-id-kube-role"]}, fake, check=True)
    assert not res["changed"] and res["bot"]["max_session_ttl"] == "12h"
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["machine-id-kube-role"]}, fake)
    assert not res["changed"] and fake.writes() == []


def test_bot_role_change_on_v13_updates_the_bot_role(run_module):
    fake = _bot_server(exists=True)[0]
    args = {"name": "example", "roles": ["machine-id-kube-role", "other-role"]}
    res = run_module(teleport_bot.main, args, fake, check=True, diff=True)
    assert res["changed"] and "would be updated" in res["msg"] and fake.writes() == []
    assert "- other-role" in res["diff"]["after"] and "other-role" not in res["diff"]["before"]
    res = run_module(teleport_bot.main, args, fake)
    assert res["changed"] and "in its role bot-example" in res["msg"] and not res["warnings"]
    creates = [(a, d) for a, d in fake.calls if a[:1] == ["create"]]
    assert [call[0] for call in creates] == [["create", "-f", "-"]]
    written = json.loads(creates[0][1])
    assert written["metadata"]["name"] == "bot-example" and "id" not in written["metadata"]
    assert written["metadata"]["labels"] == {"teleport.internal/bot": "example"}
    assert written["spec"]["allow"]["impersonate"]["roles"] == ["machine-id-kube-role", "other-role"]
    assert written["spec"]["allow"]["rules"][0]["resources"] == ["cert_authority"]   # rest of the role kept
    assert not any(c[:2] in (["bots", "rm"], ["bots", "add"]) for c in fake.writes())


def test_bot_logins_change_on_v13_fails_without_force(run_module):
    fake = _bot_server(exists=True)[0]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["machine-id-kube-role"], "logins": ["root"]},
                     fake)
    assert res["failed"] and "has no `bots update`" in res["msg"] and "force: true" in res["msg"]
    assert "13.3.8" in res["msg"] and "logins" in res["msg"] and fake.writes() == []


def test_bot_logins_change_on_v13_with_force_recreates(run_module):
    fake, state = _bot_server(exists=True)
    args = {"name": "example", "roles": ["machine-id-kube-role", "other-role"], "logins": ["root"], "force": True}
    res = run_module(teleport_bot.main, args, fake, check=True)
    assert res["changed"] and "would be recreated" in res["msg"] and fake.writes() == []
    res = run_module(teleport_bot.main, args, fake)
    assert res["changed"] and res["msg"] == "bot example recreated"
    assert any("identities issued to it stop working" in w for w in res["warnings"])
    cmds = [c[:2] for c in fake.writes()]
    assert cmds.index(["bots", "rm"]) < cmds.index(["bots", "add"])
    assert state["roles"] == ["machine-id-kube-role", "other-role"]


def test_bot_role_change_on_v15_updates_in_place(run_module):
    fake = _bot_server(exists=True, version="Teleport v15.4.3 git:v15.4.3 go1.21.10")[0]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["machine-id-kube-role", "other-role"]}, fake)
    assert res["changed"] and "updated" in res["msg"]
    assert ["bots", "update", "example", "--set-roles=machine-id-kube-role,other-role"] in fake.writes()
    assert not any(c[:2] == ["bots", "rm"] for c in fake.writes())


def test_bot_unknown_role(run_module):
    fake = _bot_server(exists=False)[0]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["nope-role"]}, fake)
    assert res["failed"] and "role(s) nope-role do not exist" in res["msg"] and "Fix:" in res["msg"]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["nope-role"]}, fake, check=True)
    assert res["changed"] and "nope-role" in res["warnings"][0]


def test_bot_max_session_ttl_on_v13(run_module):
    fake = _bot_server(exists=False)[0]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["access"], "max_session_ttl": "8h"}, fake)
    assert res["failed"] and "cannot set max_session_ttl" in res["msg"]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["access"], "max_session_ttl": "12h"}, fake)
    assert res["changed"] and not any("--max-session-ttl" in a for c in fake.writes() for a in c)


def test_bot_rejoin_recreates_a_bot_that_already_joined(run_module):
    """v13 lets a bot join once: for a host without a usable identity, a bot whose user carries a generation is
    recreated and the new token returned; check mode says so and writes nothing."""
    fake, state = _bot_server(exists=True)
    args = {"name": "example", "roles": ["machine-id-kube-role"], "rejoin": True, "return_token": True}
    res = run_module(teleport_bot.main, args, fake, check=True)
    assert res["changed"] and "would be recreated" in res["msg"] and "generation 2" in res["msg"]
    assert fake.writes() == [] and "token" not in res
    res = run_module(teleport_bot.main, args, fake)
    assert res["changed"] and res["recreated"] and res["token"] and res["removed_locks"] == []
    cmds = [c[:2] for c in fake.writes()]
    assert cmds.index(["bots", "rm"]) < cmds.index(["bots", "add"])
    assert "generation" not in res["bot"]
    # the recreated bot has not joined: a second run with rejoin changes nothing (the host joins with the token)
    before = len(fake.writes())
    res = run_module(teleport_bot.main, args, fake)
    assert not res["changed"] and len(fake.writes()) == before and "token" not in res


def test_bot_rejoin_of_a_bot_that_never_joined_or_does_not_exist(run_module):
    fake, state = _bot_server(exists=True)
    state["generation"] = None
    args = {"name": "example", "roles": ["machine-id-kube-role"], "rejoin": True, "return_token": True}
    res = run_module(teleport_bot.main, args, fake)
    assert not res["changed"] and fake.writes() == []  # a token minted for it can be used
    fake, state = _bot_server(exists=False)
    res = run_module(teleport_bot.main, args, fake)
    assert res["changed"] and res["msg"] == "bot example created" and res["token"]


def test_bot_rejoin_of_a_locked_bot_needs_remove_locks(run_module):
    fake, state = _bot_server(exists=True)
    state["locks"] = [_lock("lock-1"), _lock("other", user="bot-else")]
    args = {"name": "example", "roles": ["machine-id-kube-role"], "rejoin": True, "return_token": True}
    res = run_module(teleport_bot.main, args, fake)
    assert res["failed"] and "bot example is locked" in res["msg"] and "lock/lock-1" in res["msg"]
    assert "remove_locks: true" in res["msg"] and "machine_id_reenrol_locked" in res["msg"] and "other" not in res["msg"]
    assert fake.writes() == []
    res = run_module(teleport_bot.main, dict(args, remove_locks=True), fake, check=True)
    assert res["changed"] and res["removed_locks"] == ["lock-1"] and fake.writes() == []
    res = run_module(teleport_bot.main, dict(args, remove_locks=True), fake)
    assert res["changed"] and res["removed_locks"] == ["lock-1"] and res["token"]
    assert [lk["metadata"]["name"] for lk in state["locks"]] == ["other"]  # only the bot's own lock
    assert ["rm", "lock/lock-1"] in fake.writes()
    assert any("lock(s) lock-1 were removed" in w for w in res["warnings"])


def test_bot_absent_revokes_its_tokens(run_module):
    fake = _bot_server(exists=True)[0]
    res = run_module(teleport_bot.main, {"name": "example", "state": "absent"}, fake)
    assert res["changed"] and ["bots", "rm", "example"] in fake.writes()
    assert res["revoked_tokens"] == 1     # the recorded token list holds one token of bot "example"


# -- teleport_bot_token -------------------------------------------------------------------------------
def _token_server():
    fake = FakeTctl()
    tokens = json.loads(recorded("v13_get_tokens.json"))
    for t in tokens:  # make the recorded tokens still valid
        t["metadata"]["expires"] = "2999-01-01T00:00:00Z"

    def create(args, data):
        res = json.loads(data)
        tokens[:] = [t for t in tokens if t["metadata"]["name"] != res["metadata"]["name"]]
        if res["metadata"]["expires"] > "2000" and res["metadata"]["expires"] > _now():
            tokens.append(res)
        return 0, "", ""

    fake.on("get", "tokens", fn=lambda a, d: (0, json.dumps(tokens), ""))
    fake.on("get", "user/bot-example", out=recorded("v13_get_user_bot_example.json"))
    fake.on("get", "user/bot-nope", fn=lambda a, d: NOT_FOUND_USER)
    fake.on("get", "proxies", out=recorded("v13_get_proxies.json"))
    fake.on("status", out=recorded("v13_status.txt"))
    fake.on("create", fn=create)
    return fake, tokens


def _now():
    from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_token import rfc3339, utcnow
    return rfc3339(utcnow())


def test_token_check_real_check_real(run_module):
    fake, tokens = _token_server()
    args = {"bot": "example", "name": "web1", "ttl": "30m"}
    runs = [run_module(teleport_bot_token.main, args, fake, check=c) for c in (True, False, True, False)]
    assert [r["changed"] for r in runs] == [True, True, False, False]
    assert "would mint" in runs[0]["msg"] and "token" not in runs[0] and "token" not in runs[2]
    value = runs[1]["token"]
    assert len(value) == 32 and runs[3]["token"] == value
    for r in runs:
        assert value not in r["msg"]
        assert r["ca_pins"] == [l.split()[-1] for l in recorded("v13_status.txt").splitlines() if "CA pin" in l]
        assert r["proxy_addr"] == json.loads(recorded("v13_get_proxies.json"))[0]["spec"]["public_addr"]
    mine = [t for t in tokens if t["metadata"].get("labels", {}).get("lanyard.machine_id/name") == "web1"]
    assert len(mine) == 1 and mine[0]["spec"] == {"roles": ["Bot"], "bot_name": "example", "join_method": "token"}
    assert not any(value in a for argv in fake.argvs for a in argv)


def test_token_force_and_absent(run_module):
    fake, tokens = _token_server()
    first = run_module(teleport_bot_token.main, {"bot": "example", "name": "web1"}, fake)
    forced = run_module(teleport_bot_token.main, {"bot": "example", "name": "web1", "force": True}, fake)
    assert forced["changed"] and forced["token"] != first["token"] and forced["revoked"] == 1
    names = [t["metadata"]["name"] for t in tokens]
    assert forced["token"] in names and first["token"] not in names
    res = run_module(teleport_bot_token.main, {"bot": "example", "name": "web1", "state": "absent"}, fake, check=True)
    assert res["changed"] and forced["token"] in [t["metadata"]["name"] for t in tokens]
    res = run_module(teleport_bot_token.main, {"bot": "example", "name": "web1", "state": "absent"}, fake)
    assert res["changed"] and res["revoked"] == 1 and forced["token"] not in [t["metadata"]["name"] for t in tokens]
    res = run_module(teleport_bot_token.main, {"bot": "example", "name": "web1", "state": "absent"}, fake)
    assert not res["changed"]


def test_token_for_unknown_bot(run_module):
    fake = _token_server()[0]
    res = run_module(teleport_bot_token.main, {"bot": "nope", "name": "web1"}, fake)
    assert res["failed"] and "bot nope does not exist" in res["msg"] and "teleport_bot" in res["msg"]


def test_token_mint_and_revoke_return_once_the_token_list_shows_them(run_module, short_wait):
    fake, tokens = _token_server()
    shown = {"list": json.loads(json.dumps(tokens)), "lag": 0}

    def get_tokens(args, data):                     # token list lags 2 reads behind every write
        if shown["lag"]:
            shown["lag"] -= 1
        else:
            shown["list"] = json.loads(json.dumps(tokens))
        return 0, json.dumps(shown["list"]), ""

    fake.on("get", "tokens", fn=get_tokens)
    inner = fake.rules[[r[0] for r in fake.rules].index(("create",))][1]

    def create(args, data):
        shown["lag"] = 2
        return inner(args, data)

    fake.on("create", fn=create)
    minted = run_module(teleport_bot_token.main, {"bot": "example", "name": "web9"}, fake)
    assert minted["changed"] and not minted["warnings"]
    again = run_module(teleport_bot_token.main, {"bot": "example", "name": "web9"}, fake)
    assert not again["changed"] and again["token"] == minted["token"]
    gone = run_module(teleport_bot_token.main, {"bot": "example", "name": "web9", "state": "absent"}, fake)
    assert gone["changed"] and not gone["warnings"]
    assert not run_module(teleport_bot_token.main, {"bot": "example", "name": "web9", "state": "absent"},
                          fake, check=True)["changed"]


@pytest.mark.parametrize("ttl", ["0s", "x", "200h"])
def test_token_bad_ttl(run_module, ttl):
    fake = _token_server()[0]
    res = run_module(teleport_bot_token.main, {"bot": "example", "name": "web1", "ttl": ttl}, fake)
    assert res["failed"] and "ttl" in res["msg"] and "Fix:" in res["msg"]


# -- teleport_cluster_info --------------------------------------------------------------------------
@pytest.mark.parametrize("name,tls,kube", [("v13_ping_multiplex.json", True, None),
                                           ("v13_ping_separate.json", False, "localhost:46455")])
def test_cluster_info_from_recorded_pings(run_module, monkeypatch, name, tls, kube):
    ping = json.loads(recorded(name))
    fake = FakeTctl().on("status", out=recorded("v13_status.txt"))
    monkeypatch.setattr(_teleport_info.cluster_info, "__defaults__", (lambda addr, **kw: ping,))
    res = run_module(teleport_cluster_info.main, {"proxy_addr": ping["proxy"]["ssh"]["public_addr"]}, fake)
    c = res["cluster"]
    assert not res["changed"] and c["cluster_name"] == "lanyard-testbed" and c["server_version"] == "13.3.8"
    assert c["tls_routing_enabled"] is tls and c["kube_public_addr"] == kube
    assert c["kube_addr"] == (c["proxy_public_addr"] if tls else kube)
    assert c["ca_pins"] and c["ca_pins"][0].startswith("sha256:")


def test_cluster_info_lists_users_under_a_lock_in_force(run_module, monkeypatch):
    ping = json.loads(recorded("v13_ping_multiplex.json"))
    locks = [_lock("l1"), _lock("l2", user="bot-other"), dict(_lock("old", user="bot-expired")),
             {"kind": "lock", "metadata": {"name": "l3"}, "spec": {"target": {"role": "access"}}}]
    locks[2]["spec"]["expires"] = "2020-01-01T00:00:00.123456789Z"
    fake = FakeTctl().on("status", out=recorded("v13_status.txt")).on("get", "locks", out=json.dumps(locks))
    monkeypatch.setattr(_teleport_info.cluster_info, "__defaults__", (lambda addr, **kw: ping,))
    args = {"proxy_addr": ping["proxy"]["ssh"]["public_addr"]}
    res = run_module(teleport_cluster_info.main, args, fake)
    assert "locked_users" not in res["cluster"] and ["get", "locks"] not in [c[:2] for c in fake.commands()]
    res = run_module(teleport_cluster_info.main, dict(args, locked_users=True), fake)
    assert res["cluster"]["locked_users"] == ["bot-example", "bot-other"]  # not the expired one, not a role lock


def test_cluster_info_explains_missing_kube_public_addr(run_module, monkeypatch):
    ping = json.loads(recorded("v13_ping_separate.json"))
    ping["proxy"]["kube"].pop("public_addr")
    monkeypatch.setattr(_teleport_info.cluster_info, "__defaults__", (lambda addr, **kw: ping,))
    fake = FakeTctl().on("status", out=recorded("v13_status.txt"))
    res = run_module(teleport_cluster_info.main, {"proxy_addr": "localhost:32887"}, fake)
    assert res["failed"]
    assert "tls_routing_enabled is false" in res["msg"] and "kube_public_addr" in res["msg"]
    res = run_module(teleport_cluster_info.main, {"proxy_addr": "localhost:32887", "require_kube_access": False},
                     fake)
    assert not res.get("failed") and res["cluster"]["kube_addr"] is None


def test_proxy_web_tls_verifies_without_the_strict_conformance_check():
    """Python 3.13's VERIFY_X509_STRICT is dropped (Teleport's self-signed web certificates lack key identifiers);
    the chain and the host name are still verified. The controller matrix runs the real ping on Python 3.13."""
    import ssl

    from ansible_collections.lanyard.machine_id.plugins.module_utils import _teleport_ping

    ctx = _teleport_ping.web_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert not ctx.verify_flags & getattr(ssl, "VERIFY_X509_STRICT", 0)
    loose = _teleport_ping.web_context(insecure=True)
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname


# -- teleport_bot: the exact tctl runs of each path (issue 14: a new host of the rollout costs at most two) --------
GET_USER = ["get", "user/bot-example", "--format=json"]
GET_ROLE = ["get", "role/bot-example", "--format=json"]
GET_ROLES = ["get", "roles", "--format=json"]
GET_LOCKS = ["get", "locks", "--format=json"]
GET_TOKENS = ["get", "tokens", "--with-secrets", "--format=json"]
ADD = ["bots", "add", "example", "--roles=machine-id-kube-role", "--ttl=30m", "--format=json"]
ROLLOUT_ARGS = {"name": "example", "roles": ["machine-id-kube-role"], "rejoin": True, "return_token": True,
                "token_ttl": "30m"}  # what playbooks/rollout.yml gives


def _runs(fake):
    """Every tctl run, `tctl version` included (bench/rollout.py's wrapper counts it too)."""
    return [call[0] for call in fake.calls]


def test_calls_new_bot_of_the_rollout_is_one_read_and_bots_add(run_module):
    fake = _bot_server(exists=False)[0]
    res = run_module(teleport_bot.main, dict(ROLLOUT_ARGS, locked_users=[]), fake)
    assert res["changed"] and res["msg"] == "bot example created" and res["token"]
    assert _runs(fake) == [GET_USER, ADD]
    assert res["bot"] == {"name": "example", "user_name": "bot-example", "role_name": "bot-example",
                          "roles": ["machine-id-kube-role"], "logins": [], "max_session_ttl": None}
    fake = _bot_server(exists=False)[0]  # without locked_users: the same (a bot that does not exist has no locks read)
    run_module(teleport_bot.main, ROLLOUT_ARGS, fake)
    assert _runs(fake) == [GET_USER, ADD]


def test_calls_new_bot_without_return_token_reads_it_back_and_revokes_its_token(run_module):
    fake = _bot_server(exists=False)[0]
    res = run_module(teleport_bot.main, {"name": "example", "roles": ["machine-id-kube-role"], "token_ttl": "30m"},
                     fake)
    assert res["changed"] and "token" not in res
    assert _runs(fake) == [GET_USER, ADD, GET_USER, GET_ROLE, ["create", "-f", "-"], GET_TOKENS]


def test_calls_rerun_of_a_bot_that_has_not_joined_yet(run_module):
    fake, state = _bot_server(exists=False)
    run_module(teleport_bot.main, ROLLOUT_ARGS, fake)
    del fake.calls[:]
    res = run_module(teleport_bot.main, ROLLOUT_ARGS, fake)
    assert not res["changed"] and "token" not in res and _runs(fake) == [GET_USER, GET_ROLE]


def test_calls_check_mode_and_diff_of_a_new_bot(run_module):
    fake = _bot_server(exists=False)[0]
    res = run_module(teleport_bot.main, ROLLOUT_ARGS, fake, check=True, diff=True)
    assert res["changed"] and res["msg"] == "bot example would be created" and "token" not in res
    assert res["diff"]["before"] == "" and "machine-id-kube-role" in res["diff"]["after"]
    assert _runs(fake) == [GET_USER, GET_ROLES]  # the roles are read to warn about a missing one; nothing written
    fake = _bot_server(exists=False)[0]
    res = run_module(teleport_bot.main, dict(ROLLOUT_ARGS, roles=["nope-role"]), fake, check=True)
    assert res["changed"] and "role(s) nope-role do not exist yet" in res["warnings"][0]
    assert _runs(fake) == [GET_USER, GET_ROLES]


def test_calls_missing_role_is_named_after_bots_add_refuses_it(run_module):
    fake, state = _bot_server(exists=False)
    res = run_module(teleport_bot.main, dict(ROLLOUT_ARGS, roles=["nope-role"]), fake)
    assert res["failed"] and res["msg"] == (
        "bot example: role(s) nope-role do not exist in Teleport. Fix: create them first (for example with "
        "lanyard.machine_id.teleport_role) or correct roles.")
    add_nope = ["bots", "add", "example", "--roles=nope-role", "--ttl=30m", "--format=json"]
    assert _runs(fake) == [GET_USER, add_nope, GET_ROLES] and not state["exists"]


def test_calls_role_not_yet_in_the_auth_cache_is_waited_for_then_added(run_module, monkeypatch):
    """A role the previous task created may be missing from the auth server's cache for a moment: `bots add`
    refuses it, the roles are read until it shows, and the add is tried once more."""
    from ansible_collections.lanyard.machine_id.plugins.module_utils import _teleport_wait
    monkeypatch.setattr(_teleport_wait, "DEFAULT_TIMEOUT", 5.0)
    monkeypatch.setattr(_teleport_wait, "DEFAULT_INTERVAL", 0.01)
    fake, state = _bot_server(exists=False)
    state["known_roles"].remove("machine-id-kube-role")
    reads = []
    real_get_roles = fake.rules[[r[0] for r in fake.rules].index(("get", "roles"))][1]

    def get_roles(args, data):
        reads.append(1)
        if len(reads) == 2:
            state["known_roles"].append("machine-id-kube-role")
        return real_get_roles(args, data)

    fake.on("get", "roles", fn=get_roles)
    res = run_module(teleport_bot.main, ROLLOUT_ARGS, fake)
    assert res["changed"] and res["token"]
    assert _runs(fake) == [GET_USER, ADD, GET_ROLES, GET_ROLES, ADD]


def test_calls_rejoin_of_a_bot_that_already_joined(run_module):
    fake, state = _bot_server(exists=True)
    res = run_module(teleport_bot.main, dict(ROLLOUT_ARGS, locked_users=["bot-else"]), fake)
    assert res["changed"] and res["recreated"] and res["token"] and res["removed_locks"] == []
    # no `get locks`: the caller's list says no lock targets bot-example; the roles are read before the delete
    assert _runs(fake) == [GET_USER, GET_ROLE, GET_ROLES, ["bots", "rm", "example"], GET_TOKENS,
                           ["create", "-f", "-"], GET_TOKENS, GET_USER, ADD]
    fake, state = _bot_server(exists=True)
    run_module(teleport_bot.main, ROLLOUT_ARGS, fake)  # alone (no locked_users): the locks are read
    assert _runs(fake)[:4] == [GET_USER, GET_ROLE, GET_LOCKS, GET_ROLES]


def test_calls_rejoin_of_a_locked_bot_with_and_without_remove_locks(run_module):
    fake, state = _bot_server(exists=True)
    state["locks"] = [_lock("lock-1"), _lock("other", user="bot-else")]
    args = dict(ROLLOUT_ARGS, locked_users=["bot-else", "bot-example"])
    res = run_module(teleport_bot.main, args, fake)
    assert res["failed"] and "bot example is locked (lock/lock-1: " in res["msg"] and "remove_locks: true" in res["msg"]
    assert _runs(fake) == [GET_USER, GET_ROLE, GET_LOCKS]
    del fake.calls[:]
    res = run_module(teleport_bot.main, dict(args, remove_locks=True), fake, check=True)
    assert res["changed"] and res["removed_locks"] == ["lock-1"] and "token" not in res
    assert _runs(fake) == [GET_USER, GET_ROLE, GET_LOCKS, GET_ROLES]
    del fake.calls[:]
    res = run_module(teleport_bot.main, dict(args, remove_locks=True), fake)
    assert res["changed"] and res["removed_locks"] == ["lock-1"] and res["token"]
    assert _runs(fake) == [GET_USER, GET_ROLE, GET_LOCKS, GET_ROLES, ["bots", "rm", "example"],
                           GET_TOKENS, ["create", "-f", "-"], GET_TOKENS, ["rm", "lock/lock-1"], GET_USER, ADD]
