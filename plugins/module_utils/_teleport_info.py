# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the teleport_cluster_info service (read-only)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_bot import locks_in_force
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_ping import (
    check_kube_reachable,
    fetch_ping,
    ping_facts,
)
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_token import proxy_address

INFO_ARGSPEC = dict(
    proxy_addr=dict(type="str"),
    ca_pins=dict(type="bool", default=True),
    require_kube_access=dict(type="bool", default=True),
    locked_users=dict(type="bool", default=False),
)


def cluster_info(make_tctl, params, ping=fetch_ping):
    """``make_tctl()`` builds the tctl client lazily: it is needed only for CA pins or proxy discovery."""
    tctl = None
    proxy_addr = params.get("proxy_addr")
    if not proxy_addr:
        tctl = make_tctl()
        proxy_addr = proxy_address(tctl, {})
        if not proxy_addr:
            raise LanyardError("No proxy address: proxy_addr is not set and the cluster lists no proxy with a public "
                               "address. Fix: set proxy_addr to the proxy's public host:port.")
    facts = ping_facts(ping(proxy_addr, ca_path=params.get("ca_path"), insecure=params.get("insecure"),
                            timeout=params.get("timeout")), proxy_addr)
    facts["proxy_addr"] = proxy_addr
    facts["ca_pins"] = []
    if params.get("ca_pins"):
        tctl = tctl or make_tctl()
        status = tctl.status()
        facts["ca_pins"] = status["ca_pins"]
        if facts["cluster_name"] and status["cluster_name"] and status["cluster_name"] != facts["cluster_name"]:
            raise LanyardError("The proxy %s serves cluster %s but tctl talks to cluster %s. Fix: point proxy_addr "
                               "and the tctl connection options at the same cluster."
                               % (proxy_addr, facts["cluster_name"], status["cluster_name"]))
    if params.get("locked_users"):
        tctl = tctl or make_tctl()
        facts["locked_users"] = sorted(set(lk["user"] for lk in locks_in_force(tctl, "list locks") if lk["user"]))
    if params.get("require_kube_access"):
        check_kube_reachable(facts)
    msg = "cluster %s, Teleport %s" % (facts["cluster_name"], facts["server_version"])
    return dict(changed=False, cluster=facts, msg=msg)
