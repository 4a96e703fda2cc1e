# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The token-hiding action plugin: a task that may return a token refuses async; results with a token are no_log."""

from __future__ import annotations

from unittest import mock

import pytest

from ansible.plugins.action import ActionBase

from ansible_collections.lanyard.machine_id.plugins.action import teleport_bot, teleport_bot_token

TOKEN = "0123456789abcdef0123456789abcdef"


def _plugin(cls, action, args, async_val=0):
    task = mock.MagicMock()
    task.action = action
    task.resolved_action = "lanyard.machine_id." + action
    task.args = args
    task.async_val = async_val
    conn = mock.MagicMock()
    conn.has_native_async = False
    plugin = cls.ActionModule(task, conn, mock.MagicMock(), mock.MagicMock(), mock.MagicMock(), mock.MagicMock())
    plugin._execute_module = mock.MagicMock(return_value={"changed": True, "token": TOKEN, "msg": "minted"})
    return plugin


@pytest.fixture(autouse=True)
def base_run(monkeypatch):
    monkeypatch.setattr(ActionBase, "run", lambda self, tmp=None, task_vars=None: {})


@pytest.mark.parametrize("cls,action,args", [
    (teleport_bot_token, "teleport_bot_token", {"bot": "b", "name": "h"}),
    (teleport_bot_token, "teleport_bot_token", {"bot": "b", "state": "present"}),
    (teleport_bot, "teleport_bot", {"name": "b", "roles": ["r"], "return_token": True}),
    (teleport_bot, "teleport_bot", {"name": "b", "roles": ["r"], "return_token": "yes"}),
])
def test_async_is_refused_when_the_task_may_return_a_token(cls, action, args):
    plugin = _plugin(cls, action, args, async_val=30)
    res = plugin.run(task_vars={})
    assert res["failed"] and "async is not supported" in res["msg"] and "Fix:" in res["msg"]
    plugin._execute_module.assert_not_called()          # nothing minted, no job file written
    assert TOKEN not in str(res)


@pytest.mark.parametrize("cls,action,args", [
    (teleport_bot_token, "teleport_bot_token", {"bot": "b", "name": "h", "state": "absent"}),
    (teleport_bot, "teleport_bot", {"name": "b", "roles": ["r"]}),
    (teleport_bot, "teleport_bot", {"name": "b", "state": "absent"}),
])
def test_async_is_allowed_when_no_token_can_come_back(cls, action, args):
    plugin = _plugin(cls, action, args, async_val=30)
    plugin._execute_module.return_value = {"changed": True, "msg": "done"}
    res = plugin.run(task_vars={})
    assert not res.get("failed") and plugin._execute_module.call_args.kwargs["wrap_async"]


def test_result_with_a_token_is_hidden():
    res = _plugin(teleport_bot_token, "teleport_bot_token", {"bot": "b", "name": "h"}).run(task_vars={})
    assert res["_ansible_no_log"] is True and res["token"] == TOKEN   # the registered variable keeps it
