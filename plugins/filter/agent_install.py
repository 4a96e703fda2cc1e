# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters the role's install phase uses to judge the agent's install, with the same decision code as the
``agent_state`` module (``module_utils/_host_drift``): one concept, one place."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os

from ansible.errors import AnsibleFilterError
from ansible.module_utils.compat.version import LooseVersion

from ansible_collections.lanyard.machine_id.plugins.module_utils._host_drift import install_drift

PREFIX = "machine_id_agent-"


def agent_install_drift(state, wheels_key, agent_version):
    """What differs between the install ``agent_state`` read and the wheel set and version the role installs.
    The version is only compared when the agent is installed (a missing agent is already reported)."""
    state = state or {}
    return install_drift(state.get("wheels_installed"), wheels_key, state.get("status") or {},
                         agent_version if state.get("installed") else None)


def agent_wheel_version(names):
    """The version pip installs from a set of wheel file names: the highest ``machine_id_agent-<version>-*.whl``."""
    versions = []
    for name in names or []:
        base = str(name).rsplit("/", 1)[-1]
        if base.startswith(PREFIX) and base.endswith(".whl"):
            versions.append(base[len(PREFIX):].split("-", 1)[0])
    if not versions:
        raise AnsibleFilterError("machine_id_agent_wheels_dir: no machine_id_agent-<version>-*.whl in it; build the "
                                 "agent's wheel (pip wheel agent/) into that directory, or leave the variable empty "
                                 "to let the role build the wheels")
    return max(versions, key=LooseVersion)


def wheels_digest(paths):
    """Each wheel of ``paths`` (the files ``lookup('fileglob', DIR ~ '/*.whl')`` found on the controller, symlinks
    followed) as ``name:sha256``, sorted by name, joined by spaces: a wheel rebuilt under the same name changes it."""
    out = []
    for path in paths or []:
        path = str(path)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except (IOError, OSError) as e:
            raise AnsibleFilterError("machine_id_agent_wheels_dir: cannot read %s on the controller (%s)"
                                     % (path, e.strerror or e))
        out.append("%s:%s" % (os.path.basename(path), digest.hexdigest()))
    return " ".join(sorted(out))


class FilterModule(object):
    def filters(self):
        return {"agent_install_drift": agent_install_drift, "agent_wheel_version": agent_wheel_version,
                "wheels_digest": wheels_digest}
