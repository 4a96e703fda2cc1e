#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: kube_rolebinding
short_description: Manage a Kubernetes RoleBinding or ClusterRoleBinding by server-side apply
version_added: 0.1.0
description:
  - Creates, updates or deletes a Kubernetes C(RoleBinding) (namespaced) or C(ClusterRoleBinding) that grants a
    C(Role) or C(ClusterRole) to users, groups and service accounts, such as the binding that the Teleport Machine
    ID guide creates with C(kubectl create rolebinding --group=example).
  - Talks to the API server directly with the Python C(requests) library; neither C(kubectl) nor the
    C(kubernetes) Python client is needed.
  - Writes are server-side apply with the field manager C(lanyard.machine_id). Check mode sends the same request
    with C(dryRun=All), so the predicted object, C(changed) and the diff come from the API server itself.
  - The role a binding refers to (C(roleRef)) cannot change in Kubernetes. Changing O(role) or O(cluster_role) of an
    existing binding fails unless O(force=true), which deletes the binding and creates it again.
author:
  - lanyard.machine_id contributors (@lanyard)
extends_documentation_fragment:
  - lanyard.machine_id.kube_auth
attributes:
  check_mode:
    support: full
    description:
      - Check mode runs a server-side dry run (C(dryRun=All)) and reports exactly what a real run changes.
      - When O(force=true) would recreate the binding, the delete is dry-run on the server and the predicted object
        is the requested one (a dry-run create cannot run while the old binding exists).
  diff_mode:
    support: full
    description: Shows the managed fields before and after.
options:
  name:
    description:
      - Name of the binding.
    type: str
    required: true
  namespace:
    description:
      - Namespace of a O(kind=RoleBinding). Required for O(kind=RoleBinding), not allowed for
        O(kind=ClusterRoleBinding).
      - The namespace must exist; this module does not create it.
    type: str
  kind:
    description:
      - V(RoleBinding) grants a role in one namespace; V(ClusterRoleBinding) grants a C(ClusterRole) in every
        namespace and on cluster-wide resources.
    type: str
    choices: [RoleBinding, ClusterRoleBinding]
    default: RoleBinding
  role:
    description:
      - Name of the C(Role) to grant, in the binding's namespace. Only for O(kind=RoleBinding).
      - One of O(role) and O(cluster_role) is required when O(state=present).
    type: str
  cluster_role:
    description:
      - Name of the C(ClusterRole) to grant, for example V(view) or V(edit).
    type: str
  users:
    description:
      - User names to grant the role to, as the API server sees them (for a Teleport bot, the Kubernetes user of
        its Teleport role).
    type: list
    elements: str
  groups:
    description:
      - Group names to grant the role to (for a Teleport bot, its Teleport role's C(kubernetes_groups)).
    type: list
    elements: str
  service_accounts:
    description:
      - Service accounts to grant the role to, as V(namespace:name), or V(name) for one in the binding's namespace.
    type: list
    elements: str
  labels:
    description:
      - Labels to set on the binding. Labels set by other tools are kept; labels this module set before and no
        longer lists are removed.
    type: dict
  state:
    description:
      - V(present) creates or updates the binding, V(absent) deletes it.
      - With V(present) the subjects are the whole list (O(users), then O(groups), then O(service_accounts)).
    type: str
    choices: [present, absent]
    default: present
  force:
    description:
      - When the existing binding refers to another role, delete it and create it again with the new one.
      - The subjects lose the access of the binding between the delete and the create.
    type: bool
    default: false
  force_conflicts:
    description:
      - Take over fields that another field manager (for example C(kubectl create)) owns with a different value.
      - When V(false), such a change fails with the names of the fields and their owners.
    type: bool
    default: false
seealso:
  - module: lanyard.machine_id.kube_role
  - name: Kubernetes RBAC
    description: RoleBinding and ClusterRoleBinding reference.
    link: https://kubernetes.io/docs/reference/access-authn-authz/rbac/
"""

EXAMPLES = r"""
- name: Grant example-role to the group of the Machine ID bot
  lanyard.machine_id.kube_rolebinding:
    kubeconfig: /etc/lanyard/admin.kubeconfig
    name: example-rolebinding-group
    namespace: demo
    role: example-role
    groups: [example]
  delegate_to: localhost

- name: Grant example-role to the user alice
  lanyard.machine_id.kube_rolebinding:
    name: example-rolebinding-user
    namespace: demo
    role: example-role
    users: [alice]

- name: Grant the built-in ClusterRole view in namespace demo
  lanyard.machine_id.kube_rolebinding:
    name: example-rolebinding-view
    namespace: demo
    cluster_role: view
    users: [alice]

- name: Cluster-wide read access
  lanyard.machine_id.kube_rolebinding:
    kind: ClusterRoleBinding
    name: example-view-everywhere
    cluster_role: view
    groups: [example]

- name: Switch an existing binding to another role (deletes and recreates it)
  lanyard.machine_id.kube_rolebinding:
    name: example-rolebinding-user
    namespace: demo
    cluster_role: edit
    users: [alice]
    force: true
"""

RETURN = r"""
operation:
  description: What was done (or would be done in check mode).
  returned: always
  type: str
  choices: [create, update, recreate, delete, none]
  sample: create
object:
  description: The object, as C(Kind namespace/name).
  returned: always
  type: str
  sample: RoleBinding demo/example-rolebinding-group
result:
  description:
    - The object as the API server returned it (in check mode, as the dry run predicts it), without
      C(metadata.managedFields). Empty after a delete or when the object is absent.
  returned: always
  type: dict
  sample:
    apiVersion: rbac.authorization.k8s.io/v1
    kind: RoleBinding
    metadata: {name: example-rolebinding-group, namespace: demo}
    roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: example-role}
    subjects:
      - {apiGroup: rbac.authorization.k8s.io, kind: Group, name: example}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_config as kcfg
from ansible_collections.lanyard.machine_id.plugins.module_utils._kube_service import binding_action
from ansible_collections.lanyard.machine_id.plugins.module_utils._runner import run_module


def argument_spec():
    spec = kcfg.auth_argument_spec()
    spec.update(
        name=dict(type="str", required=True),
        namespace=dict(type="str"),
        kind=dict(type="str", choices=["RoleBinding", "ClusterRoleBinding"], default="RoleBinding"),
        role=dict(type="str"),
        cluster_role=dict(type="str"),
        users=dict(type="list", elements="str"),
        groups=dict(type="list", elements="str"),
        service_accounts=dict(type="list", elements="str"),
        labels=dict(type="dict"),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        force=dict(type="bool", default=False),
        force_conflicts=dict(type="bool", default=False),
    )
    return spec


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        mutually_exclusive=kcfg.AUTH_MUTUALLY_EXCLUSIVE + [("role", "cluster_role")],
        required_if=[("state", "present", ("role", "cluster_role"), True), ("kind", "RoleBinding", ("namespace",))],
        supports_check_mode=True,
    )
    run_module(module, binding_action)


if __name__ == "__main__":
    main()
