# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin for lanyard.machine_id.teleport_bot: keep a result that carries a join token out of every output.

A module cannot mark one of its own return values as secret (Ansible strips `_ansible_no_log` from
module results). This plugin runs the module unchanged and, when the result holds a ``token``,
marks the whole result no_log, so callbacks print "the output has been hidden" at every verbosity,
while the registered variable still holds the token for the next task.

``async`` is refused for a task that may return a token: the async wrapper writes the module's raw
result, token included, into the job file (``~/.ansible_async/<jid>``) and ``async_status`` hands it
back without this plugin, so neither the no_log marking nor anything else could keep it hidden.
"""

from __future__ import annotations

from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    _supports_check_mode = True
    _supports_async = True

    def _may_return_token(self):
        args = self._task.args or {}
        action = (getattr(self._task, "resolved_action", None) or self._task.action or "").rsplit(".", 1)[-1]
        if action == "teleport_bot_token":
            return args.get("state", "present") != "absent"
        try:
            return boolean(args.get("return_token", False), strict=False)
        except TypeError:
            return True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        if self._task.async_val and self._may_return_token():
            action = (getattr(self._task, "resolved_action", None) or self._task.action)
            result.update(failed=True, changed=False, msg=(
                "%s: async is not supported for a task that returns a join token (the async job file and "
                "async_status would show the token in clear). Fix: remove async/poll from this task; "
                "run it on its own, or put the hosts' token tasks in a batch with serial instead." % action))
            return result
        wrap_async = self._task.async_val and not self._connection.has_native_async
        result.update(self._execute_module(task_vars=task_vars, wrap_async=wrap_async))
        if result.get("token"):
            result["_ansible_no_log"] = True
        return result
