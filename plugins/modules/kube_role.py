#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: kube_role
short_description: Manage a Kubernetes Role or ClusterRole by server-side apply
version_added: 0.1.0
description:
  - Creates, updates or deletes a Kubernetes C(Role) (namespaced) or C(ClusterRole), such as the role that the
    Teleport Machine ID guide creates with C(kubectl create role).
  - Talks to the API server directly with the Python C(requests) library; neither C(kubectl) nor the
    C(kubernetes) Python client is needed.
  - Writes are server-side apply with the field manager C(lanyard.machine_id). Check mode sends the same request
    with C(dryRun=All), so the predicted object, C(changed) and the diff come from the API server itself.
  - Only fields this module sets are compared and shown (labels, annotations, rules); server bookkeeping such as
    C(managedFields) or C(resourceVersion) never makes a task changed.
author:
  - lanyard.machine_id contributors (@lanyard)
extends_documentation_fragment:
  - lanyard.machine_id.kube_auth
attributes:
  check_mode:
    support: full
    description: Check mode runs a server-side dry run (C(dryRun=All)) and reports exactly what a real run changes.
  diff_mode:
    support: full
    description: Shows the managed fields before and after.
options:
  name:
    description:
      - Name of the role.
    type: str
    required: true
  namespace:
    description:
      - Namespace of a O(kind=Role). Required for O(kind=Role), not allowed for O(kind=ClusterRole).
      - The namespace must exist; this module does not create it.
    type: str
  kind:
    description:
      - V(Role) is namespaced; V(ClusterRole) is cluster-wide and can be bound in any namespace.
    type: str
    choices: [Role, ClusterRole]
    default: Role
  rules:
    description:
      - The permissions the role grants. Required when O(state=present); V([]) grants nothing.
      - The rules are applied as a whole list; rules this module set before and no longer lists are removed.
    type: list
    elements: dict
    suboptions:
      verbs:
        description:
          - Verbs such as V(get), V(list), V(watch), V(create), V(update), V(patch), V(delete), or V(*).
        type: list
        elements: str
        required: true
      resources:
        description:
          - Resource names (plural, lowercase) such as V(pods) or V(deployments); V(pods/log) for a subresource.
          - When O(rules[].api_groups) is not set, each resource's API group is found the way C(kubectl create role)
            finds it. V(deployments.apps) names the group, a bare name is looked up in the cluster's API discovery,
            and the rule is split into one rule per API group.
        type: list
        elements: str
      api_groups:
        description:
          - API groups of O(rules[].resources); V("") is the core group (pods, services, ...).
          - When not set, the groups are found from the resource names (see O(rules[].resources)).
        type: list
        elements: str
      resource_names:
        description:
          - Restrict the rule to objects with these names.
        type: list
        elements: str
      non_resource_urls:
        description:
          - Non-resource URLs such as V(/healthz). Only for O(kind=ClusterRole), in a rule without resources.
        type: list
        elements: str
  labels:
    description:
      - Labels to set on the role. Labels set by other tools are kept; labels this module set before and no
        longer lists are removed.
    type: dict
  state:
    description:
      - V(present) creates or updates the role, V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  force_conflicts:
    description:
      - Take over fields that another field manager (for example C(kubectl create)) owns with a different value.
      - When V(false), such a change fails with the names of the fields and their owners.
    type: bool
    default: false
seealso:
  - module: lanyard.machine_id.kube_rolebinding
  - name: Kubernetes RBAC
    description: Role and ClusterRole reference.
    link: https://kubernetes.io/docs/reference/access-authn-authz/rbac/
"""

EXAMPLES = r"""
- name: Role for the Machine ID bot (get and list on pods and deployments in namespace demo)
  lanyard.machine_id.kube_role:
    kubeconfig: /etc/lanyard/admin.kubeconfig
    name: example-role
    namespace: demo
    rules:
      - verbs: [get, list]
        resources: [pods, deployments]   # groups looked up: "" for pods, apps for deployments
  delegate_to: localhost

- name: The same with explicit API groups, and a label
  lanyard.machine_id.kube_role:
    name: example-role
    namespace: demo
    labels:
      app.kubernetes.io/managed-by: ansible
    rules:
      - api_groups: [""]
        resources: [pods]
        verbs: [get, list]
      - api_groups: [apps]
        resources: [deployments]
        verbs: [get, list]

- name: A ClusterRole that can read pod logs everywhere
  lanyard.machine_id.kube_role:
    kind: ClusterRole
    name: pod-log-reader
    rules:
      - resources: [pods, pods/log]
        verbs: [get, list, watch]

- name: Remove a role
  lanyard.machine_id.kube_role:
    name: example-role
    namespace: demo
    state: absent
"""

RETURN = r"""
operation:
  description: What was done (or would be done in check mode).
  returned: always
  type: str
  choices: [create, update, delete, none]
  sample: create
object:
  description: The object, as C(Kind namespace/name).
  returned: always
  type: str
  sample: Role demo/example-role
result:
  description:
    - The object as the API server returned it (in check mode, as the dry run predicts it), without
      C(metadata.managedFields). Empty after a delete or when the object is absent.
  returned: always
  type: dict
  sample:
    apiVersion: rbac.authorization.k8s.io/v1
    kind: Role
    metadata: {name: example-role, namespace: demo, uid: 0b6e6e3c-7c0c-4d0e-9d2b-2a1d1c0c1a11}
    rules:
      - {apiGroups: [""], resources: [pods], verbs: [get, list]}
      - {apiGroups: [apps], resources: [deployments], verbs: [get, list]}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lanyard.machine_id.plugins.module_utils import _kube_config as kcfg
from ansible_collections.lanyard.machine_id.plugins.module_utils._kube_service import role_action
from ansible_collections.lanyard.machine_id.plugins.module_utils._runner import run_module


def argument_spec():
    spec = kcfg.auth_argument_spec()
    spec.update(
        name=dict(type="str", required=True),
        namespace=dict(type="str"),
        kind=dict(type="str", choices=["Role", "ClusterRole"], default="Role"),
        rules=dict(type="list", elements="dict", options=dict(
            verbs=dict(type="list", elements="str", required=True),
            resources=dict(type="list", elements="str"),
            api_groups=dict(type="list", elements="str"),
            resource_names=dict(type="list", elements="str"),
            non_resource_urls=dict(type="list", elements="str"),
        )),
        labels=dict(type="dict"),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        force_conflicts=dict(type="bool", default=False),
    )
    return spec


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        mutually_exclusive=kcfg.AUTH_MUTUALLY_EXCLUSIVE,
        required_if=[("state", "present", ("rules",)), ("kind", "Role", ("namespace",))],
        supports_check_mode=True,
    )
    run_module(module, role_action)


if __name__ == "__main__":
    main()
