# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test-only Ansible connection to a test host of tests/hosts (nsenter into an nspawn container).

Why not ssh: the hosts run in a private network namespace that only sees the ports the harness
forwards (the Teleport proxy). Entering the container's namespaces with nsenter needs no sshd,
keys or extra ports, is faster than an ssh round trip, and keeps that namespace private.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: lanyard_nspawn
short_description: Run tasks inside a lanyard test host (systemd-nspawn) with nsenter
description:
  - Test-only. Enters the mount, UTS, IPC, network, PID and cgroup namespaces of the container's
    PID 1, which the harness in C(tests/hosts) records in C(<runs_dir>/<host>/state.json).
author: lanyard.machine_id contributors
options:
  remote_addr:
    description: Name of the test host (as given to C(python -m hosts start NAME)).
    default: inventory_hostname
    type: str
    vars:
      - name: inventory_hostname
      - name: ansible_host
  runs_dir:
    description:
      - Directory holding the harness' run state.
      - Default C($LANYARD_CACHE/hosts/runs), or C(~/.cache/lanyard/hosts/runs) when C(LANYARD_CACHE) is not set
        (where the harness keeps it).
    type: str
    env:
      - name: LANYARD_HOSTS_RUNS
    vars:
      - name: lanyard_hosts_runs_dir
"""

import json
import os
import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes
from ansible.plugins.connection import ConnectionBase

GUEST_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
             "LANG=C.UTF-8", "USER=root", "LOGNAME=root"]


def _default_runs_dir():
    """Where tests/hosts keeps its run state (hosts.runs_dir()): under $LANYARD_CACHE when it is set."""
    return os.path.join(os.environ.get("LANYARD_CACHE") or os.path.expanduser("~/.cache/lanyard"), "hosts", "runs")


class Connection(ConnectionBase):
    transport = "lanyard_nspawn"
    has_pipelining = True
    has_tty = False
    default_user = "root"

    def __init__(self, *args, **kwargs):
        super(Connection, self).__init__(*args, **kwargs)
        self._leader = None

    def _connect(self):
        if self._connected:
            return self
        name = self.get_option("remote_addr")
        state = os.path.join(os.path.expanduser(self.get_option("runs_dir") or _default_runs_dir()), name, "state.json")
        try:
            with open(state) as fh:
                leader = int(json.load(fh)["leader_pid"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AnsibleConnectionFailure(
                "test host %s: no run state at %s (%s); start it with `python -m hosts start %s`"
                % (name, state, exc, name))
        if not os.path.exists("/proc/%d" % leader):
            raise AnsibleConnectionFailure("test host %s: container PID 1 (%d) is gone; start it again" % (name, leader))
        self._leader = leader
        self._connected = True
        return self

    def _argv(self, shell_cmd):
        return ["nsenter", "--target=%d" % self._leader, "--mount", "--uts", "--ipc", "--net", "--pid",
                "--cgroup", "--root", "--wd", "--", "/usr/bin/env", "-i"] + GUEST_ENV + ["/bin/sh", "-c", shell_cmd]

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super(Connection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        proc = subprocess.Popen(self._argv(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        out, err = proc.communicate(to_bytes(in_data) if in_data is not None else b"")
        return proc.returncode, out, err

    def put_file(self, in_path, out_path):
        super(Connection, self).put_file(in_path, out_path)
        self._connect()
        with open(to_bytes(in_path), "rb") as fh:
            proc = subprocess.Popen(self._argv("cat > %s" % shlex.quote(out_path)), stdin=fh,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = proc.communicate()
        if proc.returncode != 0:
            raise AnsibleError("failed to copy %s to %s in the test host: %s" % (in_path, out_path, err.strip()))

    def fetch_file(self, in_path, out_path):
        super(Connection, self).fetch_file(in_path, out_path)
        self._connect()
        with open(to_bytes(out_path), "wb") as fh:
            proc = subprocess.Popen(self._argv("cat %s" % shlex.quote(in_path)), stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.PIPE)
            _out, err = proc.communicate()
        if proc.returncode != 0:
            raise AnsibleError("failed to fetch %s from the test host: %s" % (in_path, err.strip()))

    def close(self):
        self._connected = False
