# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the teleport_role service (read, compare, apply unless check mode)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_resource import (
    build_role,
    canonical_role,
    changed_paths,
    role_diff,
    role_matches,
    strip_volatile,
)
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_yaml import to_yaml
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_wait import DEFAULT_TIMEOUT, wait_for

ROLE_ARGSPEC = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    spec=dict(type="dict"),
    resource=dict(type="dict"),
    role_version=dict(type="str", default="v6"),
    labels=dict(type="dict"),
    description=dict(type="str"),
)


def read_role(tctl, name):
    items = tctl.get("role/%s" % name, what="read role %s" % name)
    return items[0] if items else None


def _revision(resource):
    meta = (resource or {}).get("metadata") or {}
    return meta.get("revision") or meta.get("id")


def ensure_role(tctl, params, check_mode):
    """Return the module result for one role.

    After a write the module reads the role back until the write shows (the auth server answers reads from a
    cache that lags writes), so a run right after this one sees what this one did.
    """
    name = params["name"]
    header = "role/%s" % name
    current = read_role(tctl, name)
    if params["state"] == "absent":
        result = dict(changed=current is not None, role=None)
        result["diff"] = dict(before=to_yaml(canonical_role(current)) if current else "", after="",
                              before_header=header, after_header=header)
        if current is None:
            result["msg"] = "role %s is absent" % name
            return result
        if check_mode:
            result["msg"] = "role %s would be deleted" % name
            return result
        tctl.run(["rm", "role/%s" % name], "delete role %s" % name)
        left = wait_for(lambda: read_role(tctl, name), lambda r: r is None)
        result["msg"] = "role %s deleted" % name
        if left is not None:
            result["warnings"] = [_lag_warning(name, "deleted", "still lists it")]
        return result

    declared = build_role(name, spec=params.get("spec"), resource=params.get("resource"),
                          version=params["role_version"], labels=params.get("labels"),
                          description=params.get("description"))
    before, after = role_diff(declared, current)
    diff = dict(before=to_yaml(before), after=to_yaml(after), before_header=header, after_header=header)
    if role_matches(declared, current):
        return dict(changed=False, role=strip_volatile(current), diff=diff, msg="role %s is up to date" % name)
    verb = "created" if current is None else "updated"
    what = "" if current is None else " (%s)" % ", ".join(changed_paths(before, after))
    if check_mode:
        return dict(changed=True, role=after, diff=diff, msg="role %s would be %s%s" % (name, verb, what))
    tctl.create(declared, "%s role %s" % ("create" if current is None else "update", name), force=current is not None)
    old_rev = _revision(current)

    def shows_write(role):
        if role is None:
            return False
        if role_matches(declared, role):
            return True
        rev = _revision(role)
        return current is None or (rev is not None and old_rev is not None and rev != old_rev)

    stored = wait_for(lambda: read_role(tctl, name), shows_write)
    result = dict(changed=True, role=strip_volatile(stored) if stored else after, diff=diff,
                  msg="role %s %s%s" % (name, verb, what))
    if not shows_write(stored):
        result["warnings"] = [_lag_warning(name, verb, "still shows the old role")]
    elif not role_matches(declared, stored):
        extra = ", ".join(changed_paths(after, canonical_role(stored))) or "values in another form"
        result["warnings"] = ["role %s: the server stored it with differences the module does not predict (%s), so "
                              "the next run will report a change again. Fix: declare those values as the server "
                              "stores them (see the returned role)." % (name, extra)]
    return result


def _lag_warning(name, verb, what):
    return ("role %s was %s, but after %ss the auth server %s (its cache lags), so a run right after this one may "
            "report a change. Fix: check the auth server's health (`tctl status`) and rerun."
            % (name, verb, int(DEFAULT_TIMEOUT), what))
