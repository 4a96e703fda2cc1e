# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filters that carry machine_id_rollout_serial from the inventory to the rollout play's serial, and a
real ansible-playbook run (local connection, no real hosts) showing the batches Ansible then runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

from helpers.playbook import run_playbook

REPO = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("rollout_batches", REPO / "plugins" / "filter" / "rollout_batches.py")
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)


@pytest.mark.parametrize("spec,hosts,sizes", [
    (1, 10, [1]),
    ("3", 10, [3]),
    ("50%", 10, [5]),
    ("10%", 3, [1]),             # a percentage never rounds to 0 hosts
    ([1, 5, "25%"], 24, [1, 5, 6]),
    ([1, 5, "25%"], 0, [1, 5, 1]),
    ("100%", 7, [7]),
])
def test_batch_sizes_follow_ansible_serial_rules(spec, hosts, sizes):
    assert rb.batch_sizes(spec, hosts) == sizes
    assert rb.rollout_serial({rb.rollout_serial_group(spec, hosts): []}) == sizes


@pytest.mark.parametrize("bad", ["abc", 0, "-2", "0%", "150%", [], [1, "x"]])
def test_bad_batch_size_names_the_variable_and_the_fix(bad):
    with pytest.raises(AnsibleFilterError, match="machine_id_rollout_serial"):
        rb.batch_sizes(bad, 10)


def test_no_marker_group_falls_back_and_two_are_refused():
    assert rb.rollout_serial({"all": [], "ungrouped": []}, [1, 2]) == [1, 2]
    with pytest.raises(AnsibleFilterError, match="more than one"):
        rb.rollout_serial({"machine_id_serial_1": [], "machine_id_serial_2": []})


PLAY = """
- hosts: machine_id
  gather_facts: false
  tasks:
    - ansible.builtin.group_by:
        key: "machine_id_{{ machine_id_state | default('present') }}"
    - ansible.builtin.add_host:
        name: "{{ ansible_play_hosts_all[0] }}"
        groups: "{{ machine_id_rollout_serial | default([1, 5, '25%'], true)
                    | lanyard.machine_id.rollout_serial_group(groups['machine_id_present'] | length) }}"
      run_once: true
- name: batches
  hosts: "machine_id:&machine_id_present"
  gather_facts: false
  serial: "{{ groups | lanyard.machine_id.rollout_serial(machine_id_rollout_serial | default([1, 5, '25%'], true)) }}"
  tasks:
    - ansible.builtin.command: "true"
      changed_when: false
"""


@pytest.mark.parametrize("inventory_value,extra,expected", [
    ("2", None, [["h1", "h2"], ["h3", "h4"], ["h5", "h6"]]),          # set in the inventory: honoured
    (None, None, [["h1"], ["h2", "h3", "h4", "h5", "h6"]]),            # the default ramp
    ("2", [3, "100%"], [["h1", "h2", "h3"], ["h4", "h5", "h6"]]),     # -e wins over the inventory
])
def test_inventory_serial_reaches_the_play(tmp_path, inventory_value, extra, expected):
    hosts = "\n".join(f"    h{i}: {{}}" for i in range(1, 7))
    inv = tmp_path / "inv.yml"
    group_vars = f"    ansible_connection: local\n    ansible_python_interpreter: {sys.executable}\n"
    if inventory_value is not None:
        group_vars += f"    machine_id_rollout_serial: {inventory_value}\n"
    inv.write_text(f"machine_id:\n  hosts:\n{hosts}\n  vars:\n{group_vars}")
    run = run_playbook(tmp_path, PLAY, inventory=inv,
                       extra_vars={"machine_id_rollout_serial": extra} if extra is not None else None)
    assert run.rc == 0, run.stdout[-2000:]
    assert run.batches("batches") == expected
