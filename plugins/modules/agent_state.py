#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: agent_state
short_description: Read a host's Machine ID agent install in one call and name what differs from the wanted state
version_added: 0.1.0
description:
  - Reads on the host, in one module run, what the C(lanyard.machine_id.machine_id) role would otherwise find out
    with a task each - the agent's Python, the systemd version, the agent's
    own C(status --json), the files and directories the role writes (owner, group, mode, SHA-256 of content), the
    users and groups, the unit's state, the destinations' owner and ACLs (what C(machine-id-agent init) would change,
    from the same C(status --check-acls) run as the bot user; C(init --check) for an older agent), and
    whether the reader user, running the agent's program (C(machine-id-agent wait)), reads valid credentials in
    each destination; and the host facts the role checks (service manager, distribution, Python).
  - With O(cluster_check_namespace), on a host where nothing differs, also asks the cluster as the reader the
    role's verify question (C(kubectl auth can-i list pods) by default).
  - Compares them with what the role would write and returns every difference in RV(drift). The role runs its
    install, configure and service phases only when something differs, so a converged host costs one round trip.
  - Read-only. The join token file is only looked at with C(stat), never read.
requirements:
  - Runs on the host, as root (the role's C(become)), with systemd's C(systemctl) and util-linux's C(runuser).
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
  agent_bin:
    description: Path of the installed C(machine-id-agent) console script.
    type: path
    required: true
  agent_python:
    description: The Python the agent's virtualenv is made from; its version, machine and libc go to RV(agent_python).
    type: path
    required: true
  config_path:
    description: The agent's config file (the guide's C(/etc/tbot.yaml)).
    type: path
    required: true
  bot_user:
    description: User the agent runs as; C(status) runs as this user.
    type: str
    required: true
  bot_group:
    description: Group of the bot user.
    type: str
    required: true
  reader_user:
    description: User that reads the outputs; empty for none.
    type: str
    default: ""
  destinations:
    description:
      - Destination directories; what C(init) would change in each comes from the agent's C(status --check-acls)
        (C(init --check) for an agent without that flag), and the reader's access from C(wait) as O(reader_user)
        (or from O(cluster_check_namespace)'s answer).
    type: list
    elements: path
    default: []
  acls:
    description: The role's C(machine_id_acls) (C(try), C(required) or C(off)), passed to C(init --check) (an agent
      without C(status --check-acls)).
    type: str
    default: try
  service_name:
    description: Name of the agent's systemd unit, without C(.service).
    type: str
    required: true
  service_enabled:
    description: Whether the unit should be enabled; null to not compare.
    type: bool
  service_active:
    description: Whether the unit should be active; null to not compare.
    type: bool
  files:
    description:
      - Paths to compare, each with C(path) and any of C(type), C(owner), C(group), C(mode) (octal string) and
        C(sha256) (of the content the role would write); C(checksum=true) returns the SHA-256 in RV(paths) without
        comparing it.
    type: list
    elements: dict
    default: []
  users:
    description:
      - Users that must exist, each with C(name) and any of C(group) (primary group), C(home) and C(shell) to
        compare.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: User name.
        type: str
        required: true
      group:
        description: Primary group the user must have.
        type: str
      home:
        description: Home directory the user must have.
        type: path
      shell:
        description: Login shell the user must have.
        type: str
  groups:
    description: Groups that must exist.
    type: list
    elements: str
    default: []
  wheels_marker:
    description: File in which the role records the key of the wheel set it installed.
    type: path
  wheels_key:
    description: Key of the wheel set the controller built for this host; compared with O(wheels_marker).
    type: str
  agent_version:
    description: Version the installed agent should report.
    type: str
  units:
    description:
      - More systemd units to compare, each with C(name) (with its suffix, for example C(x.path)) and any of
        C(enabled) and C(active) (booleans).
    type: list
    elements: dict
    default: []
  exclusive:
    description:
      - C(globs) (path patterns) and C(paths) (a list) - every path matching one of C(globs) that is not in C(paths)
        is a difference (something the settings no longer list, left over on the host).
    type: dict
  storage_dir:
    description:
      - The agent's storage directory. When the agent holds no identity there (or is not installed yet), the
        identity a hand-run C(tbot) left in it (C(key), C(tlscert), C(tlscacerts), ...) is judged instead and
        reported in RV(status) as C(identity) with C(source=tbot) - C(state=ok) when the agent can adopt it
        without a join token, C(expired) or C(damaged) when it cannot.
      - Also the storage a unit of O(tbot_units) must name to be taken over.
    type: path
  tbot_units:
    description:
      - systemd units that may run a hand-built C(tbot) on O(storage_dir) (a unit name without a suffix gets
        C(.service)). A unit is reported in RV(tbot_units) when it runs a program named C(tbot), is active or
        enabled, and its command line or its C(-c) config file names O(storage_dir). A C(tbot) running under the
        agent's own unit name (O(service_name)) is always reported.
    type: list
    elements: str
    default: []
  kubectl:
    description: Name or path of C(kubectl); where it is found goes to RV(kubectl_path). Empty to not look.
    type: str
    default: kubectl
  cluster_check_namespace:
    description:
      - When set, and nothing else differs, the agent is installed, O(service_active) is true and O(kubectl) is
        found, ask the cluster as O(reader_user) through each destination's C(kubeconfig.yaml) whether it may
        O(cluster_check_verb) O(cluster_check_resource) in this namespace (C(kubectl auth can-i)); the answers go
        to RV(cluster_check). The role's verify phase uses them on the no-change path.
      - A C(yes) also proves that the reader reads valid credentials in that destination, so C(wait) is not run
        there; any other answer is followed by C(wait), which names a reader that cannot read in RV(drift).
    type: str
  cluster_check_verb:
    description: The verb of O(cluster_check_namespace)'s question (see M(lanyard.machine_id.cluster_check)).
    type: str
    default: list
  cluster_check_resource:
    description: The resource of O(cluster_check_namespace)'s question (see M(lanyard.machine_id.cluster_check)).
    type: str
    default: pods
  cluster_check_every_context:
    description:
      - Destinations (of O(destinations)) whose kubeconfig holds several clusters (a C(kubernetes/v2) output) - for
        these, O(cluster_check_namespace)'s question is asked through each context, listed as O(reader_user).
    type: list
    elements: path
    default: []
