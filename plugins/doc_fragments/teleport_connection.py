# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Connection options of every lanyard.machine_id.teleport_* module that talks to the auth server
    # through tctl. Argument spec: plugins/module_utils/_tctl.py CONNECTION_ARGSPEC.
    DOCUMENTATION = r"""
options:
  tctl_path:
    description:
      - Path to the C(tctl) binary.
      - When not set, C(tctl) is looked up in E(PATH).
    type: path
  auth_server:
    description:
      - Address of the Teleport auth server (C(host:3025)) or proxy (C(host:443)) that C(tctl) connects to,
        passed as C(--auth-server).
      - Leave unset to use the address from O(config_file) or from the identity file.
    type: str
  identity_file:
    description:
      - Teleport identity file for C(tctl -i), for example made by
        C(tctl auth sign --user=<admin> --format=file --out=<file>) or C(tsh login --out).
      - Its user needs a role that may read and write the resources this module manages (for example the preset
        C(editor) role).
    type: path
  config_file:
    description:
      - A C(teleport.yaml) passed as C(tctl -c). On an auth server host this makes C(tctl) use the local admin
        identity stored in the auth server's data directory.
    type: path
  insecure:
    description:
      - Passed as C(tctl --insecure) - do not verify the proxy's TLS certificate when O(auth_server) is a proxy.
      - Only for test clusters.
    type: bool
    default: false
  ca_path:
    description:
      - PEM file with the CA that signed the Teleport proxy's HTTPS certificate.
      - Given to C(tctl) as E(SSL_CERT_FILE) (needed when O(auth_server) is a proxy whose certificate is not in the
        system trust store), and used to verify the proxy by M(lanyard.machine_id.teleport_cluster_info).
    type: path
  timeout:
    description:
      - Seconds after which one C(tctl) call is stopped (needs coreutils C(timeout) on the host; without it
        C(tctl) runs unbounded).
    type: int
    default: 60
notes:
  - C(tctl) runs on the host the task runs on; use C(delegate_to) or C(run_once) to run it on a host with
    C(tctl) access, typically the controller.
  - Secrets never go into C(tctl)'s command line; resources that hold one are passed on standard input.
"""
