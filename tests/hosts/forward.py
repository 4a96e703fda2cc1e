# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Forward ONE loopback TCP port of the controller into a test host's private network namespace.

The listening sockets are created inside the guest's network namespace (``setns``), the outgoing
connections in the controller's: a program in the guest that dials ``127.0.0.1:PORT`` or
``[::1]:PORT`` reaches the controller's ``127.0.0.1:PORT`` and nothing else on the machine.

Run as ``python3 forward.py LEADER_PID PORT [PORT...]`` (the harness starts it detached and
records its pid). Python 3.11 has no ``os.setns``, hence ctypes.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _serve(conn: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
        upstream.settimeout(None)
    except OSError as exc:
        print("forward: connect to 127.0.0.1:%d failed: %s" % (port, exc), file=sys.stderr, flush=True)
        conn.close()
        return
    t = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
    t.start()
    _pump(conn, upstream)
    t.join()
    conn.close()
    upstream.close()


def listen_in(leader_pid: int, ports: list[int]) -> list[tuple[socket.socket, int]]:
    """Open listening sockets for ``ports`` inside the network namespace of ``leader_pid``."""
    if os.readlink(f"/proc/{leader_pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        raise OSError(f"process {leader_pid} is not in a network namespace of its own (yet): nothing forwarded")
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    guest = os.open(f"/proc/{leader_pid}/ns/net", os.O_RDONLY)
    listeners = []
    try:
        _setns(guest)
        for port in ports:
            for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                try:
                    s = socket.socket(family, socket.SOCK_STREAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind((addr, port))
                    s.listen(64)
                except OSError:
                    if family == socket.AF_INET:
                        raise
                    continue  # no IPv6 on the guest's loopback: IPv4 is enough
                listeners.append((s, port))
    finally:
        _setns(own)
        os.close(own)
        os.close(guest)
    return listeners


def main(argv: list[str]) -> int:
    leader, ports = int(argv[0]), [int(p) for p in argv[1:]]
    sel = selectors.DefaultSelector()
    for s, port in listen_in(leader, ports):
        sel.register(s, selectors.EVENT_READ, port)
    print("ready", flush=True)
    while True:
        for key, dummy_events in sel.select():
            conn, dummy = key.fileobj.accept()
            threading.Thread(target=_serve, args=(conn, key.data), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
