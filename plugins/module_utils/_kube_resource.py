# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: RBAC objects as data -- build them, compare them, explain API errors. No I/O.

* :func:`build_role` / :func:`build_binding` turn module parameters into the object that is server-side applied.
* :func:`project` keeps only the fields this collection manages (labels, annotations, rules,
  aggregationRule, roleRef, subjects) so that ``changed`` and ``--diff`` ignore server bookkeeping
  (managedFields, resourceVersion, generation, uid, creationTimestamp).
* :func:`explain_api_error` turns a failed request into one line naming the object, the cluster and the fix.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError

RBAC_GROUP = "rbac.authorization.k8s.io"
RBAC_API_VERSION = RBAC_GROUP + "/v1"
# kind -> (plural, namespaced)
KINDS = {
    "Role": ("roles", True),
    "ClusterRole": ("clusterroles", False),
    "RoleBinding": ("rolebindings", True),
    "ClusterRoleBinding": ("clusterrolebindings", False),
}
MANAGED_TOP_LEVEL = ("rules", "aggregationRule", "roleRef", "subjects")
MANAGED_METADATA = ("name", "namespace", "labels", "annotations")


# -- naming -------------------------------------------------------------------------------------------------

def object_ref(kind, name, namespace=None):
    """``Role demo/example-role`` or ``ClusterRole view``: how messages name an object."""
    return "%s %s/%s" % (kind, namespace, name) if namespace else "%s %s" % (kind, name)


def object_path(kind, name, namespace=None):
    plural, namespaced = KINDS[kind]
    base = "/apis/%s" % RBAC_API_VERSION
    if namespaced:
        return "%s/namespaces/%s/%s/%s" % (base, _url_part(namespace), plural, _url_part(name))
    return "%s/%s/%s" % (base, plural, _url_part(name))


def _url_part(value):
    # Kubernetes names are DNS subdomains / path segments; refuse anything that would change the URL shape.
    if not value or "/" in value or value in (".", "..") or any(c in value for c in "?#%"):
        raise LanyardError("'%s' is not a valid Kubernetes object or namespace name. Fix: use lowercase letters, "
                           "digits, '-' and '.'." % value)
    return value


def check_scope(kind, name, namespace):
    namespaced = KINDS[kind][1]
    if namespaced and not namespace:
        raise LanyardError("%s needs a namespace. Fix: set namespace (or use the cluster-wide kind Cluster%s)."
                           % (object_ref(kind, name), kind))
    if not namespaced and namespace:
        raise LanyardError("%s is cluster-wide and takes no namespace (got '%s'). Fix: remove namespace, or use "
                           "kind %s for a namespaced object." % (object_ref(kind, name), namespace,
                                                                 kind.replace("Cluster", "", 1)))


def _metadata(name, namespace, labels):
    md = {"name": name}
    if namespace:
        md["namespace"] = namespace
    if labels:
        md["labels"] = dict((str(k), str(v)) for k, v in labels.items())
    return md


# -- Role / ClusterRole -----------------------------------------------------------------------------------------

def split_resource(resource):
    """``deployments.apps`` -> (``deployments``, ``apps``); ``pods/log`` -> (``pods/log``, None)."""
    base, sub = resource, ""
    if "/" in resource:
        base, sub = resource.split("/", 1)
        sub = "/" + sub
    if "." in base:
        plural, group = base.split(".", 1)
        return plural + sub, group
    return resource, None


