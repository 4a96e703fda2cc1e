# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""kube_role and kube_rolebinding on the real kube-apiserver of the test bed, through real ansible-playbook.

Every guide shape runs check -> real -> check -> real (changed, changed, unchanged, unchanged), and the effect
is confirmed by another route: the bed's real ``kubectl auth can-i`` flips from no to yes. Object and subject
names carry a per-run suffix (the bed is shared by the whole session and namespaces cannot be deleted on it),
so ``alice`` and ``example`` from the guide appear here as ``alice-<suffix>`` and ``example-<suffix>``.
"""

from __future__ import annotations

import base64
import json
import sys
import uuid

import pytest
import yaml

from helpers.playbook import run_playbook

pytestmark = [pytest.mark.testbed]

NS = "demo"


@pytest.fixture(scope="module")
def sfx():
    return uuid.uuid4().hex[:6]


def play(tasks: str, ignore_errors: bool = False) -> str:
    """A playbook around ``tasks`` (YAML list items, indented 4) with the bed's kubeconfig as module default."""
    return ("- hosts: localhost\n  gather_facts: false\n"
            "  module_defaults:\n    group/lanyard.machine_id.kube:\n      kubeconfig: '{{ kc }}'\n"
            "  tasks:\n" + tasks)


def run(tmp_path, kube, tasks, check=False, extra=None, name=None):
    ev = {"kc": str(kube.admin_kubeconfig)}
    ev.update(extra or {})
    workdir = tmp_path / (name or ("check" if check else "real"))
    result = run_playbook(workdir, play(tasks), extra_vars=ev, check=check, diff=True)
    return result


def can_i(kube, *args):
    proc = kube.kubectl("auth", "can-i", *args)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), (proc.stdout, proc.stderr)
    return answer


def get_json(kube, *args):
    proc = kube.kubectl("get", *args, "-o", "json", "--show-managed-fields")
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return None
    return json.loads(proc.stdout)


def guide_tasks(s):
    # The guide's Step 1 as tasks: a Role (get,list on pods,deployments), a RoleBinding to group example, one to
    # user alice, one to ClusterRole view, and a ClusterRoleBinding.
    return f"""
    - name: role
      lanyard.machine_id.kube_role:
        name: example-role-{s}
        namespace: {NS}
        rules:
          - verbs: [get, list]
            resources: [pods, deployments]
    - name: binding group
      lanyard.machine_id.kube_rolebinding:
        name: example-rolebinding-group-{s}
        namespace: {NS}
        role: example-role-{s}
        groups: [example-{s}]
    - name: binding user
      lanyard.machine_id.kube_rolebinding:
        name: example-rolebinding-user-{s}
        namespace: {NS}
        role: example-role-{s}
        users: [alice-{s}]
    - name: binding view
      lanyard.machine_id.kube_rolebinding:
        name: example-rolebinding-view-{s}
        namespace: {NS}
        cluster_role: view
        users: [bob-{s}]
    - name: cluster role
      lanyard.machine_id.kube_role:
        kind: ClusterRole
        name: pod-reader-{s}
        rules:
          - verbs: [get, list, watch]
            resources: [pods, pods/log]
    - name: cluster binding
      lanyard.machine_id.kube_rolebinding:
        kind: ClusterRoleBinding
        name: example-crb-{s}
        cluster_role: pod-reader-{s}
        groups: [ops-{s}]
"""


TASKS = ("role", "binding group", "binding user", "binding view", "cluster role", "cluster binding")


def access(kube, s):
    return {
        "alice lists pods": can_i(kube, "list", "pods", "-n", NS, f"--as=alice-{s}"),
        "alice lists deployments.apps": can_i(kube, "list", "deployments.apps", "-n", NS, f"--as=alice-{s}"),
        "alice deletes pods": can_i(kube, "delete", "pods", "-n", NS, f"--as=alice-{s}"),
        "group example lists pods": can_i(kube, "list", "pods", "-n", NS, "--as=someone",
                                          f"--as-group=example-{s}"),
        "ops lists pods in kube-system": can_i(kube, "list", "pods", "-n", "kube-system", "--as=carol",
                                               f"--as-group=ops-{s}"),
    }


