# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Building RBAC objects, the changed/diff decision, and API error messages."""

from __future__ import annotations

import copy

import pytest

from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_resource as kres
from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils._kube_client import KubeAPIError

SERVED = {"pods": [""], "deployments": ["apps"], "events": ["", "events.k8s.io"], "widgets": ["example.com"]}


def role_params(**kw):
    p = {"kind": "Role", "name": "example-role", "namespace": "demo", "labels": None, "rules": []}
    p.update(kw)
    return p


def test_guide_role_groups_like_kubectl_create_role():
    calls = []

    def discover():
        calls.append(1)
        return SERVED
    obj = kres.build_role(role_params(rules=[{"verbs": ["get", "list"], "resources": ["pods", "deployments"]}]),
                          discover)
    assert obj == {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "example-role", "namespace": "demo"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
                  {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"]}]}
    assert calls == [1]


def test_dotted_and_explicit_groups_need_no_discovery():
    def discover():
        raise AssertionError("discovery must not run")
    obj = kres.build_role(role_params(rules=[
        {"verbs": ["get"], "resources": ["deployments.apps", "replicasets.apps", "pods/log"], "api_groups": None,
         "resource_names": ["x"]},
        {"verbs": ["*"], "resources": ["widgets"], "api_groups": ["example.com", ""]},
    ]), discover=lambda: {"pods": [""]})
    assert obj["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments", "replicasets"], "verbs": ["get"], "resourceNames": ["x"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"], "resourceNames": ["x"]},
        {"apiGroups": ["example.com", ""], "resources": ["widgets"], "verbs": ["*"]}]
    obj = kres.build_role(role_params(rules=[{"verbs": ["get"], "resources": ["deployments.apps"]}]), discover)
    assert obj["rules"][0]["apiGroups"] == ["apps"]


def test_core_group_preferred_when_a_resource_is_served_twice():
    obj = kres.build_role(role_params(rules=[{"verbs": ["get"], "resources": ["events"]}]), lambda: SERVED)
    assert obj["rules"][0]["apiGroups"] == [""]


@pytest.mark.parametrize("rule, kind, message", [
    ({"verbs": [], "resources": ["pods"]}, "Role", "no verbs"),
    ({"verbs": ["get"]}, "Role", "neither resources nor non_resource_urls"),
    ({"verbs": ["get"], "resources": ["pods"], "non_resource_urls": ["/x"]}, "ClusterRole", "both"),
    ({"verbs": ["get"], "non_resource_urls": ["/healthz"]}, "Role", "ClusterRole only"),
    ({"verbs": ["get"], "resources": ["gizmos"]}, "Role", "resource 'gizmos' is not served"),
])
def test_bad_rules_name_the_rule_and_the_fix(rule, kind, message):
    with pytest.raises(LanyardError) as err:
        kres.build_role(role_params(kind=kind, namespace=None if kind == "ClusterRole" else "demo", rules=[rule]),
                        lambda: SERVED)
    assert message in err.value.msg and "rule 1" in err.value.msg and "Fix" in err.value.msg


def test_cluster_role_non_resource_urls_and_scope_checks():
    obj = kres.build_role(role_params(kind="ClusterRole", namespace=None,
                                      rules=[{"verbs": ["get"], "non_resource_urls": ["/healthz"]}],
                                      labels={"team": "sre", "tier": 1}))
    assert obj["metadata"] == {"name": "example-role", "labels": {"team": "sre", "tier": "1"}}
    assert obj["rules"] == [{"nonResourceURLs": ["/healthz"], "verbs": ["get"]}]
    with pytest.raises(LanyardError, match="needs a namespace"):
        kres.build_role(role_params(namespace=None))
    with pytest.raises(LanyardError, match="takes no namespace"):
        kres.build_role(role_params(kind="ClusterRole"))


def test_paths_and_refs():
    assert kres.object_path("Role", "r", "demo") == "/apis/rbac.authorization.k8s.io/v1/namespaces/demo/roles/r"
    assert kres.object_path("ClusterRoleBinding", "b") == "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/b"
    assert kres.object_ref("RoleBinding", "b", "demo") == "RoleBinding demo/b"
    assert kres.object_ref("ClusterRole", "view") == "ClusterRole view"
    for bad in ("a/b", "..", "x?y", ""):
        with pytest.raises(LanyardError):
            kres.object_path("Role", bad, "demo")


def binding_params(**kw):
    p = {"kind": "RoleBinding", "name": "rb", "namespace": "demo", "role": None, "cluster_role": None,
         "users": None, "groups": None, "service_accounts": None, "labels": None}
    p.update(kw)
    return p


def test_binding_subjects_in_kubectl_order():
    obj = kres.build_binding(binding_params(role="example-role", users=["alice"], groups=["example"],
                                            service_accounts=["ci", "tools:builder"]))
    assert obj["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "example-role"}
    assert obj["subjects"] == [
        {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"},
        {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "example"},
        {"kind": "ServiceAccount", "name": "ci", "namespace": "demo"},
        {"kind": "ServiceAccount", "name": "builder", "namespace": "tools"}]


def test_cluster_role_binding_rules():
    obj = kres.build_binding(binding_params(kind="ClusterRoleBinding", namespace=None, cluster_role="view",
                                            groups=["example"]))
    assert obj["kind"] == "ClusterRoleBinding" and "namespace" not in obj["metadata"]
    assert obj["roleRef"]["kind"] == "ClusterRole"
    with pytest.raises(LanyardError, match="can only reference a ClusterRole"):
        kres.build_binding(binding_params(kind="ClusterRoleBinding", namespace=None, role="r"))
    with pytest.raises(LanyardError, match="needs a namespace"):
        kres.build_binding(binding_params(kind="ClusterRoleBinding", namespace=None, cluster_role="view",
                                          service_accounts=["ci"]))
    with pytest.raises(LanyardError, match="role or cluster_role"):
        kres.build_binding(binding_params())


LIVE = {
    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
    "metadata": {"name": "rb", "namespace": "demo", "uid": "u-1", "resourceVersion": "10", "generation": 1,
                 "creationTimestamp": "2026-01-01T00:00:00Z",
                 "managedFields": [{"manager": "lanyard.machine_id", "operation": "Apply"}]},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "example-role"},
    "subjects": [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "example"}],
}


def test_bookkeeping_never_counts_as_a_change():
    after = copy.deepcopy(LIVE)
    after["metadata"].update(resourceVersion="11", generation=2, uid="u-2",
                             managedFields=[{"manager": "kubectl-create"}, {"manager": "lanyard.machine_id"}])
    assert not kres.is_changed(LIVE, after)
    assert kres.make_diff(LIVE, after)["before"] == kres.make_diff(LIVE, after)["after"]
    assert "managedFields" not in kres.make_diff(LIVE, after)["after"]["metadata"]


@pytest.mark.parametrize("mutate", [
    lambda o: o["subjects"].append({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"}),
    lambda o: o["metadata"].setdefault("labels", {}).update(team="sre"),
    lambda o: o["metadata"].setdefault("annotations", {}).update(note="x"),
    lambda o: o.update(subjects=[]),
])
def test_managed_field_changes_are_changes(mutate):
    after = copy.deepcopy(LIVE)
    mutate(after)
    assert kres.is_changed(LIVE, after)


def test_create_and_delete_diffs():
    assert kres.is_changed(None, LIVE) and kres.is_changed(LIVE, None)
    assert kres.make_diff(None, LIVE)["before"] == {}
    assert kres.make_diff(LIVE, None)["after"] == {}
    assert "managedFields" not in kres.strip_bookkeeping(LIVE)["metadata"]
    assert "managedFields" in LIVE["metadata"]


def test_role_ref_change_detection():
    desired = kres.build_binding(binding_params(role="example-role", groups=["example"]))
    assert not kres.role_ref_differs(None, desired)
    assert not kres.role_ref_differs(LIVE, desired)
    desired = kres.build_binding(binding_params(cluster_role="view", groups=["example"]))
    assert kres.role_ref_differs(LIVE, desired)
    assert kres.role_ref_text(desired["roleRef"]) == "ClusterRole 'view'"


def api_error(status, message, reason=None, details=None):
    return KubeAPIError(message, status=status, reason=reason, details=details)


CLUSTER = "cluster 'example-k8s-cluster' (https://127.0.0.1:6443)"


@pytest.mark.parametrize("exc, expect", [
    (api_error(401, "Unauthorized", "Unauthorized"), ["401", "renew the token or client certificate"]),
    (api_error(403, 'roles.rbac.authorization.k8s.io "r" is forbidden: User "bob" cannot patch resource "roles"',
               "Forbidden"), ['User "bob" cannot patch', "grant the identity", "escalate/bind"]),
    (api_error(404, 'namespaces "nope" not found', "NotFound", {"name": "nope", "kind": "namespaces"}),
     ["namespace 'nope' does not exist", "create the namespace first"]),
    (api_error(404, "the server could not find the requested resource", "NotFound"), ["RBAC enabled"]),
    (api_error(409, "Apply failed with 1 conflict: conflict with \"kubectl-create\" using rbac.authorization.k8s.io/v1:"
                    " .rules", "Conflict", {"causes": [{"reason": "FieldManagerConflict", "field": ".rules",
                                                        "message": 'conflict with "kubectl-create"'}]}),
     ["another field manager", '.rules: conflict with "kubectl-create"', "force_conflicts: true"]),
    (api_error(409, "Operation cannot be fulfilled: the object has been modified", "Conflict"), ["run the task again"]),
    (api_error(422, 'RoleBinding.rbac.authorization.k8s.io "rb" is invalid: roleRef: Invalid value: cannot change '
                    'roleRef', "Invalid", {"causes": [{"field": "roleRef", "message": "cannot change roleRef"}]}),
     ["422", "force: true"]),
    (api_error(422, "Role is invalid", "Invalid", {"causes": [{"field": "rules[0].verbs", "message": "Required"}]}),
     ["rules[0].verbs: Required", "Fix the named field"]),
    (api_error(None, "cannot reach the cluster: connection refused"), ["connection refused"]),
])
def test_api_errors_name_object_cluster_and_fix(exc, expect):
    msg = kres.explain_api_error(exc, "Role demo/r", CLUSTER, "apply")
    assert msg.startswith("cannot apply Role demo/r in " + CLUSTER)
    for text in expect:
        assert text in msg
    assert "\n" not in msg