notes:
  - Differences are named by path, unit or user and never include a file's content.
seealso:
  - module: lanyard.machine_id.teleport_cluster_info
"""

EXAMPLES = r"""
- name: Read the agent's install and compare it with the wanted state
  lanyard.machine_id.agent_state:
    agent_bin: /opt/machine-id-agent/bin/machine-id-agent
    agent_python: /usr/bin/python3
    config_path: /etc/tbot.yaml
    bot_user: teleport
    bot_group: teleport
    reader_user: app
    destinations: [/opt/machine-id]
    service_name: machine-id
    service_enabled: true
    service_active: true
    files:
      - path: /etc/tbot.yaml
        owner: teleport
        group: teleport
        mode: "0600"
        sha256: "{{ lookup('ansible.builtin.template', 'tbot.yaml.j2') | hash('sha256') }}"
  register: agent

- name: Show what differs
  ansible.builtin.debug:
    var: agent.drift
"""

RETURN = r"""
drift:
  description: One line per difference from the wanted state (path, unit, user or install); empty when none.
  returned: always
  type: list
  elements: str
  sample: ["/etc/tbot.yaml: content differs", "machine-id.service: inactive, expected active"]
status:
  description: The agent's C(status --json) (no secrets); empty when the agent or its config is missing.
  returned: always
  type: dict
status_error:
  description: Why C(status) gave no answer, when it did not.
  returned: when the agent is installed and C(status) failed
  type: str
agent_found:
  description: Whether the agent's console script exists.
  returned: always
  type: bool
installed:
  description: Whether the agent's console script and its config both exist.
  returned: always
  type: bool
paths:
  description: What was found at each path of O(files) - C(exists), and C(type), C(owner), C(group), C(mode) and
    C(sha256) (when asked for) when it exists.
  returned: always
  type: dict
users:
  description: Each user of O(users) with its C(group), C(home) and C(shell), or null when the host has no such user.
  returned: always
  type: dict
  sample: {"teleport": {"group": "teleport", "home": "/var/lib/teleport", "shell": "/usr/sbin/nologin"}, "app": null}
wheels_installed:
  description: Content of O(wheels_marker) (the key of the installed wheel set), or null.
  returned: always
  type: str
kubectl_path:
  description: Absolute path of O(kubectl) on the host, or null when it is not there.
  returned: always
  type: str
agent_python:
  description: rc, stdout (a JSON object with C(python), C(machine), C(libc)) and stderr of the probe of O(agent_python).
  returned: always
  type: dict
systemd_version:
  description: The systemd version (an integer), or null without systemd.
  returned: always
  type: int
tbot_units:
  description:
    - The hand-built C(tbot) units renewing the identity in O(storage_dir), each with C(name), C(own) (it has the
      agent's unit name, which the role's unit replaces), C(active) and C(enabled); stop them before the agent
      starts on that storage.
  returned: always
  type: list
  elements: dict
  sample: [{"name": "machine-id.service", "own": true, "active": true, "enabled": true}]
host:
  description:
    - The host facts the role checks, read without a fact-gathering run - C(service_mgr) (C(systemd) when systemd
      is PID 1, else PID 1's name), C(distribution) (C(Debian), C(Ubuntu), else the os-release C(NAME)),
      C(distribution_version), C(distribution_major_version) (from os-release C(VERSION_ID)) and C(python) (the
      version of the Python running this module).
  returned: always
  type: dict
  sample: {"service_mgr": "systemd", "distribution": "Debian", "distribution_version": "12",
           "distribution_major_version": "12", "python": "3.11"}
wheel_target:
  description: C(python:machine:glibc) of O(agent_python) (what the role builds the agent's wheels for), or null
    when it did not answer.
  returned: always
  type: str
  sample: "3.11:x86_64:2.36"
cluster_check:
  description: Per destination, C(directory), C(rc), C(stdout) (C(yes) when allowed) and C(stderr) of
    C(kubectl auth can-i) O(cluster_check_verb) O(cluster_check_resource) C(-n) O(cluster_check_namespace) as
    O(reader_user).
  returned: when O(cluster_check_namespace) is set and the conditions there hold
  type: list
  elements: dict
unit:
  description: C(LoadState), C(ActiveState), C(UnitFileState), C(NeedDaemonReload), C(ExecStart) and C(MainPID) of the
    agent's unit. When the unit is active, its main process's command line tells the install the agent was started
    from; one that is not the install O(agent_bin) points to is a difference (an upgrade whose restart never came).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lanyard.machine_id.plugins.module_utils._agent_state import ARGSPEC, agent_state
from ansible_collections.lanyard.machine_id.plugins.module_utils._runner import run_module


def main():
    module = AnsibleModule(argument_spec=ARGSPEC, supports_check_mode=True)
    run_module(module, agent_state)


if __name__ == "__main__":
    main()
