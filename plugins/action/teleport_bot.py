# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin for lanyard.machine_id.teleport_bot: hide a result that carries a join token.

A module cannot mark one of its own return values as secret (Ansible strips `_ansible_no_log` from
module results). This plugin runs the module unchanged and, when the result holds a ``token``,
marks the whole result no_log, so callbacks print "the output has been hidden" at every verbosity,
while the registered variable still holds the token for the next task.
"""

from __future__ import annotations

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    _supports_check_mode = True
    _supports_async = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        wrap_async = self._task.async_val and not self._connection.has_native_async
        result.update(self._execute_module(task_vars=task_vars, wrap_async=wrap_async))
        if result.get("token"):
            result["_ansible_no_log"] = True
        return result
