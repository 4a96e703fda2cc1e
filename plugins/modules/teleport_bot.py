#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: teleport_bot
short_description: Create, update or delete a Teleport Machine ID bot
version_added: 0.1.0
description:
  - Makes a Machine ID bot (the user C(bot-<name>) and its role C(bot-<name>)) exist with the declared O(roles),
    O(logins) and O(max_session_ttl), through C(tctl bots).
  - Creating a bot does not print or return its join token unless O(return_token=true). The token C(tctl bots add)
    makes is revoked otherwise; mint one join token per host with M(lanyard.machine_id.teleport_bot_token).
  - Changes to an existing bot use C(tctl bots update) where the installed C(tctl) has it (Teleport 15 and later).
  - Older versions (such as Teleport 13) have no C(bots update). There a change of O(roles) is written into the
    bot's own role C(bot-<name>) (its C(allow.impersonate.roles)); hosts that already joined get the new roles at
    their next renewal, without joining again. Any other change fails and says why, unless O(force=true) allows
    deleting and recreating the bot.
requirements:
  - C(tctl) of the Teleport cluster's major version (tested with Teleport v13.3.8) on the host that runs the task,
    usually the controller (C(delegate_to=localhost)), with credentials that may manage bots, users and roles.
  - Python 3.6 or newer on that host.
author:
  - Lanyard contributors (@lanyard)
extends_documentation_fragment:
  - lanyard.machine_id.teleport_connection
attributes:
  check_mode:
    support: full
    description: Reads the bot and reports what would change; writes nothing and mints nothing.
  diff_mode:
    support: full
    description: Shows name, roles, logins and max_session_ttl before and after, as YAML. Never a token.