def build_rules(rules, kind, name, namespace=None, discover=None):
    """Module ``rules`` -> RBAC ``rules``.

    A rule without ``api_groups`` gets its groups the way ``kubectl create role`` finds them: ``name.group``
    spells the group out, a bare name is looked up with ``discover()`` (``{plural: [groups]}``), and the rule
    is split into one rule per API group.
    """
    ref = object_ref(kind, name, namespace)
    out = []
    served = {}
    for index, rule in enumerate(rules or []):
        where = "%s rule %d" % (ref, index + 1)
        verbs = [str(v) for v in (rule.get("verbs") or [])]
        resources = [str(r) for r in (rule.get("resources") or [])]
        urls = [str(u) for u in (rule.get("non_resource_urls") or [])]
        names = [str(n) for n in (rule.get("resource_names") or [])]
        groups = rule.get("api_groups")
        if not verbs:
            raise LanyardError("%s has no verbs. Fix: list verbs such as get, list, watch." % where)
        if resources and urls:
            raise LanyardError("%s sets both resources and non_resource_urls. Fix: put them in separate rules."
                               % where)
        if not resources and not urls:
            raise LanyardError("%s has neither resources nor non_resource_urls. Fix: list resources such as pods."
                               % where)
        if urls:
            if kind != "ClusterRole":
                raise LanyardError("%s: non_resource_urls are allowed in a ClusterRole only. Fix: use kind "
                                   "ClusterRole or drop them." % where)
            if groups or names:
                raise LanyardError("%s: non_resource_urls cannot be combined with api_groups or resource_names. "
                                   "Fix: drop them from this rule." % where)
            out.append({"nonResourceURLs": urls, "verbs": verbs})
            continue
        if groups is not None:
            body = {"apiGroups": [str(g) for g in groups], "resources": resources, "verbs": verbs}
            if names:
                body["resourceNames"] = names
            out.append(body)
            continue
        by_group = []  # [(group, [resources])] in first-seen order
        for res in resources:
            plural, group = split_resource(res)
            if group is None:
                if plural == "*":
                    group = "*"
                else:
                    base = plural.split("/", 1)[0]
                    if not served and discover is not None:
                        served.update(discover())
                    candidates = served.get(base)
                    if not candidates:
                        raise LanyardError("%s: resource '%s' is not served by the cluster, so its API group is "
                                           "unknown. Fix: check the name (plural, lowercase), write it as "
                                           "resource.group (e.g. deployments.apps) or set api_groups."
                                           % (where, res))
                    group = "" if "" in candidates else candidates[0]
            for entry in by_group:
                if entry[0] == group:
                    if plural not in entry[1]:
                        entry[1].append(plural)
                    break
            else:
                by_group.append((group, [plural]))
        for group, plurals in by_group:
            body = {"apiGroups": [group], "resources": plurals, "verbs": verbs}
            if names:
                body["resourceNames"] = names
            out.append(body)
    return out


def build_role(params, discover=None):
    kind, name, namespace = params["kind"], params["name"], params.get("namespace")
    check_scope(kind, name, namespace)
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": kind,
        "metadata": _metadata(name, namespace, params.get("labels")),
        "rules": build_rules(params.get("rules"), kind, name, namespace, discover),
    }


# -- RoleBinding / ClusterRoleBinding -----------------------------------------------------------------------------

def build_subjects(params, kind, name, namespace):
    ref = object_ref(kind, name, namespace)
    subjects = []
    for user in params.get("users") or []:
        subjects.append({"kind": "User", "apiGroup": RBAC_GROUP, "name": str(user)})
    for group in params.get("groups") or []:
        subjects.append({"kind": "Group", "apiGroup": RBAC_GROUP, "name": str(group)})
    for sa in params.get("service_accounts") or []:
        sa = str(sa)
        if ":" in sa:
            sa_ns, sa_name = sa.split(":", 1)
        else:
            sa_ns, sa_name = namespace, sa
        if not sa_ns or not sa_name:
            raise LanyardError("%s: service account '%s' needs a namespace. Fix: write it as namespace:name."
                               % (ref, sa))
        subjects.append({"kind": "ServiceAccount", "name": sa_name, "namespace": sa_ns})
    return subjects


def build_role_ref(params, kind, name, namespace):
    if params.get("role"):
        if kind == "ClusterRoleBinding":
            raise LanyardError("%s can only reference a ClusterRole, not Role '%s'. Fix: use cluster_role, or kind "
                               "RoleBinding." % (object_ref(kind, name), params["role"]))
        return {"apiGroup": RBAC_GROUP, "kind": "Role", "name": params["role"]}
    if params.get("cluster_role"):
        return {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": params["cluster_role"]}
    raise LanyardError("%s needs a role or cluster_role to bind. Fix: set one of them."
                       % object_ref(kind, name, namespace))


def build_binding(params):
    kind, name, namespace = params["kind"], params["name"], params.get("namespace")
    check_scope(kind, name, namespace)
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": kind,
        "metadata": _metadata(name, namespace, params.get("labels")),
        "roleRef": build_role_ref(params, kind, name, namespace),
        "subjects": build_subjects(params, kind, name, namespace),
    }


def role_ref_text(role_ref):
    if not role_ref:
        return "nothing"
    return "%s '%s'" % (role_ref.get("kind"), role_ref.get("name"))


