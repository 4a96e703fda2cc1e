#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: teleport_role
short_description: Create, update or delete a Teleport role
version_added: 0.1.0
description:
  - Makes a Teleport role exactly the declared O(spec) (or full O(resource)), through C(tctl). The declaration is
    the whole role - desired state. What is on the server and not declared (a C(kubernetes_users) entry, a whole
    C(deny) block, an option, a label of the role) is a difference, and the write removes it.
  - Both sides are compared in the form C(tctl get) prints, after what Teleport fills in by itself, so those
    defaults never show as a change - the default options of a role (for example C(max_session_ttl=30h0m0s),
    C(cert_format=standard)), an empty C(deny), the C(kubernetes_resources) a v3-v5 role gets for its
    C(kubernetes_labels), durations such as C(8h) stored as C(8h0m0s), a one-element label list stored as a string.
    A re-run with the same input reports no change.
  - When the role differs, the whole declared role is written with C(tctl create -f); C(msg) names what changes.
  - The task returns once a read shows its write (Teleport's auth server answers reads from a cache that lags
    writes), for at most 15 seconds, so the next task or run sees what this one did; if the read has not caught
    up by then, the task says so in a warning.
requirements:
  - C(tctl) of the Teleport cluster's major version (tested with Teleport v13.3.8) on the host that runs the task,
    usually the controller (C(delegate_to=localhost)), with credentials that may manage roles.
  - Python 3.6 or newer on that host.
author:
  - Lanyard contributors (@lanyard)
extends_documentation_fragment:
  - lanyard.machine_id.teleport_connection
attributes:
  check_mode:
    support: full
    description: Reads the role and reports what would change; writes nothing.
  diff_mode:
    support: full
    description:
      - Shows the role as YAML in the form C(tctl get) prints it - before is the role on the server, after is the
        role the write leaves on the server (the declared role with Teleport's defaults), so removed keys show.
options:
  name:
    description:
      - Name of the role (C(metadata.name)).
    type: str
    required: true
  state:
    description:
      - V(present) creates or updates the role, V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  spec:
    description:
      - The role's C(spec) (C(allow), C(deny), C(options)), as in a C(role.yaml).
      - Mutually exclusive with O(resource). One of them is required when O(state=present).
    type: dict
  resource:
    description:
      - The full role resource (C(kind), C(version), C(metadata), C(spec)) as in a C(role.yaml).
      - C(metadata.name) may be left out; if set it must equal O(name).
    type: dict
  role_version:
    description:
      - Role resource version used with O(spec), or when O(resource) has no C(version).
      - V(v6) is understood by Teleport 12 and later; it is what the Machine ID Kubernetes guide uses.
    type: str
    default: v6
  labels:
    description:
      - Labels for C(metadata.labels).
    type: dict
  description:
    description:
      - Text for C(metadata.description).
    type: str
notes:
  - Role names that start with C(bot-) belong to Machine ID bots; manage those with M(lanyard.machine_id.teleport_bot).
seealso:
  - module: lanyard.machine_id.teleport_bot
"""

EXAMPLES = r"""
- name: Create the role of the Machine ID Kubernetes guide
  lanyard.machine_id.teleport_role:
    name: machine-id-kube-role
    config_file: /etc/teleport.yaml
    spec:
      allow:
        kubernetes_labels:
          "*": "*"
        kubernetes_resources:
          - kind: pod
            namespace: "*"
            name: "*"
        kubernetes_groups:
          - example
        kubernetes_users:
          - alice

- name: Same role, from a role.yaml file, through a remote identity
  lanyard.machine_id.teleport_role:
    name: machine-id-kube-role
    resource: "{{ lookup('ansible.builtin.file', 'role.yaml') | from_yaml }}"
    auth_server: teleport.example.com:443
    identity_file: /home/admin/admin-identity.pem

- name: Delete a role
  lanyard.machine_id.teleport_role:
    name: old-role
    state: absent
"""

RETURN = r"""
role:
  description:
    - The role as the server stores it after the task (without server-owned metadata such as C(revision)).
    - In check mode, the predicted role. V(null) when O(state=absent).
  returned: always
  type: dict
  sample:
    kind: role
    version: v6
    metadata:
      name: machine-id-kube-role
    spec:
      allow:
        kubernetes_groups: [example]
msg:
  description: What was done, in one line; for an update, the paths that change.
  returned: always
  type: str
  sample: role machine-id-kube-role updated (spec.allow.kubernetes_users (removed), spec.deny (removed))
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lanyard.machine_id.plugins.module_utils._runner import run_module
from ansible_collections.lanyard.machine_id.plugins.module_utils._tctl import connection_argspec, tctl_from_module
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_role import ROLE_ARGSPEC, ensure_role


def main():
    spec = connection_argspec()
    spec.update(ROLE_ARGSPEC)
    module = AnsibleModule(
        argument_spec=spec,
        mutually_exclusive=[("spec", "resource")],
        required_if=[("state", "present", ("spec", "resource"), True)],
        supports_check_mode=True,
    )
    run_module(module, lambda m: ensure_role(tctl_from_module(m), m.params, m.check_mode))


if __name__ == "__main__":
    main()
