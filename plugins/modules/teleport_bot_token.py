#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: teleport_bot_token
short_description: Mint or revoke a one-time join token for a Teleport Machine ID bot
version_added: 0.1.0
description:
  - Mints a one-time join token bound to an existing bot, for one host - a provision token with role C(Bot),
    C(bot_name) and join method C(token) (not bound-keypair).
  - The token's value is generated here and handed to C(tctl create) on standard input, so it never appears in a
    command line, a file, C(msg), the diff or warnings. The task result is hidden from Ansible's output (as with
    C(no_log)) whenever it carries a token; use the registered variable.
  - With O(name) (for example the inventory host name) the module is idempotent - while an unused, unexpired token
    with that name exists for the bot, nothing is minted and that token is returned again. A token disappears when a
    host joins with it, so the next run mints a new one.
  - O(state=absent) revokes the pending tokens with that O(name) (or O(labels)).
requirements:
  - C(tctl) of the Teleport cluster's major version (tested with Teleport v13.3.8) on the host that runs the task,
    usually the controller (C(delegate_to=localhost)), with credentials that may manage bots and tokens.
  - Python 3.6 or newer on that host.
author:
  - Lanyard contributors (@lanyard)
extends_documentation_fragment:
  - lanyard.machine_id.teleport_connection
attributes:
  check_mode:
    support: full
    description: Reports C(would mint) (or C(would revoke)) without minting or revoking; returns no token.
  diff_mode:
    support: none
    description: Tokens are secrets; there is no diff.
options:
  bot:
    description:
      - Name of the bot the token is for. The bot must exist.
    type: str
    required: true
  state:
    description:
      - V(present) makes sure a pending token exists (mints one when needed); V(absent) revokes pending tokens.
    type: str
    choices: [present, absent]
    default: present
  name:
    description:
      - Logical name of the token, for example the host that will use it. Stored as the label
        C(lanyard.machine_id/name); it is not the secret.
      - Without it every run mints a new token.
    type: str
  labels:
    description:
      - Extra labels for the token. Pending tokens must carry all of them to count as existing.
    type: dict
  ttl:
    description:
      - How long the token stays valid if no host joins with it (a Go duration, at most V(168h)).
    type: str
    default: 1h
  force:
    description:
      - Mint a new token even if a pending one with the same O(name) exists; the old one is revoked.
    type: bool
    default: false
  proxy_addr:
    description:
      - Proxy address to return in RV(proxy_addr) for the host to join through.
      - When not set, the public address of the first proxy the cluster lists.
    type: str
notes:
  - With O(state=present) the task refuses C(async) (the async job file and C(async_status) would show the token in
    clear); revoking with O(state=absent) works with C(async).
  - The task returns once the token list shows its write (a minted token listed, revoked ones gone; Teleport's auth
    server answers reads from a cache that lags writes), for at most 15 seconds, so the next run does not mint or
    revoke again.
  - Error messages built from C(tctl) output are redacted - the token and anything shaped like a token or a
    private key is replaced by C(********).
seealso:
  - module: lanyard.machine_id.teleport_bot
  - module: lanyard.machine_id.teleport_cluster_info
"""

EXAMPLES = r"""
- name: One join token per host, minted on the controller
  lanyard.machine_id.teleport_bot_token:
    bot: example
    name: "{{ inventory_hostname }}"
    ttl: 30m
    config_file: /etc/teleport.yaml
  delegate_to: localhost
  register: join

- name: Hand the token to the host (kept out of the output)
  ansible.builtin.copy:
    content: "{{ join.token }}"
    dest: /etc/machine-id/join-token
    mode: "0600"
  no_log: true
  when: join.token is defined

- name: Revoke the pending token of a host that will not join
  lanyard.machine_id.teleport_bot_token:
    bot: example
    name: web1
    state: absent
  delegate_to: localhost
"""

RETURN = r"""
token:
  description:
    - The join token. Secret - the whole result is hidden from Ansible's output when it is present.
  returned: when O(state=present), not in check mode
  type: str
expires:
  description: When the token stops being valid (RFC 3339, UTC).
  returned: when O(state=present)
  type: str
  sample: "2026-11-24T23:30:00Z"
ca_pins:
  description: CA pins (C(sha256:...) of the cluster's host CA) for the agent's first connection to the auth server.
  returned: when O(state=present)
  type: list
  elements: str
  sample: ["sha256:8a5d8b4a6d1e0f1c4c1b3c2d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f"]
proxy_addr:
  description: Proxy address hosts should join through (O(proxy_addr), or the cluster's first proxy).
  returned: when O(state=present)
  type: str
  sample: teleport.example.com:443
cluster_name:
  description: Name of the Teleport cluster.
  returned: when O(state=present)
  type: str
join_method:
  description: Join method of the token.
  returned: when O(state=present)
  type: str
  sample: token
bot:
  description: The bot the token is for.
  returned: when O(state=present)
  type: str
revoked:
  description: Number of pending tokens revoked.
  returned: when O(state=absent), or when O(force=true) replaced a pending token
  type: int
msg:
  description: What was done, in one line (never the token).
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lanyard.machine_id.plugins.module_utils._runner import run_module
from ansible_collections.lanyard.machine_id.plugins.module_utils._tctl import connection_argspec, tctl_from_module
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_token import TOKEN_ARGSPEC, ensure_token


def main():
    spec = connection_argspec()
    spec.update(TOKEN_ARGSPEC)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    run_module(module, lambda m: ensure_token(tctl_from_module(m), m.params, m.check_mode))


if __name__ == "__main__":
    main()