def test_guide_shapes_check_real_check_real_and_kubectl_agrees(kube, tmp_path, sfx):
    s = sfx
    tasks = guide_tasks(s)
    before = access(kube, s)
    assert set(before.values()) == {"no"}, before

    first = run(tmp_path, kube, tasks, check=True, name="1-check")
    assert first.rc == 0, first.stdout[-3000:]
    assert [first.changed(t) for t in TASKS] == [True] * 6
    # Check mode wrote nothing, and said so from the server's dry run.
    assert get_json(kube, "role", f"example-role-{s}", "-n", NS) is None
    assert get_json(kube, "clusterrolebinding", f"example-crb-{s}") is None
    assert access(kube, s) == before
    role_check = first.result("role")
    assert role_check["operation"] == "create"
    assert role_check["diff"]["before"] == {}
    assert role_check["diff"]["after"]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]}]
    assert role_check["result"]["metadata"].get("creationTimestamp"), "dry-run result comes from the server"

    second = run(tmp_path, kube, tasks, name="2-real")
    assert second.rc == 0, second.stdout[-3000:]
    assert [second.changed(t) for t in TASKS] == [True] * 6
    live_role = get_json(kube, "role", f"example-role-{s}", "-n", NS)
    assert live_role["rules"] == role_check["diff"]["after"]["rules"]
    managers = {m["manager"] for m in live_role["metadata"]["managedFields"]}
    assert managers == {"lanyard.machine_id"}
    crb = get_json(kube, "clusterrolebinding", f"example-crb-{s}")
    assert crb["roleRef"]["name"] == f"pod-reader-{s}" and crb["subjects"][0]["name"] == f"ops-{s}"
    # `view` is an aggregated ClusterRole: its rules are filled in by kube-controller-manager, which this bed
    # does not run, so `can-i` cannot show its effect here; the binding itself is checked instead.
    view = get_json(kube, "rolebinding", f"example-rolebinding-view-{s}", "-n", NS)
    assert view["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"}
    assert view["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": f"bob-{s}"}]
    after = access(kube, s)
    assert after == {
        "alice lists pods": "yes",
        "alice lists deployments.apps": "yes",
        "alice deletes pods": "no",
        "group example lists pods": "yes",
        "ops lists pods in kube-system": "yes",
    }

    third = run(tmp_path, kube, tasks, check=True, name="3-check")
    fourth = run(tmp_path, kube, tasks, name="4-real")
    assert third.rc == 0 and fourth.rc == 0, (third.stdout[-2000:], fourth.stdout[-2000:])
    assert [third.changed(t) for t in TASKS] == [False] * 6
    assert [fourth.changed(t) for t in TASKS] == [False] * 6
    assert fourth.result("binding user")["operation"] == "none"
    # Unchanged runs did not write: the resourceVersion stayed.
    again = get_json(kube, "role", f"example-role-{s}", "-n", NS)
    assert again["metadata"]["resourceVersion"] == live_role["metadata"]["resourceVersion"]


def test_update_rules_and_labels_check_then_real(kube, tmp_path, sfx):
    s = sfx + "u"
    base = f"""
    - name: role
      lanyard.machine_id.kube_role:
        name: upd-{s}
        namespace: {NS}
        labels: {{team: sre}}
        rules:
          - verbs: [get]
            resources: [pods]
            api_groups: [""]
"""
    assert run(tmp_path, kube, base, name="create").changed("role")
    changed = base.replace("verbs: [get]", "verbs: [get, watch]").replace("{team: sre}", "{team: platform}")
    check = run(tmp_path, kube, changed, check=True, name="check")
    res = check.result("role")
    assert res["changed"] and res["operation"] == "update"
    assert res["diff"]["before"]["rules"][0]["verbs"] == ["get"]
    assert res["diff"]["after"]["rules"][0]["verbs"] == ["get", "watch"]
    assert res["diff"]["after"]["metadata"]["labels"] == {"team": "platform"}
    assert "managedFields" not in res["diff"]["after"]["metadata"] and "resourceVersion" not in res["diff"]["after"]
    assert get_json(kube, "role", f"upd-{s}", "-n", NS)["rules"][0]["verbs"] == ["get"]
    real = run(tmp_path, kube, changed, name="real")
    assert real.changed("role")
    live = get_json(kube, "role", f"upd-{s}", "-n", NS)
    assert live["rules"][0]["verbs"] == ["get", "watch"] and live["metadata"]["labels"] == {"team": "platform"}
    # A label another tool sets is not ours: kept, and not a change for us.
    kube.kubectl("label", "role", f"upd-{s}", "-n", NS, "other=keep", check=True)
    assert not run(tmp_path, kube, changed, name="again").changed("role")
    assert get_json(kube, "role", f"upd-{s}", "-n", NS)["metadata"]["labels"]["other"] == "keep"