def role_ref_differs(live, desired):
    """True when ``live`` exists and its roleRef (immutable in Kubernetes) is not the desired one."""
    if not live:
        return False
    have = live.get("roleRef") or {}
    want = desired.get("roleRef") or {}
    return any(have.get(k) != want.get(k) for k in ("apiGroup", "kind", "name"))


# -- changed / diff -----------------------------------------------------------------------------------------------

def project(obj):
    """The managed view of an object (``{}`` for none); equal projections mean nothing we manage changed."""
    if not obj:
        return {}
    md = obj.get("metadata") or {}
    out = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
           "metadata": dict((k, copy.deepcopy(md[k])) for k in MANAGED_METADATA if md.get(k))}
    for key in MANAGED_TOP_LEVEL:
        if key in obj and obj[key] is not None:
            out[key] = copy.deepcopy(obj[key])
    # An empty list and a missing list mean the same thing to the API server.
    for key in ("rules", "subjects"):
        if out.get(key) == []:
            del out[key]
    return out


def is_changed(before, after):
    return project(before) != project(after)


def strip_bookkeeping(obj):
    """The object for the module's ``result`` (managedFields removed; it is noise and large)."""
    if not obj:
        return {}
    out = copy.deepcopy(obj)
    (out.get("metadata") or {}).pop("managedFields", None)
    return out


def make_diff(before, after):
    return {"before": project(before), "after": project(after)}


# -- errors -------------------------------------------------------------------------------------------------------

def _causes(exc):
    causes = (exc.status_details or {}).get("causes") or []
    parts = []
    for cause in causes[:5]:
        field = cause.get("field")
        msg = cause.get("message") or cause.get("reason") or ""
        parts.append("%s: %s" % (field, msg) if field else msg)
    return "; ".join(p for p in parts if p)


def explain_api_error(exc, ref, cluster, operation):
    """One line for a failed request: what failed, on which object and cluster, why, and the fix.

    ``exc`` is a KubeAPIError; ``operation`` is e.g. "apply", "dry-run apply", "read", "delete".
    """
    status = getattr(exc, "status", None)
    server_msg = " ".join(str(exc.msg).split())[:400]
    head = "cannot %s %s in %s" % (operation, ref, cluster)
    if status is None:
        return "%s: %s" % (head, server_msg)
    if status == 401:
        return ("%s: 401 Unauthorized, the API server did not accept the credentials. Fix: renew the token or "
                "client certificate in the kubeconfig (an expired Machine ID certificate is a common cause), or "
                "check api_key/client_cert." % head)
    if status == 403:
        return ("%s: 403 Forbidden: %s. Fix: grant the identity in the kubeconfig RBAC permission to %s %s "
                "(to grant permissions in a Role it must hold them itself, or have the escalate/bind verbs)."
                % (head, server_msg, "manage", KINDS.get(ref.split(" ", 1)[0], ("objects",))[0]))
    if status == 404:
        kind = ((exc.status_details or {}).get("kind") or "")
        if kind == "namespaces" or "namespaces" in server_msg:
            ns = (exc.status_details or {}).get("name") or "?"
            return ("%s: namespace '%s' does not exist. Fix: create the namespace first (for example with "
                    "kubernetes.core.k8s or kubectl create namespace %s)." % (head, ns, ns))
        return ("%s: 404 Not Found: %s. Fix: check that the cluster serves %s (RBAC enabled) and the names."
                % (head, server_msg, RBAC_API_VERSION))
    if status == 409:
        causes = (exc.status_details or {}).get("causes") or []
        if any(c.get("reason") == "FieldManagerConflict" for c in causes) or server_msg.startswith("Apply failed"):
            return ("%s: 409 Conflict, fields are owned by another field manager: %s. Fix: set "
                    "force_conflicts: true to take them over, or change them with the tool that owns them."
                    % (head, _causes(exc) or server_msg))
        return ("%s: 409 Conflict: %s. Fix: the object changed or is being deleted meanwhile; run the task again."
                % (head, server_msg))
    if status == 422:
        detail = _causes(exc) or server_msg
        if "roleRef" in server_msg:
            return ("%s: 422 Invalid: %s. Fix: roleRef cannot change on an existing binding; set force: true to "
                    "delete and recreate it, or use a new name." % (head, detail))
        return "%s: 422 Invalid: %s. Fix the named field." % (head, detail)
    return "%s: HTTP %s %s: %s" % (head, status, getattr(exc, "reason", "") or "", server_msg)
