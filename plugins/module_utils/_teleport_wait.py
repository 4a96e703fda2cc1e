# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: wait for a read to show our own write.

Teleport's auth server serves reads from a cache fed by its backend's event stream; on v13.3.8 a
``tctl get`` right after ``tctl create -f`` was seen to return the old resource for up to ~1 s, and right after
``tctl rm`` the deleted one (the fresh-clone CI failure of issue 13). Every module that writes reads back until
its write shows, for at most DEFAULT_TIMEOUT seconds, so the next task's read is honest.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time

DEFAULT_TIMEOUT = 15.0
DEFAULT_INTERVAL = 0.25


def wait_for(read, done, timeout=None, interval=None, sleep=time.sleep, clock=time.monotonic):
    """Call ``read()`` until ``done(value)``; return the last value read (done or not) when time runs out."""
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    interval = DEFAULT_INTERVAL if interval is None else interval
    deadline = clock() + timeout
    value = read()
    while not done(value) and clock() < deadline:
        sleep(interval)
        value = read()
    return value