def test_role_ref_is_immutable_unless_force(kube, tmp_path, sfx):
    s = sfx + "r"
    create = f"""
    - name: role
      lanyard.machine_id.kube_role:
        name: rr-{s}
        namespace: {NS}
        rules: [{{verbs: [get, list], resources: [pods]}}]
    - name: cluster role
      lanyard.machine_id.kube_role:
        kind: ClusterRole
        name: deployer-{s}
        rules: [{{verbs: [create], resources: [deployments.apps]}}]
    - name: binding
      lanyard.machine_id.kube_rolebinding:
        name: rr-{s}
        namespace: {NS}
        role: rr-{s}
        users: [dave-{s}]
"""
    assert run(tmp_path, kube, create, name="create").rc == 0
    uid = get_json(kube, "rolebinding", f"rr-{s}", "-n", NS)["metadata"]["uid"]
    switch = f"""
    - name: switch
      lanyard.machine_id.kube_rolebinding:
        name: rr-{s}
        namespace: {NS}
        cluster_role: deployer-{s}
        users: [dave-{s}]
        force: "{{{{ force }}}}"
"""
    refused = run(tmp_path, kube, switch, extra={"force": False}, name="refused")
    res = refused.result("switch")
    assert refused.rc != 0 and res["_status"] == "failed"
    assert res["msg"].startswith(f"cannot change RoleBinding {NS}/rr-{s} in cluster 'example-k8s-cluster'")
    assert "Role 'rr-" in res["msg"] and f"ClusterRole 'deployer-{s}'" in res["msg"] and "force: true" in res["msg"]
    assert get_json(kube, "rolebinding", f"rr-{s}", "-n", NS)["roleRef"]["kind"] == "Role"

    check = run(tmp_path, kube, switch, extra={"force": True}, check=True, name="check")
    assert check.result("switch")["changed"] and check.result("switch")["operation"] == "recreate"
    assert get_json(kube, "rolebinding", f"rr-{s}", "-n", NS)["metadata"]["uid"] == uid
    assert can_i(kube, "create", "deployments.apps", "-n", NS, f"--as=dave-{s}") == "no"

    real = run(tmp_path, kube, switch, extra={"force": True}, name="real")
    assert real.result("switch")["changed"] and real.result("switch")["operation"] == "recreate"
    live = get_json(kube, "rolebinding", f"rr-{s}", "-n", NS)
    assert live["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"deployer-{s}"}
    assert live["metadata"]["uid"] != uid
    assert can_i(kube, "create", "deployments.apps", "-n", NS, f"--as=dave-{s}") == "yes"
    again = run(tmp_path, kube, switch, extra={"force": True}, name="again")
    assert not again.changed("switch")


def test_state_absent_check_real_and_access_goes_away(kube, tmp_path, sfx):
    s = sfx + "a"
    present = f"""
    - name: role
      lanyard.machine_id.kube_role:
        name: gone-{s}
        namespace: {NS}
        rules: [{{verbs: [get, list], resources: [pods]}}]
        state: "{{{{ state }}}}"
    - name: binding
      lanyard.machine_id.kube_rolebinding:
        name: gone-{s}
        namespace: {NS}
        role: gone-{s}
        users: [erin-{s}]
        state: "{{{{ state }}}}"
"""
    assert run(tmp_path, kube, present, extra={"state": "present"}, name="create").rc == 0
    assert can_i(kube, "list", "pods", "-n", NS, f"--as=erin-{s}") == "yes"
    check = run(tmp_path, kube, present, extra={"state": "absent"}, check=True, name="check")
    assert check.changed("role") and check.changed("binding")
    assert check.result("binding")["diff"]["after"] == {}
    assert check.result("binding")["diff"]["before"]["subjects"][0]["name"] == f"erin-{s}"
    assert can_i(kube, "list", "pods", "-n", NS, f"--as=erin-{s}") == "yes"
    real = run(tmp_path, kube, present, extra={"state": "absent"}, name="real")
    assert real.changed("role") and real.changed("binding")
    assert get_json(kube, "rolebinding", f"gone-{s}", "-n", NS) is None
    assert can_i(kube, "list", "pods", "-n", NS, f"--as=erin-{s}") == "no"
    for name, check_mode in (("check2", True), ("real2", False)):
        res = run(tmp_path, kube, present, extra={"state": "absent"}, check=check_mode, name=name)
        assert not res.changed("role") and not res.changed("binding")


def test_api_errors_on_the_real_server(kube, tmp_path, sfx):
    s = sfx + "e"
    # An identity without RBAC rights: the admin impersonating a nobody (kubeconfig `as`).
    doc = yaml.safe_load(kube.admin_kubeconfig.read_text())
    doc["users"][0]["user"]["as"] = f"nobody-{s}"
    nobody = tmp_path / "nobody.kubeconfig"
    nobody.write_text(yaml.safe_dump(doc))
    # A token the server does not know.
    bad = {"apiVersion": "v1", "kind": "Config", "current-context": "bad",
           "clusters": [{"name": "bed", "cluster": {"server": kube.server,
                                                    "certificate-authority": str(kube.ca.cert_path)}}],
           "users": [{"name": "bad", "user": {"token": "not-a-real-token-" + s}}],
           "contexts": [{"name": "bad", "context": {"cluster": "bed", "user": "bad"}}]}
    badtoken = tmp_path / "bad.kubeconfig"
    badtoken.write_text(yaml.safe_dump(bad))
    kube.kubectl("create", "role", f"owned-{s}", "-n", NS, "--verb=get", "--resource=pods", check=True)
    tasks = f"""
    - name: missing namespace
      lanyard.machine_id.kube_role:
        name: r-{s}
        namespace: nope-{s}
        rules: [{{verbs: [get], resources: [pods], api_groups: [""]}}]
      ignore_errors: true
    - name: forbidden
      lanyard.machine_id.kube_role:
        kubeconfig: {nobody}
        name: r-{s}
        namespace: {NS}
        rules: [{{verbs: [get], resources: [pods], api_groups: [""]}}]
      ignore_errors: true
    - name: unauthorized
      lanyard.machine_id.kube_role:
        kubeconfig: {badtoken}
        name: r-{s}
        namespace: {NS}
        rules: [{{verbs: [get], resources: [pods], api_groups: [""]}}]
      ignore_errors: true
    - name: conflict
      lanyard.machine_id.kube_role:
        name: owned-{s}
        namespace: {NS}
        rules: [{{verbs: [get, list], resources: [pods], api_groups: [""]}}]
      ignore_errors: true
    - name: invalid
      lanyard.machine_id.kube_role:
        name: r-{s}
        namespace: {NS}
        labels: {{"bad key!": "x"}}
        rules: [{{verbs: [get], resources: [pods], api_groups: [""]}}]
      ignore_errors: true
    - name: take over
      lanyard.machine_id.kube_role:
        name: owned-{s}
        namespace: {NS}
        rules: [{{verbs: [get, list], resources: [pods], api_groups: [""]}}]
        force_conflicts: true
"""
    for check_mode in (True, False):
        r = run(tmp_path, kube, tasks, check=check_mode, name=f"errors-{check_mode}")
        where = f"in cluster 'example-k8s-cluster' ({kube.server})"
        failing = ("missing namespace", "forbidden", "unauthorized", "conflict", "invalid")
        msg = {t: r.result(t).get("msg", "") for t in failing}
        assert f"namespace 'nope-{s}' does not exist" in msg["missing namespace"], msg
        assert where in msg["missing namespace"]
        assert "403 Forbidden" in msg["forbidden"] and f'"nobody-{s}"' in msg["forbidden"], msg
        assert "401 Unauthorized" in msg["unauthorized"] and f"Role {NS}/r-{s}" in msg["unauthorized"], msg
        assert "409 Conflict" in msg["conflict"] and "force_conflicts: true" in msg["conflict"], msg
        assert "kubectl-create" in msg["conflict"]
        assert "422 Invalid" in msg["invalid"] and "metadata.labels" in msg["invalid"], msg
        assert all("Traceback" not in m and "\n" not in m for m in msg.values())
        assert r.result("take over")["changed"]
        assert "not-a-real-token" not in r.stdout + json.dumps(r.results)
    live = get_json(kube, "role", f"owned-{s}", "-n", NS)
    assert live["rules"][0]["verbs"] == ["get", "list"]


def _inline_kubeconfig(kube, tmp_path, **cluster_extra):
    admin = yaml.safe_load(kube.admin_kubeconfig.read_text())
    user = admin["users"][0]["user"]
    cluster = {"server": kube.server,
               "certificate-authority-data": base64.b64encode(kube.ca.cert_path.read_bytes()).decode()}
    cluster.update(cluster_extra)
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "inline",
           "clusters": [{"name": "inline-cluster", "cluster": cluster}],
           "users": [{"name": "inline-user", "user": {
               "client-certificate-data": base64.b64encode(open(user["client-certificate"], "rb").read()).decode(),
               "client-key-data": base64.b64encode(open(user["client-key"], "rb").read()).decode()}}],
           "contexts": [{"name": "inline", "context": {"cluster": "inline-cluster", "user": "inline-user"}}]}
    return doc


