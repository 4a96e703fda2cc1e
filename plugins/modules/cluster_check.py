#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: cluster_check
short_description: Ask the Kubernetes cluster, as the reader user, what each destination's kubeconfig may do
version_added: 0.1.0
description:
  - Runs C(kubectl auth can-i) O(verb) O(resource) C(-n) O(namespace) (C(list pods) by default) as O(reader_user)
    through each destination's
    C(kubeconfig.yaml), the question the C(lanyard.machine_id.machine_id) role's verify phase asks. With the exec
    plugin kubeconfig this also runs the agent's program as the reader, so a C(yes) proves the reader reads valid
    credentials there and the cluster takes them.
  - For a destination with C(every_context) (a kubeconfig of several clusters, C(kubernetes/v2)), the contexts are
    listed as the reader and each one is asked.
  - Read-only. Never fails on an answer; the role judges RV(checks). C(lanyard.machine_id.agent_state) asks the
    same questions, with the same code, on the role's no-change path.
requirements:
  - kubectl and util-linux's C(runuser) on the host; run as root (the role's C(become)) when O(reader_user) is set.
author:
  - Lanyard contributors (@lanyard)
attributes:
  check_mode:
    support: full
    description: Read-only; runs the same in check mode.
  diff_mode:
    support: none
    description: Read-only.
options:
  kubectl:
    description: Absolute path of C(kubectl) on the host.
    type: path
    required: true
  reader_user:
    description: User to ask as (C(runuser -u)); empty to ask as the user running the module.
    type: str
    default: ""
  namespace:
    description: Namespace of the question.
    type: str
    required: true
  verb:
    description: The verb asked about (C(list), C(get), C(watch), C(create), ...); one word.
    type: str
    default: list
  resource:
    description:
      - The resource asked about, as C(kubectl auth can-i) takes it - C(pods), C(deployments.apps),
        C(configmaps/NAME); one word. Pick one the reader's Kubernetes role grants.
    type: str
    default: pods
  destinations:
    description: Destination directories, each with C(directory) and C(every_context) (ask each of its contexts).
    type: list
    elements: dict
    required: true
    suboptions:
      directory:
        description: The destination directory (its C(kubeconfig.yaml) is used).
        type: path
        required: true
      every_context:
        description: List the kubeconfig's contexts and ask each one, instead of only the current one.
        type: bool
        default: false
notes:
  - No credential is printed; kubectl's own error text is returned in RV(checks).
seealso:
  - module: lanyard.machine_id.agent_state
"""

EXAMPLES = r"""
- name: Ask the cluster, as the reader, whether it may list pods in namespace demo
  lanyard.machine_id.cluster_check:
    kubectl: /usr/local/bin/kubectl
    reader_user: app
    namespace: demo
    destinations:
      - directory: /opt/machine-id
      - directory: /opt/machine-id-fleet
        every_context: true
  register: checks

- name: An app that only reads one ConfigMap - ask what it needs
  lanyard.machine_id.cluster_check:
    kubectl: /usr/local/bin/kubectl
    reader_user: app
    namespace: demo
    verb: get
    resource: configmaps/app-settings
    destinations:
      - directory: /opt/machine-id
"""

RETURN = r"""
checks:
  description:
    - One entry per question - C(directory), C(context) (null for the current one), C(rc), C(stdout) (C(yes) when
      allowed) and C(stderr). A kubeconfig with no context gives one entry with C(no_context=true); one whose
      contexts could not be listed gives one with C(list_failed=true).
  returned: always
  type: list
  elements: dict
  sample: [{"directory": "/opt/machine-id", "context": null, "rc": 0, "stdout": "yes", "stderr": ""}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lanyard.machine_id.plugins.module_utils import _host_state as host
from ansible_collections.lanyard.machine_id.plugins.module_utils._runner import run_module

ARGSPEC = dict(
    kubectl=dict(type="path", required=True),
    reader_user=dict(type="str", default=""),
    namespace=dict(type="str", required=True),
    verb=dict(type="str", default="list"),
    resource=dict(type="str", default="pods"),
    destinations=dict(type="list", elements="dict", required=True,
                      options=dict(directory=dict(type="path", required=True),
                                   every_context=dict(type="bool", default=False))),
)


def cluster_check(module):
    p = module.params
    return {"checks": [c for d in p["destinations"]
                       for c in host.cluster_check(module, p["reader_user"], p["kubectl"], d["directory"],
                                                   p["namespace"], every_context=d["every_context"],
                                                   verb=p["verb"], resource=p["resource"])]}


def main():
    module = AnsibleModule(argument_spec=ARGSPEC, supports_check_mode=True)
    run_module(module, cluster_check)


if __name__ == "__main__":
    main()
