#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: teleport_cluster_info
short_description: Read what a Machine ID agent needs to know about a Teleport cluster
version_added: 0.1.0
description:
  - Reads the proxy's public C(/webapi/ping) (cluster name, server version, TLS routing, Kubernetes addresses) and,
    through C(tctl status), the CA pins of the cluster's host CA.
  - Fails with the explanation and fix from the Machine ID Kubernetes guide when the proxy has TLS routing off and no
    Kubernetes public address, because Machine ID cannot reach Kubernetes through such a proxy.
requirements:
  - HTTPS access from the host that runs the task (usually the controller) to the Teleport proxy's web address;
    no Python library beyond ansible-core.
  - C(tctl) of the Teleport cluster's major version (tested with Teleport v13.3.8) on that host, unless
    O(ca_pins=false) and O(proxy_addr) is set.
author:
  - Lanyard contributors (@lanyard)
extends_documentation_fragment:
  - lanyard.machine_id.teleport_connection
attributes:
  check_mode:
    support: full
    description: Read-only; runs the same in check mode.
  diff_mode:
    support: none
    description: Read-only.
options:
  proxy_addr:
    description:
      - Public address of the Teleport proxy (C(host:port) or C(https://host:port); port 443 when left out).
      - When not set, C(tctl) is asked for the first proxy's public address.
    type: str
  ca_pins:
    description:
      - Read the CA pins with C(tctl status). Set to false when C(tctl) is not available; RV(cluster.ca_pins) is then
        empty.
    type: bool
    default: true
  require_kube_access:
    description:
      - Fail when Machine ID could not reach Kubernetes through this proxy (TLS routing off and no
        C(kube_public_addr)).
    type: bool
    default: true
  locked_users:
    description:
      - Also list the users that a lock in force targets (one C(tctl get locks)), in RV(cluster.locked_users). The
        rollout playbook uses it to find hosts whose bot Teleport locked, which their agent cannot tell apart from
        other refusals (Teleport v13 answers a locked user with a bare "access denied").
    type: bool
    default: false
seealso:
  - module: lanyard.machine_id.teleport_bot_token
"""

EXAMPLES = r"""
- name: Facts about the cluster, as the agent will see it
  lanyard.machine_id.teleport_cluster_info:
    proxy_addr: teleport.example.com:443
    config_file: /etc/teleport.yaml
  register: cluster

- name: Show the CA pins
  ansible.builtin.debug:
    var: cluster.cluster.ca_pins

- name: Only the proxy's view, without tctl
  lanyard.machine_id.teleport_cluster_info:
    proxy_addr: teleport.example.com:443
    ca_path: /etc/ssl/teleport-web-ca.pem
    ca_pins: false
"""

RETURN = r"""
cluster:
  description: Facts about the cluster.
  returned: success
  type: dict
  contains:
    cluster_name:
      description: Name of the Teleport cluster.
      type: str
      sample: teleport.example.com
    server_version:
      description: Teleport version of the proxy.
      type: str
      sample: 13.3.8
    min_client_version:
      description: Oldest client version the cluster accepts.
      type: str
    ca_pins:
      description: C(sha256:...) pins of the host CA (empty when O(ca_pins=false)).
      type: list
      elements: str
    proxy_addr:
      description: The proxy address that was asked.
      type: str
    proxy_public_addr:
      description: The proxy's public address (C(proxy.ssh.public_addr), else O(proxy_addr)).
      type: str
    tls_routing_enabled:
      description: Whether the proxy uses TLS routing (C(proxy_listener_mode) multiplex).
      type: bool
    kube_enabled:
      description: Whether the proxy serves Kubernetes.
      type: bool
    kube_public_addr:
      description: C(proxy.kube.public_addr), or null.
      type: str
    kube_listen_addr:
      description: C(proxy.kube.listen_addr), or null.
      type: str
    kube_addr:
      description:
        - The address Machine ID uses for Kubernetes - the proxy's public address with TLS routing, else the
          Kubernetes public address; null when there is none.
      type: str
    signature_algorithm_suite:
      description: The cluster's signature algorithm suite (Teleport 17 and later), or null.
      type: str
    locked_users:
      description: Users targeted by a lock in force (for example C(bot-example-web1)), sorted.
      returned: when O(locked_users=true)
      type: list
      elements: str
msg:
  description: One line summary.
  returned: success
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lanyard.machine_id.plugins.module_utils._runner import run_module
from ansible_collections.lanyard.machine_id.plugins.module_utils._tctl import connection_argspec, tctl_from_module
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_info import INFO_ARGSPEC, cluster_info


def main():
    spec = connection_argspec()
    spec.update(INFO_ARGSPEC)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    run_module(module, lambda m: cluster_info(lambda: tctl_from_module(m), m.params))


if __name__ == "__main__":
    main()
