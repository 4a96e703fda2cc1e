# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test-only callback: append every task result as one JSON line to $LANYARD_RECORD_FILE, with the wall-clock
time it arrived (``t``), and the time each host started each task to $LANYARD_RECORD_FILE.starts (tests derive
the batches Ansible really ran from these times, not from the serial variable)."""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase
from ansible.release import __version__ as ANSIBLE_CORE

DOCUMENTATION = """
name: lanyard_record
type: aggregate
short_description: record task results as JSON lines (tests only)
description: Writes one JSON object per task result to the file named by LANYARD_RECORD_FILE.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "lanyard_record"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result, status):
        path = os.environ.get("LANYARD_RECORD_FILE")
        if not path:
            return
        entry = {
            "host": result._host.get_name(),
            "task": result._task.get_name(),
            "action": result._task.action,
            "status": status,
            "result": self._clean_results(dict(result._result), result._task.action) or dict(result._result),
            "play": result._task.play.get_name() if result._task.play else None,
            "t": time.time(),
            "core": ANSIBLE_CORE,  # which ansible-core ran it (the controller matrix checks it)
        }
        with open(path, "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")

    def v2_runner_on_start(self, host, task):
        path = os.environ.get("LANYARD_RECORD_FILE")
        if not path:
            return
        entry = {"host": host.get_name(), "task": task.get_name(),
                 "play": task.play.get_name() if task.play else None, "t": time.time()}
        with open(path + ".starts", "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")
