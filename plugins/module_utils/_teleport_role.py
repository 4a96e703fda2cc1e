# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the teleport_role service (read, compare, apply unless check mode)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_resource import (
    build_role,
    role_diff,
    role_matches,
    strip_volatile,
)
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_yaml import to_yaml
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_wait import wait_for

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


def ensure_role(tctl, params, check_mode):
    """Return the module result for one role."""
    name = params["name"]
    current = read_role(tctl, name)
    if params["state"] == "absent":
        result = dict(changed=current is not None, role=None)
        result["diff"] = dict(before=to_yaml(strip_volatile(current)) if current else "", after="",
                              before_header="role/%s" % name, after_header="role/%s" % name)
        if current is not None and not check_mode:
            tctl.run(["rm", "role/%s" % name], "delete role %s" % name)
        result["msg"] = ("role %s %s" % (name, "would be deleted" if check_mode else "deleted")) if current else \
            "role %s is absent" % name
        return result

    declared = build_role(name, spec=params.get("spec"), resource=params.get("resource"),
                          version=params["role_version"], labels=params.get("labels"),
                          description=params.get("description"))
    before, after = role_diff(declared, current)
    diff = dict(before=to_yaml(before) if current else "", after=to_yaml(after),
                before_header="role/%s" % name, after_header="role/%s" % name)
    if role_matches(declared, current):
        return dict(changed=False, role=strip_volatile(current), diff=diff, msg="role %s is up to date" % name)
    verb = "created" if current is None else "updated"
    if check_mode:
        return dict(changed=True, role=after, diff=diff, msg="role %s would be %s" % (name, verb))
    tctl.create(declared, "%s role %s" % ("create" if current is None else "update", name), force=current is not None)
    # The auth server answers reads from a cache that lags writes by up to ~1s: wait for our write.
    stored = wait_for(lambda: read_role(tctl, name), lambda r: role_matches(declared, r))
    result = dict(changed=True, role=strip_volatile(stored), diff=diff, msg="role %s %s" % (name, verb))
    if stored is not None and not role_matches(declared, stored):
        result["warnings"] = ["role %s: the server stores some declared values in a different form, so the next run "
                              "may report a change again; compare the returned role with what you declared." % name]
    return result