def test_kubeconfig_variants_on_the_real_server(kube, tmp_path, sfx, monkeypatch):
    s = sfx + "k"
    admin = yaml.safe_load(kube.admin_kubeconfig.read_text())
    user = admin["users"][0]["user"]
    # 1. inline data + tls-server-name (a SAN of the serving cert that is not the dialled address)
    inline = tmp_path / "inline.kubeconfig"
    inline.write_text(yaml.safe_dump(_inline_kubeconfig(kube, tmp_path, **{"tls-server-name": "kubernetes"})))
    wrong = tmp_path / "wrong-sni.kubeconfig"
    wrong.write_text(yaml.safe_dump(_inline_kubeconfig(kube, tmp_path, **{"tls-server-name": "wrong.invalid"})))
    # 2. an exec credential plugin that hands out the admin client certificate, relative command path
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    plugin = plugin_dir / "kube-cred"
    plugin.write_text(f"""#!{sys.executable}
import json
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": {{
    "clientCertificateData": open({user['client-certificate']!r}).read(),
    "clientKeyData": open({user['client-key']!r}).read()}}}}))
""")
    plugin.chmod(0o755)
    exec_doc = {"apiVersion": "v1", "kind": "Config", "current-context": "exec",
                "clusters": [{"name": "bed", "cluster": {"server": kube.server,
                                                         "certificate-authority": str(kube.ca.cert_path)}}],
                "users": [{"name": "bot", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                                                            "command": "./plugins/kube-cred",
                                                            "interactiveMode": "Never"}}}],
                "contexts": [{"name": "exec", "context": {"cluster": "bed", "user": "bot"}}]}
    execkc = tmp_path / "exec.kubeconfig"
    execkc.write_text(yaml.safe_dump(exec_doc))
    tasks = f"""
    - name: inline and tls-server-name
      lanyard.machine_id.kube_role:
        kubeconfig: {inline}
        name: v1-{s}
        namespace: {NS}
        rules: [{{verbs: [get], resources: [pods], api_groups: [""]}}]
    - name: wrong tls-server-name
      lanyard.machine_id.kube_role:
        kubeconfig: {wrong}
        name: v2-{s}
        namespace: {NS}
        rules: [{{verbs: [get], resources: [pods], api_groups: [""]}}]
      ignore_errors: true
    - name: exec plugin
      lanyard.machine_id.kube_role:
        kubeconfig: {execkc}
        name: v3-{s}
        namespace: {NS}
        rules: [{{verbs: [get], resources: [pods], api_groups: [""]}}]
    - name: host and client cert
      lanyard.machine_id.kube_role:
        host: {kube.server}
        client_cert: {user['client-certificate']}
        client_key: {user['client-key']}
        ca_cert: {kube.ca.cert_path}
        name: v4-{s}
        namespace: {NS}
        rules: [{{verbs: [get], resources: [pods], api_groups: [""]}}]
    - name: KUBECONFIG environment
      lanyard.machine_id.kube_role:
        name: v5-{s}
        namespace: {NS}
        rules: [{{verbs: [get], resources: [pods], api_groups: [""]}}]
      environment:
        KUBECONFIG: "/nonexistent/config:{inline}"
"""
    # KUBECONFIG task: module_defaults would set kubeconfig; this playbook has no defaults for it.
    r = run_playbook(tmp_path / "variants", "- hosts: localhost\n  gather_facts: false\n  tasks:\n" + tasks,
                     diff=True)
    for t in ("inline and tls-server-name", "exec plugin", "host and client cert", "KUBECONFIG environment"):
        assert r.result(t)["_status"] == "ok" and r.result(t)["changed"], (t, r.result(t))
    bad = r.result("wrong tls-server-name")
    assert bad["_status"] == "failed" and "TLS with cluster 'inline-cluster'" in bad["msg"], bad
    for n in (1, 3, 4, 5):
        assert get_json(kube, "role", f"v{n}-{s}", "-n", NS) is not None
    assert get_json(kube, "role", f"v2-{s}", "-n", NS) is None
    everything = r.stdout + json.dumps(r.results)
    assert "PRIVATE KEY" not in everything
