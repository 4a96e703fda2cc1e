# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the decision half of ``agent_state`` -- compare what a host holds with what the
role would write, and name every difference. No I/O here; ``_host_state`` reads, this judges.

Each difference is one line that names the object and what differs (never a file's content), e.g.
``/etc/tbot.yaml: content differs`` or ``machine-id.service: inactive, expected active``. An empty list means
the role's install, configure and service phases would change nothing on the host."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re

ATTRS = ("type", "owner", "group", "mode", "sha256")


def _mode(value):
    if value is None:
        return None
    if isinstance(value, int):
        return value
    return int(str(value), 8)


def path_drift(expected, observed):
    """Differences of one path. ``expected`` holds ``path`` and any of type/owner/group/mode/sha256."""
    path = expected["path"]
    if not observed.get("exists"):
        return ["%s: missing" % path]
    out = []
    for attr in ATTRS:
        want = expected.get(attr)
        if want is None:
            continue
        have = observed.get(attr)
        if attr == "mode":
            if _mode(want) != _mode(have):
                out.append("%s: mode %s, expected %04o" % (path, have, _mode(want)))
        elif attr == "sha256":
            if want != have:
                out.append("%s: content differs" % path)
        elif want != have:
            out.append("%s: %s %s, expected %s" % (path, attr, have, want))
    return out


def service_drift(name, props, enabled, active):
    out = []
    unit = name
    if enabled is None and active is None:
        return out
    if props.get("LoadState") != "loaded":
        return ["%s: not loaded (%s)" % (unit, props.get("LoadState") or "unknown")]
    if props.get("NeedDaemonReload") == "yes":
        out.append("%s: changed on disk, systemd not reloaded" % unit)
    if enabled is not None:
        is_enabled = props.get("UnitFileState") in ("enabled", "enabled-runtime")
        if bool(enabled) != is_enabled:
            out.append("%s: %s, expected %s" % (unit, props.get("UnitFileState"), "enabled" if enabled else "disabled"))
    if active is not None:
        is_active = props.get("ActiveState") == "active"
        if bool(active) != is_active:
            out.append("%s: %s, expected %s" % (unit, props.get("ActiveState"), "active" if active else "stopped"))
    return out


def running_drift(unit, agent_bin, command_target, argv):
    """The service runs the agent from another install than the one its command points to: an upgrade whose restart
    never came (a run cut after the command's switch, before its handlers). ``argv``: the service's main process's
    command line (a console script started by the kernel: [its virtualenv's python, the script, ...]);
    ``command_target``: where ``agent_bin`` points (itself when it is not a symlink). A process started otherwise
    (another ExecStart) is not judged."""
    if len(argv) < 2 or os.path.normpath(argv[1]) != os.path.normpath(agent_bin):
        return []
    running = os.path.dirname(os.path.dirname(os.path.normpath(argv[0])))
    wanted = os.path.dirname(os.path.dirname(os.path.normpath(command_target)))
    if running == wanted:
        return []
    return ["%s: runs the agent from %s, but %s is %s's (not restarted after an upgrade)"
            % (unit, running, agent_bin, wanted)]


def named_drift(kind, present):
    """``present`` maps names of users or groups to whether the host has them."""
    return ["%s %s: missing" % (kind, name) for name, ok in sorted(present.items()) if not ok]


def user_drift(expected, observed):
    """``expected``: dicts with ``name`` and any of ``group``, ``home``, ``shell``; ``observed``: what
    ``_host_state.users`` read (None for a missing user)."""
    out = []
    for want in expected:
        have = observed.get(want["name"])
        if have is None:
            out.append("user %s: missing" % want["name"])
            continue
        for key in ("group", "home", "shell"):
            if want.get(key) and have.get(key) != want[key]:
                out.append("user %s: %s %s, expected %s" % (want["name"], key, have.get(key), want[key]))
    return out


def install_drift(marker, wheels_key, status, agent_version):
    """The installed wheel set (the marker the role writes after installing) and the running agent's version."""
    out = []
    if wheels_key and marker != wheels_key:
        out.append("agent wheels: %s, expected %s" % (marker or "no record of the installed set", wheels_key))
    have = (status or {}).get("agent_version")
    if agent_version and have != agent_version:
        out.append("agent version: %s, expected %s" % (have or "unknown", agent_version))
    return out


def acl_check_drift(check):
    """A destination's ``acl_check`` from the agent's ``status --check-acls``: None when ``init`` would change
    nothing there, else what it would change (the words ``init --check`` prints), or why it could not tell."""
    if check.get("error"):
        return "cannot check it as the agent's user (%s)" % check["error"]
    if check.get("changed"):
        return "would change: %s" % "; ".join(check.get("actions") or ["something"])
    return None


def stray_drift(found, wanted):
    """Paths the role owns by name (a glob) that its settings no longer list, e.g. a removed reload unit."""
    return ["%s: not in the role's settings any more (left over)" % path for path in found if path not in wanted]


def tbot_takeover(name, props, program, argv, config_text, storage_dir, own):
    """Whether the unit ``name`` is a hand-built tbot that renews the identity in ``storage_dir`` and must be
    stopped (and, unless it is the agent's own unit name, disabled) before the agent starts on that storage: two
    renewers of one identity make Teleport lock the bot. ``own``: the unit has the agent's unit name (the guide's
    ``machine-id.service``), which the role's unit replaces: any tbot running under it is taken over. Another
    unit is taken over only when its command line or its config file (``-c``) names ``storage_dir``, so an
    unrelated tbot on the host is left alone. Returns None or {name, own, active, enabled}."""
    if props.get("LoadState") != "loaded" or os.path.basename(program or "") != "tbot":
        return None
    active = props.get("ActiveState") in ("active", "activating", "reloading", "deactivating")
    enabled = props.get("UnitFileState") in ("enabled", "enabled-runtime")
    if not (active or enabled):
        return None
    if not own:
        wanted = storage_dir.rstrip("/")
        words = re.split(r"[\s:=]+", " ".join(argv) + " " + (config_text or ""))
        if not any(w.strip("'\"").rstrip("/") == wanted for w in words if w.strip("'\"")):
            return None
    return {"name": name, "own": bool(own), "active": active, "enabled": enabled}


def takeover_drift(units, storage_dir):
    return ["%s: runs tbot on %s, expected %s (the agent takes that identity over)"
            % (u["name"], storage_dir, "replaced by the agent's unit" if u["own"] else "stopped and disabled")
            for u in units]
