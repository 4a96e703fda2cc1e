# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""systemd notification protocol, by hand: datagrams "KEY=value\\n..." to the unix socket in
``$NOTIFY_SOCKET`` (a path, or an abstract name starting with '@')."""

from __future__ import annotations

import os
import socket
from typing import Optional


class Notifier:
    # How long one notification may wait for room in systemd's queue (a unix datagram queue holds only
    # net.unix.max_dgram_qlen messages, 10 by default, while PID 1 is busy); then it is dropped and send()
    # answers False. Without a bound, a watchdog ping to a full queue blocked the service loop for good.
    send_timeout = 5.0

    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET") or ""
        self.addr: Optional[str] = None
        if addr.startswith("@"):
            self.addr = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.addr = addr
        self.watchdog_usec = 0
        wd = env.get("WATCHDOG_USEC", "")
        wpid = env.get("WATCHDOG_PID", "")
        if wd.isdigit() and (not wpid or wpid == str(os.getpid())):
            self.watchdog_usec = int(wd)

    @property
    def enabled(self) -> bool:
        return self.addr is not None

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings (half the configured timeout), or None."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: str) -> bool:
        if self.addr is None:
            return False
        msg = "".join("%s=%s\n" % (k, str(v).replace("\n", " ")) for k, v in fields.items()).encode()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(self.send_timeout)
            s.connect(self.addr)
            s.sendall(msg)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1") if self.watchdog_usec else False

    def stopping(self) -> bool:
        return self.send(STOPPING="1", STATUS="stopping")

    def reloading(self) -> bool:
        return self.send(RELOADING="1", STATUS="reloading configuration")
