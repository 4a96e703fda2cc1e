# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the actions of kube_role and kube_rolebinding.

Read the live object, server-side apply the desired one (``dryRun=All`` in check mode, so defaults,
admission and validation are the server's, not a guess), and report ``changed`` by comparing the managed
view of the live object with the object the server returned. Functions return the module result;
failures are :class:`LanyardError` with the object, the cluster and the fix (the runner exits).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_config as kcfg
from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_resource as kres
from ansible_collections.lanyard.machine_id.plugins.module_utils._kube_client import KubeAPIError, KubeClient


def open_connection(module):
    """Resolve the connection options and hide every credential found from all module output."""
    conn = kcfg.resolve(module.params)
    module.no_log_values.update(conn.secrets)
    if conn.exec_plugin is not None:
        def run(argv, env):
            return module.run_command(argv, environ_update=env)
        kcfg.run_exec_plugin(conn, run)
        module.no_log_values.update(conn.secrets)
    return conn


def _call(fn, ref, conn, operation, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except KubeAPIError as exc:
        raise LanyardError(kres.explain_api_error(exc, ref, conn.label, operation),
                           status=exc.status, api_message=" ".join(str(exc.msg).split())[:400])


def _result(changed, operation, before, after, ref):
    return {
        "changed": changed,
        "operation": operation,
        "object": ref,
        "result": kres.strip_bookkeeping(after),
        "diff": kres.make_diff(before, after),
    }


def ensure_absent(api, check_mode, path, ref):
    conn = api.conn
    before = _call(api.get, ref, conn, "read", path)
    if before is None:
        return _result(False, "none", None, None, ref)
    md = before.get("metadata") or {}
    _call(api.delete, ref, conn, "dry-run delete" if check_mode else "delete", path, dry_run=check_mode,
          uid=md.get("uid"))
    return _result(True, "delete", before, None, ref)


def ensure_present(api, check_mode, path, ref, desired, force_conflicts=False, recreate=False):
    """Apply ``desired``. A binding whose roleRef must change is deleted and recreated when ``recreate``."""
    conn = api.conn
    before = _call(api.get, ref, conn, "read", path)
    if kres.role_ref_differs(before, desired):
        have, want = kres.role_ref_text(before.get("roleRef")), kres.role_ref_text(desired.get("roleRef"))
        if not recreate:
            raise LanyardError(
                "cannot change %s in %s: it binds %s and the task wants %s, but roleRef is immutable in "
                "Kubernetes. Fix: set force: true to delete and recreate the binding (its subjects lose this "
                "access for a moment), or give the new binding another name." % (ref, conn.label, have, want),
                live_role_ref=before.get("roleRef"), wanted_role_ref=desired.get("roleRef"))
        return _recreate(api, check_mode, path, ref, before, desired, force_conflicts)
    operation = "dry-run apply" if check_mode else "apply"
    after = _call(api.apply, ref, conn, operation, path, desired, force=force_conflicts, dry_run=check_mode)
    changed = kres.is_changed(before, after)
    return _result(changed, "create" if before is None else ("update" if changed else "none"), before, after, ref)


def _recreate(api, check_mode, path, ref, before, desired, force_conflicts):
    conn = api.conn
    md = before.get("metadata") or {}
    if check_mode:
        # The server validates the delete (permissions, preconditions); a dry-run create cannot run while the
        # old object still exists, so the predicted object is the desired one.
        _call(api.delete, ref, conn, "dry-run delete", path, dry_run=True, uid=md.get("uid"))
        return _result(True, "recreate", before, desired, ref)
    _call(api.delete, ref, conn, "delete (to change roleRef)", path, uid=md.get("uid"),
          resource_version=md.get("resourceVersion"))
    try:
        after = api.apply(path, desired, force=force_conflicts)
    except KubeAPIError as exc:
        raise LanyardError(
            "%s was deleted to change its roleRef, but creating it again failed; it is now missing. %s"
            % (ref, kres.explain_api_error(exc, ref, conn.label, "create")),
            deleted_object=kres.strip_bookkeeping(before))
    return _result(True, "recreate", before, after, ref)


def role_action(module):
    p = module.params
    kind, name, namespace = p["kind"], p["name"], p.get("namespace")
    kres.check_scope(kind, name, namespace)
    ref = kres.object_ref(kind, name, namespace)
    path = kres.object_path(kind, name, namespace)
    conn = open_connection(module)
    with KubeClient(conn, timeout=p["request_timeout"]) as api:
        if p["state"] == "absent":
            return ensure_absent(api, module.check_mode, path, ref)

        def discover():
            return _call(api.discovery, ref, conn, "discover API groups for")
        desired = kres.build_role(p, discover=discover)
        return ensure_present(api, module.check_mode, path, ref, desired, force_conflicts=p["force_conflicts"])


def binding_action(module):
    p = module.params
    kind, name, namespace = p["kind"], p["name"], p.get("namespace")
    kres.check_scope(kind, name, namespace)
    ref = kres.object_ref(kind, name, namespace)
    path = kres.object_path(kind, name, namespace)
    desired = kres.build_binding(p) if p["state"] == "present" else None
    conn = open_connection(module)
    with KubeClient(conn, timeout=p["request_timeout"]) as api:
        if p["state"] == "absent":
            return ensure_absent(api, module.check_mode, path, ref)
        return ensure_present(api, module.check_mode, path, ref, desired, force_conflicts=p["force_conflicts"],
                              recreate=p["force"])
