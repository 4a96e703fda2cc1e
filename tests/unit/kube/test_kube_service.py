# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The present/absent decisions against a fake API: which requests are made in check and real mode,
what ``changed`` says, and the roleRef rules."""

from __future__ import annotations

import copy

import pytest

from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_config as kcfg
from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_resource as kres
from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_service as svc
from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils._kube_client import KubeAPIError

PATH = "/apis/rbac.authorization.k8s.io/v1/namespaces/demo/rolebindings/rb"
REF = "RoleBinding demo/rb"


class FakeAPI:
    """Stores one object; apply merges like SSA would for our fields; records every call."""

    def __init__(self, live=None, fail_apply=None):
        self.conn = kcfg.Connection("https://127.0.0.1:6443", "test", "example-k8s-cluster")
        self.live = copy.deepcopy(live)
        self.calls = []
        self.fail_apply = fail_apply
        self.rv = 1

    def get(self, path):
        self.calls.append(("get", path))
        return copy.deepcopy(self.live)

    def apply(self, path, obj, force=False, dry_run=False):
        self.calls.append(("apply", path, force, dry_run))
        if self.fail_apply:
            raise self.fail_apply
        result = copy.deepcopy(obj)
        md = result["metadata"]
        md.update(uid=(self.live or {}).get("metadata", {}).get("uid", "new-uid"), resourceVersion=str(self.rv + 1),
                  managedFields=[{"manager": "lanyard.machine_id"}])
        if not dry_run:
            self.rv += 1
            self.live = copy.deepcopy(result)
        return result

    def delete(self, path, dry_run=False, uid=None, resource_version=None):
        self.calls.append(("delete", path, dry_run, uid, resource_version))
        if not dry_run:
            self.live = None
        return {}


def binding(**kw):
    p = {"kind": "RoleBinding", "name": "rb", "namespace": "demo", "role": "example-role", "cluster_role": None,
         "users": None, "groups": ["example"], "service_accounts": None, "labels": None}
    p.update(kw)
    return kres.build_binding(p)


def test_check_real_check_real():
    api = FakeAPI()
    first = svc.ensure_present(api, True, PATH, REF, binding())
    assert first["changed"] and first["operation"] == "create" and api.live is None
    assert api.calls[-1] == ("apply", PATH, False, True)
    second = svc.ensure_present(api, False, PATH, REF, binding())
    assert second["changed"] and api.live is not None
    assert "managedFields" not in second["result"]["metadata"]
    third = svc.ensure_present(api, True, PATH, REF, binding())
    fourth = svc.ensure_present(api, False, PATH, REF, binding())
    assert (third["changed"], fourth["changed"]) == (False, False)
    assert fourth["operation"] == "none" and fourth["diff"]["before"] == fourth["diff"]["after"]


def test_subject_change_is_an_update_with_a_diff():
    api = FakeAPI(live=binding())
    res = svc.ensure_present(api, True, PATH, REF, binding(users=["alice"]))
    assert res["changed"] and res["operation"] == "update"
    assert len(res["diff"]["after"]["subjects"]) == 2 and len(res["diff"]["before"]["subjects"]) == 1
    assert api.live == binding()  # check mode did not write


def test_role_ref_change_fails_without_force_and_touches_nothing():
    api = FakeAPI(live=binding())
    with pytest.raises(LanyardError) as err:
        svc.ensure_present(api, False, PATH, REF, binding(role=None, cluster_role="view"))
    msg = err.value.msg
    assert "RoleBinding demo/rb" in msg and "example-k8s-cluster" in msg and "immutable" in msg
    assert "Role 'example-role'" in msg and "ClusterRole 'view'" in msg and "force: true" in msg
    assert [c[0] for c in api.calls] == ["get"]


def test_role_ref_change_with_force_recreates():
    live = binding()
    live["metadata"].update(uid="old-uid", resourceVersion="7")
    api = FakeAPI(live=live)
    res = svc.ensure_present(api, True, PATH, REF, binding(role=None, cluster_role="view"), recreate=True)
    assert res["changed"] and res["operation"] == "recreate"
    assert api.calls[-1] == ("delete", PATH, True, "old-uid", None) and api.live["metadata"]["uid"] == "old-uid"
    assert res["diff"]["after"]["roleRef"]["kind"] == "ClusterRole"
    res = svc.ensure_present(api, False, PATH, REF, binding(role=None, cluster_role="view"), recreate=True)
    assert [c[0] for c in api.calls[-3:]] == ["get", "delete", "apply"]
    assert api.calls[-2] == ("delete", PATH, False, "old-uid", "7")
    assert api.live["roleRef"]["name"] == "view" and res["operation"] == "recreate"


def test_failed_recreate_says_the_object_is_gone():
    api = FakeAPI(live=binding(), fail_apply=KubeAPIError("forbidden", status=403, reason="Forbidden"))
    with pytest.raises(LanyardError) as err:
        svc.ensure_present(api, False, PATH, REF, binding(role=None, cluster_role="view"), recreate=True)
    assert "now missing" in err.value.msg and "403" in err.value.msg
    assert err.value.details["deleted_object"]["roleRef"]["name"] == "example-role"


def test_absent():
    api = FakeAPI()
    res = svc.ensure_absent(api, False, PATH, REF)
    assert not res["changed"] and res["operation"] == "none" and [c[0] for c in api.calls] == ["get"]
    live = binding()
    live["metadata"]["uid"] = "u-9"
    api = FakeAPI(live=live)
    res = svc.ensure_absent(api, True, PATH, REF)
    assert res["changed"] and api.live is not None and api.calls[-1] == ("delete", PATH, True, "u-9", None)
    assert res["diff"]["after"] == {} and res["diff"]["before"]["roleRef"]["name"] == "example-role"
    res = svc.ensure_absent(api, False, PATH, REF)
    assert res["changed"] and api.live is None


def test_api_errors_become_one_line_with_object_and_cluster():
    api = FakeAPI(fail_apply=KubeAPIError('namespaces "nope" not found', status=404, reason="NotFound",
                                          details={"kind": "namespaces", "name": "nope"}))
    with pytest.raises(LanyardError) as err:
        svc.ensure_present(api, True, PATH, REF, binding())
    assert err.value.msg.startswith("cannot dry-run apply RoleBinding demo/rb in cluster 'example-k8s-cluster'")
    assert "namespace 'nope' does not exist" in err.value.msg and err.value.details["status"] == 404


class FakeModule:
    def __init__(self, params):
        self.params = params
        self.no_log_values = set()
        self.commands = []

    def run_command(self, argv, environ_update=None):
        self.commands.append(argv)
        return 0, '{"kind": "ExecCredential", "status": {"token": "exec-issued-token"}}', ""


def test_open_connection_registers_every_credential_with_no_log(tmp_path):
    kc = tmp_path / "kc"
    kc.write_text("""
apiVersion: v1
kind: Config
current-context: x
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users:
- name: u
  user:
    token: static-token-value
    client-key-data: S0VZLURBVEE=
    client-certificate-data: Q0VSVA==
    exec: {command: tbot, args: [kube, credentials], apiVersion: client.authentication.k8s.io/v1beta1}
contexts: [{name: x, context: {cluster: c, user: u}}]
""")
    params = {k: v.get("default") for k, v in kcfg.AUTH_ARG_SPEC.items()}
    params["kubeconfig"] = str(kc)
    module = FakeModule(params)
    conn = svc.open_connection(module)
    assert module.commands == [["tbot", "kube", "credentials"]]
    assert {"static-token-value", "KEY-DATA", "S0VZLURBVEE=", "exec-issued-token"} <= module.no_log_values
    assert conn.token == "exec-issued-token"
