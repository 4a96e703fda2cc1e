# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""kube_role / kube_rolebinding through Teleport's Kubernetes proxy with the kubeconfig a real ``tbot`` writes.

That kubeconfig is the reason ``tls-server-name`` and ``exec`` support exist: with TLS routing (multiplex mode)
the cluster entry carries ``tls-server-name: kube-teleport-proxy-alpn.*`` and the user entry runs
``tbot kube credentials`` as an exec plugin. Both listener modes run. The bot's Kubernetes group is granted
rights with the modules themselves (admin kubeconfig), then the bot manages RBAC objects through Teleport:
check -> real -> check -> real, and ``kubectl`` on the admin side sees the result.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import yaml

from helpers.playbook import run_playbook

pytestmark = [pytest.mark.testbed]

NS = "demo"


def test_bot_kubeconfig_through_teleport_check_real_check_real(testbed, teleport, kube, tmp_path):
    s = uuid.uuid4().hex[:6]
    group = f"rbac-managers-{s}"
    # Teleport side: a role mapping the bot to a Kubernetes group, and the bot.
    role = {"kind": "role", "version": "v6", "metadata": {"name": f"kube-rbac-{s}"},
            "spec": {"allow": {"kubernetes_labels": {"*": "*"}, "kubernetes_groups": [group],
                               "kubernetes_users": [f"bot-{s}"],
                               "kubernetes_resources": [{"kind": "pod", "namespace": "*", "name": "*"}]}}}
    role_file = tmp_path / "role.yaml"
    role_file.write_text(yaml.safe_dump(role))
    teleport.tctl("create", "-f", str(role_file), check=True)
    token = teleport.bot_add(f"rbac-{s}", [f"kube-rbac-{s}"])

    # Kubernetes side, with the module and the admin kubeconfig: the group may manage RBAC in `demo`.
    grant = run_playbook(tmp_path / "grant", f"""
- hosts: localhost
  gather_facts: false
  tasks:
    - name: rbac manager role
      lanyard.machine_id.kube_role:
        kubeconfig: {kube.admin_kubeconfig}
        kind: ClusterRole
        name: rbac-manager-{s}
        rules:
          - verbs: ["*"]
            resources: [roles.rbac.authorization.k8s.io, rolebindings.rbac.authorization.k8s.io]
          - verbs: [get, list]
            resources: [pods]
    - name: bind it in demo
      lanyard.machine_id.kube_rolebinding:
        kubeconfig: {kube.admin_kubeconfig}
        name: rbac-manager-{s}
        namespace: {NS}
        cluster_role: rbac-manager-{s}
        groups: [{group}]
""")
    assert grant.rc == 0, grant.stdout[-3000:]

    # The bot: tbot oneshot writes kubeconfig.yaml (exec plugin + tls-server-name in multiplex mode).
    storage, dest = tmp_path / "bot", tmp_path / "out"
    storage.mkdir(mode=0o700)
    dest.mkdir(mode=0o700)
    cfg = tmp_path / "tbot.yaml"
    cfg.write_text(yaml.safe_dump({
        "auth_server": teleport.proxy_addr,
        "onboarding": {"join_method": "token", "token": token, "ca_pins": [teleport.status_ca_pin()]},
        "storage": {"directory": str(storage)},
        "destinations": [{"directory": str(dest), "kubernetes_cluster": "example-k8s-cluster"}],
    }))
    tbot = subprocess.run([str(testbed.bins["tbot"]), "start", "-c", str(cfg), "--oneshot"],
                          capture_output=True, text=True, env=teleport.env, timeout=120, check=False)
    assert tbot.returncode == 0, tbot.stderr[-3000:]
    kubeconfig = dest / "kubeconfig.yaml"
    doc = yaml.safe_load(kubeconfig.read_text())
    cluster, user = doc["clusters"][0]["cluster"], doc["users"][0]["user"]
    if teleport.mode == "multiplex":
        assert cluster["tls-server-name"].startswith("kube-teleport-proxy-alpn."), cluster
    assert "exec" in user, user

    tasks = f"""
- hosts: localhost
  gather_facts: false
  module_defaults:
    group/lanyard.machine_id.kube:
      kubeconfig: {kubeconfig}
  tasks:
    - name: role
      lanyard.machine_id.kube_role:
        name: via-teleport-{s}
        namespace: {NS}
        rules:
          - verbs: [get, list]
            resources: [pods, deployments]
            api_groups: ["", apps]
    - name: binding
      lanyard.machine_id.kube_rolebinding:
        name: via-teleport-{s}
        namespace: {NS}
        role: via-teleport-{s}
        users: [alice-{s}]
"""
    changed = []
    for n, check in enumerate((True, False, True, False)):
        r = run_playbook(tmp_path / f"run{n}", tasks, check=check, diff=True)
        assert r.rc == 0, r.stdout[-3000:]
        changed.append((r.changed("role"), r.changed("binding")))
        if n == 0:
            probe = kube.kubectl("get", "role", f"via-teleport-{s}", "-n", NS)
            assert probe.returncode != 0 and "NotFound" in probe.stderr, "check mode must not write"
    assert changed == [(True, True), (True, True), (False, False), (False, False)]
    live = json.loads(kube.kubectl("get", "rolebinding", f"via-teleport-{s}", "-n", NS, "-o", "json",
                                   check=True).stdout)
    assert live["subjects"][0]["name"] == f"alice-{s}"
    assert kube.kubectl("auth", "can-i", "list", "pods", "-n", NS, f"--as=alice-{s}").stdout.strip() == "yes"
