# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A full storage when the agent starts: writing its pid into ``agent.lock`` fails with ENOSPC (seen on a real host,
tests/integration/rollout/test_adopt_tbot_edges.py, where it ended the agent with a traceback before it could say
what the storage lacks). The lock is still taken and held, with a warning; nothing raises."""

from __future__ import annotations

import errno
import os

import pytest

from machine_id_agent import service
from machine_id_agent.errors import ConfigError
from machine_id_agent.service import Agent

# logbuf is a fixture the tests take by name
from test_service import FakeBackend, logbuf, make_cfg  # noqa: E402,F401  pylint: disable=unused-import


def test_lock_is_held_when_the_pid_cannot_be_written(tmp_path, logbuf, monkeypatch):
    real_write = os.write

    def full(fd, data):
        if data.strip().isdigit():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    a = Agent(make_cfg(tmp_path), backend=FakeBackend(), log=logbuf[0])
    monkeypatch.setattr(os, "write", full)
    a.acquire_lock()
    monkeypatch.setattr(os, "write", real_write)
    try:
        assert "cannot write this agent's pid into" in logbuf[1].getvalue()
        assert "No space left on device" in logbuf[1].getvalue()
        # with no pid to look at, a second agent waits ORPHAN_WAIT for an orphaned worker, then refuses
        monkeypatch.setattr(service, "ORPHAN_WAIT", 0.2)
        with pytest.raises(ConfigError, match="another machine-id-agent is already running"):
            Agent(make_cfg(tmp_path), backend=FakeBackend(), log=logbuf[0]).acquire_lock()
    finally:
        a.release_lock()
