# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: ``agent_state`` -- read the host (``_host_state``), judge it (``_host_drift``)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import sys

from ansible_collections.lanyard.machine_id.plugins.module_utils import _host_drift as drift
from ansible_collections.lanyard.machine_id.plugins.module_utils import _host_state as host
from ansible_collections.lanyard.machine_id.plugins.module_utils import _tbot_storage as tbot

ARGSPEC = dict(
    agent_bin=dict(type="path", required=True),
    agent_python=dict(type="path", required=True),
    config_path=dict(type="path", required=True),
    bot_user=dict(type="str", required=True),
    bot_group=dict(type="str", required=True),
    reader_user=dict(type="str", default=""),
    destinations=dict(type="list", elements="path", default=[]),
    acls=dict(type="str", default="try"),
    service_name=dict(type="str", required=True),
    service_enabled=dict(type="bool"),
    service_active=dict(type="bool"),
    files=dict(type="list", elements="dict", default=[]),
    users=dict(type="list", elements="dict", default=[],
               options=dict(name=dict(type="str", required=True), group=dict(type="str"), home=dict(type="path"),
                            shell=dict(type="str"))),
    groups=dict(type="list", elements="str", default=[]),
    wheels_marker=dict(type="path"),
    wheels_key=dict(type="str", no_log=False),
    agent_version=dict(type="str"),
    kubectl=dict(type="str", default="kubectl"),
    units=dict(type="list", elements="dict", default=[]),
    exclusive=dict(type="dict"),
    storage_dir=dict(type="path"),
    tbot_units=dict(type="list", elements="str", default=[]),
    cluster_check_namespace=dict(type="str"),
    cluster_check_verb=dict(type="str", default="list"),
    cluster_check_resource=dict(type="str", default="pods"),
    cluster_check_every_context=dict(type="list", elements="path", default=[]),
)