options:
  name:
    description:
      - Name of the bot (without the C(bot-) prefix Teleport adds to its user and role).
    type: str
    required: true
  state:
    description:
      - V(present) creates or updates the bot; V(absent) deletes the bot, its user and its role, and revokes its
        pending join tokens (C(tctl bots rm) leaves them behind).
    type: str
    choices: [present, absent]
    default: present
  roles:
    description:
      - Teleport roles the bot may impersonate (for example the role that grants Kubernetes access).
      - Required when the bot does not exist yet. Every role must already exist. For a new bot C(tctl bots add)
        checks that itself (a missing role fails with the role's name and the fix); changes to an existing bot and
        check mode read the roles first.
      - Compared as a set.
    type: list
    elements: str
  logins:
    description:
      - SSH logins of the bot. Compared as a set. Left unchanged when not set.
    type: list
    elements: str
  max_session_ttl:
    description:
      - Longest lifetime of the certificates the bot can get for the roles it impersonates (a Go duration such as
        V(12h), at most V(168h)). Left unchanged when not set; Teleport's default for a new bot is 12h.
      - C(tctl) before Teleport 15 cannot set it (C(bots add) has no C(--max-session-ttl) in v13), so there only
        V(12h) is accepted.
    type: str
  force:
    description:
      - On a C(tctl) without C(bots update) (before Teleport 15), allow changing the O(logins) of an existing bot by
        deleting and recreating it. Identities already issued to the bot stop working, its pending join tokens are
        revoked, and every host must join again.
    type: bool
    default: false
  rejoin:
    description:
      - Make the bot ready for a new join, for a host that has no usable identity (missing, expired, locked, or one
        that lost a renewal). Teleport lets a bot join only once (its user then carries the label
        C(teleport.internal/bot-generation); a second join fails with "has already been issued a renewable
        certificate"), so a bot that already joined is deleted and recreated, its pending tokens revoked, and the
        new token returned with O(return_token=true). A bot that never joined, or does not exist, is handled as
        without this option (a token minted for it can be used).
      - Identities issued to the old bot stop working. Use it only for hosts that need to join again; the rollout
        playbook sets it for hosts whose agent reports no usable identity.
    type: bool
    default: false
  remove_locks:
    description:
      - With O(rejoin=true), also remove the locks that target the bot's user before recreating it. Teleport locks a
        bot when an older copy of its identity is presented for renewal (a second agent, a copied storage
        directory, a restored backup); a recreated bot of the same name would be locked too.
      - Without it, a locked bot fails the task with the lock's name and message, so that an operator looks for the
        copy first.
    type: bool
    default: false
  locked_users:
    description:
      - The users a lock in force targets, when the caller has already read them once for many bots (the
        C(cluster.locked_users) that M(lanyard.machine_id.teleport_cluster_info) returns with C(locked_users=true)).
        With O(rejoin=true), the locks are then read (C(tctl get locks)) only when the bot's user is in this list.
      - When not set, the locks are read whenever O(rejoin=true) is about to recreate a bot. A lock set after the
        caller's read is not seen; the rollout playbook reads them at its start.
    type: list
    elements: str
  return_token:
    description:
      - Return the join token C(tctl bots add) makes when it creates the bot, in RV(token).
      - When false, that token is revoked right away.
    type: bool
    default: false
  token_ttl:
    description:
      - Lifetime of the token made on creation (only useful with O(return_token=true)).
    type: str
    default: 1h
notes:
  - The result of a task that returns a token is hidden from Ansible's output (as with C(no_log)) by the
    action plugin of this module; use the registered variable to pass the token on.
  - With O(return_token=true) the task refuses C(async) (the async job file and C(async_status) would show the
    token in clear). Without it, C(async) works.
  - The task returns once a read shows its write (Teleport's auth server answers reads from a cache that lags
    writes), for at most 15 seconds, so the next task or run sees what this one did. A bot created with
    O(return_token=true) is not read back, because its token is the hand-over and the next step is a join with it.
    A new bot then costs two C(tctl) runs (one read and C(bots add)).
seealso:
  - module: lanyard.machine_id.teleport_role
  - module: lanyard.machine_id.teleport_bot_token
"""

EXAMPLES = r"""
- name: Bot of the Machine ID Kubernetes guide
  lanyard.machine_id.teleport_bot:
    name: example
    roles:
      - machine-id-kube-role
    config_file: /etc/teleport.yaml

- name: Change the roles of a bot on Teleport 13 (no in-place update there)
  lanyard.machine_id.teleport_bot:
    name: example
    roles: [machine-id-kube-role, other-role]
    force: true

- name: Bring back a host whose identity is gone (recreate the bot if it already joined; token for the host)
  lanyard.machine_id.teleport_bot:
    name: example-web1
    roles: [machine-id-kube-role]
    rejoin: true
    return_token: true
  register: bot
  no_log: true

- name: Remove the bot
  lanyard.machine_id.teleport_bot:
    name: example
    state: absent
"""

RETURN = r"""
bot:
  description: The bot after the task (predicted in check mode); V(null) when absent.
  returned: always
  type: dict
  contains:
    name:
      description: Bot name.
      type: str
    user_name:
      description: The bot's Teleport user.
      type: str
    role_name:
      description: The bot's own Teleport role.
      type: str
    roles:
      description: Roles the bot may impersonate, sorted.
      type: list
      elements: str
    logins:
      description: SSH logins, sorted.
      type: list
      elements: str
    max_session_ttl:
      description: Maximum session TTL as a compact duration.
      type: str
  sample:
    name: example
    user_name: bot-example
    role_name: bot-example
    roles: [machine-id-kube-role]
    logins: []
    max_session_ttl: 12h
token:
  description: Join token made when the bot was created. Secret.
  returned: when the bot was created and O(return_token=true)
  type: str
recreated:
  description: True when O(rejoin=true) recreated a bot that had already joined.
  returned: when O(rejoin=true) recreated the bot
  type: bool
removed_locks:
  description: Names of the locks on the bot's user that O(remove_locks=true) removed (or would remove).
  returned: when O(rejoin=true) recreated the bot
  type: list
  elements: str
revoked_tokens:
  description: Number of pending join tokens revoked with the bot.
  returned: when the bot was deleted
  type: int
token_ttl:
  description: Lifetime of RV(token) as C(tctl) reports it.
  returned: when RV(token) is returned
  type: str
msg:
  description: What was done, in one line.
  returned: always
  type: str
  sample: bot example created
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lanyard.machine_id.plugins.module_utils._runner import run_module
from ansible_collections.lanyard.machine_id.plugins.module_utils._tctl import connection_argspec, tctl_from_module
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_bot import BOT_ARGSPEC, ensure_bot
from ansible_collections.lanyard.machine_id.plugins.module_utils._teleport_token import revoke_all, revoke_value


def action(module):
    tctl = tctl_from_module(module)
    return ensure_bot(tctl, module.params, module.check_mode,
                      revoke_token=lambda value: revoke_value(tctl, value, module.params["name"]),
                      revoke_pending=lambda name: revoke_all(tctl, name))


def main():
    spec = connection_argspec()
    spec.update(BOT_ARGSPEC)
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    run_module(module, action)


if __name__ == "__main__":
    main()
