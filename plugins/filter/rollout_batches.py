# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that carry the rollout's batch sizes from the inventory to a play's ``serial``.

Ansible templates a play's ``serial`` keyword before any host is chosen, with play variables and extra
variables only: a ``machine_id_rollout_serial`` set in the inventory is not visible there. The rollout's
first play (which runs on every host, so it sees inventory variables) turns the value into plain batch
sizes with ``rollout_serial_group`` and records them as the name of an in-memory group (``add_host``);
the rollout play reads them back with ``rollout_serial`` from ``groups``, which *is* visible to ``serial``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError

PREFIX = "machine_id_serial_"


def _one(value, hosts):
    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = int(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError(text)
            return max(1, int(pct / 100.0 * hosts))
        size = int(text)
    except ValueError:
        raise AnsibleFilterError(
            "machine_id_rollout_serial: %r is not a batch size; use a number of hosts (3), a percentage ('25%%') "
            "or a list of them ([1, 5, '25%%'])" % (value,))
    if size < 1:
        raise AnsibleFilterError("machine_id_rollout_serial: %r must be at least 1 host" % (value,))
    return size


def batch_sizes(spec, hosts):
    """Plain batch sizes for ``hosts`` hosts, with Ansible's serial rules (the last size repeats)."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise AnsibleFilterError("machine_id_rollout_serial: an empty list; give at least one batch size")
    hosts = max(int(hosts), 1)
    return [_one(v, hosts) for v in items]


def rollout_serial_group(spec, hosts):
    return PREFIX + "_".join(str(n) for n in batch_sizes(spec, hosts))


def rollout_serial(groups, fallback=1):
    names = sorted(g for g in (groups or {}) if str(g).startswith(PREFIX))
    if not names:
        return fallback
    if len(names) > 1:
        raise AnsibleFilterError("more than one rollout batch marker group (%s); run the rollout playbook once per "
                                 "ansible-playbook call" % ", ".join(names))
    return [int(n) for n in names[0][len(PREFIX):].split("_")]


class FilterModule(object):
    def filters(self):
        return {"rollout_serial_group": rollout_serial_group, "rollout_serial": rollout_serial}