def agent_state(module):
    p = module.params
    if p["cluster_check_namespace"]:  # a bad question fails the run at once, whatever the host's state
        host.can_i_words(p["cluster_check_verb"], p["cluster_check_resource"])
    result = {"agent_python": host.agent_python(module, p["agent_python"]),
              "systemd_version": host.systemd_version(module), "unit": {}, "status": {}, "drift": [],
              "tbot_units": [], "host": host.host_info(sys.version_info)}
    result["wheel_target"] = host.wheel_target(result["agent_python"])
    found = []
    paths = result["paths"] = {}
    for spec in p["files"]:
        if not spec.get("path"):
            continue
        paths[spec["path"]] = host.path_state(spec["path"], checksum="sha256" in spec or bool(spec.get("checksum")))
        found += drift.path_drift(spec, paths[spec["path"]])
    found += drift.named_drift("group", host.groups_exist(p["groups"]))
    result["users"] = host.users([u["name"] for u in p["users"]])
    found += drift.user_drift(p["users"], result["users"])

    agent = host.path_state(p["agent_bin"])
    config = host.path_state(p["config_path"])
    result["agent_found"] = bool(agent.get("exists"))
    result["installed"] = bool(agent.get("exists") and config.get("exists"))
    if result["installed"]:
        result["status"], error = host.agent_status(module, p["agent_bin"], p["bot_user"], p["config_path"],
                                                    check_acls=bool(p["destinations"]))
        if error:
            result["status_error"] = error
            found.append("%s status: %s" % (p["agent_bin"], error.strip().splitlines()[-1][-300:]))
    elif not agent.get("exists"):
        found.append("%s: missing" % p["agent_bin"])

    # a host set up by hand with tbot: its identity, judged here when the agent (which would judge it) is not
    # installed yet or found no identity of its own (see _tbot_storage)
    if p["storage_dir"] and not (result["status"].get("identity") or {}).get("present"):
        verdict = tbot.judge(host.tbot_files(p["storage_dir"]), p["storage_dir"])
        if verdict is not None:
            result["status"] = dict(result["status"], identity=verdict)

    marker = host.read_text(p["wheels_marker"]) if p["wheels_marker"] else None
    result["wheels_installed"] = marker
    if p["wheels_key"] is not None or p["agent_version"] is not None:
        found += drift.install_drift(marker, p["wheels_key"], result["status"], p["agent_version"])

    if systemd_present(result):
        # every unit judged below, in one systemctl call
        shown = host.units_state(module, [p["service_name"] + ".service"] + _tbot_unit_names(p)
                                 + [unit["name"] for unit in p["units"]])
        result["unit"] = shown[p["service_name"] + ".service"]
        found += drift.service_drift(p["service_name"] + ".service", result["unit"], p["service_enabled"],
                                     p["service_active"])
        if agent.get("exists") and result["unit"].get("ActiveState") == "active":
            found += drift.running_drift(p["service_name"] + ".service", p["agent_bin"],
                                         host.link_target(p["agent_bin"]),
                                         host.process_argv(result["unit"].get("MainPID")))
        result["tbot_units"] = tbot_units(p, shown)
        found += drift.takeover_drift(result["tbot_units"], p["storage_dir"])
        for unit in p["units"]:
            found += drift.service_drift(unit["name"], shown[unit["name"]], unit.get("enabled"), unit.get("active"))
    if p["exclusive"]:
        stray = []
        for pattern in p["exclusive"].get("globs") or []:
            stray += host.glob_paths(pattern)
        found += drift.stray_drift(sorted(set(stray)), p["exclusive"].get("paths") or [])

    if p["service_active"] and result["installed"]:
        for out in result["status"].get("outputs") or []:
            if not out.get("valid"):
                found.append("%s: no valid credentials (%s)" % (out.get("destination"),
                                                                out.get("problem") or "status says not valid"))
    to_read = []  # destinations whose ACLs are as wanted: does the reader read valid credentials there?
    # what `init` would change in each destination: judged by the agent's status run above when it could (as the
    # agent's user, with the config's readers and acls), else by `init --check` with the role's settings
    judged = dict((o.get("destination"), o["acl_check"]) for o in result["status"].get("outputs") or []
                  if isinstance(o, dict) and isinstance(o.get("acl_check"), dict))
    if agent.get("exists"):
        for directory in p["destinations"]:
            if directory in judged and result["status"] and not result.get("status_error"):
                acl = drift.acl_check_drift(judged[directory])
            else:
                acl = host.destination_acls(module, p["agent_bin"], directory, p["acls"], p["bot_user"],
                                            p["bot_group"], p["reader_user"])
            if acl:
                found.append("%s: %s" % (directory, acl))
            elif p["reader_user"] and p["service_active"] is not False:
                to_read.append(directory)
    result["kubectl_path"] = module.get_bin_path(p["kubectl"]) if p["kubectl"] else None
    # The verify phase's question to the cluster, asked here for a host where nothing else differs (the role then
    # skips every other phase and its own round trip to ask it); a host that differs is asked after the role fixed
    # it. A "yes" through a destination's kubeconfig, as the reader, also proves the reader reads valid credentials
    # there (kubectl ran the exec plugin, or read the inline ones, as the reader, and the cluster took them).
    answered = set()
    if (p["cluster_check_namespace"] and not found and result["kubectl_path"] and p["service_active"]
            and result["installed"]):
        every = set(p["cluster_check_every_context"])
        result["cluster_check"] = [c for directory in p["destinations"]
                                   for c in host.cluster_check(module, p["reader_user"], result["kubectl_path"],
                                                               directory, p["cluster_check_namespace"],
                                                               every_context=directory in every,
                                                               verb=p["cluster_check_verb"],
                                                               resource=p["cluster_check_resource"])]
        answered = set(directory for directory in p["destinations"]
                       if all(c["stdout"] == "yes" for c in result["cluster_check"] if c["directory"] == directory))
    for directory in to_read:
        if directory in answered:
            continue
        denied = host.reader_reads(module, p["reader_user"], p["agent_bin"], directory)
        if denied:
            found.append("%s: %s cannot read valid credentials there (%s)" % (directory, p["reader_user"], denied))
    result["drift"] = found
    return result


def _tbot_unit_names(p):
    """The units tbot_units looks at: the agent's own (a tbot may run under its name) and machine_id_tbot_units."""
    if not p["storage_dir"]:
        return []
    own = p["service_name"] + ".service"
    names = [own] + [n if "." in n else n + ".service" for n in p["tbot_units"]]
    return sorted(set(names), key=names.index)


def tbot_units(p, shown):
    """The hand-built tbot units to stop before the agent starts on the storage (see _host_drift.tbot_takeover);
    ``shown``: host.units_state of at least _tbot_unit_names(p)."""
    own = p["service_name"] + ".service"
    out = []
    for name in _tbot_unit_names(p):
        props = shown[name]
        program, argv = tbot.exec_argv(props.get("ExecStart"))
        if os.path.basename(program or "") != "tbot":
            continue
        conf = tbot.tbot_config_path(argv)
        text = host.small_text(conf) if conf and name != own else None
        unit = drift.tbot_takeover(name, props, program, argv, text, p["storage_dir"], name == own)
        if unit is not None:
            out.append(unit)
    return out


def systemd_present(result):
    return result["systemd_version"] is not None
