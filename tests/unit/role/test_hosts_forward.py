# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""tests/hosts/forward.py: exactly the forwarded controller port is reachable from a private
network namespace (the way molecule's test hosts reach the Teleport proxy), nothing else."""

from __future__ import annotations

import os
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

FORWARDER = Path(__file__).resolve().parents[2] / "hosts" / "forward.py"

PROBE = """
import socket, sys
port = int(sys.argv[1])
for host in ("127.0.0.1", "::1", "localhost"):
    try:
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(b"ping " + host.encode())
        s.shutdown(socket.SHUT_WR)
        print(host, s.recv(100).decode())
    except OSError as e:
        print(host, "ERR", e.__class__.__name__)
"""


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(100)
        self.request.sendall(b"echo:" + data)


@pytest.fixture
def echo_servers():
    servers = []
    for dummy in range(2):
        srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    yield [s.server_address[1] for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def test_only_the_forwarded_port_reaches_into_the_namespace(echo_servers):
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces); the project's tests run as root", pytrace=False)
    forwarded, other = echo_servers
    ns = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    fwd = None
    try:
        pid = ns.pid
        for dummy in range(100):  # wait until unshare has exec'd sleep inside the new namespace
            if os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            threading.Event().wait(0.02)
        subprocess.run(["nsenter", f"--target={pid}", "--net", "ip", "link", "set", "lo", "up"], check=True)
        fwd = subprocess.Popen([sys.executable, str(FORWARDER), str(pid), str(forwarded)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert fwd.stdout.readline().strip() == "ready", fwd.stderr.read()

        def probe(port: int) -> str:
            return subprocess.run(["nsenter", f"--target={pid}", "--net", sys.executable, "-c", PROBE, str(port)],
                                  capture_output=True, text=True, timeout=30, check=True).stdout

        out = probe(forwarded)
        if not all(f"{h} echo:ping {h}" in out for h in ("127.0.0.1", "::1", "localhost")):
            fwd.kill()  # its stderr says why a connection was dropped (seen once in CI: ::1 got no answer)
            out += "\n--- forwarder stderr:\n" + fwd.stderr.read()
        assert "127.0.0.1 echo:ping 127.0.0.1" in out, out
        assert "::1 echo:ping ::1" in out, out
        assert "localhost echo:ping localhost" in out, out
        refused = probe(other)
        assert "echo" not in refused and refused.count("ERR") == 3, refused
    finally:
        if fwd is not None:
            fwd.kill()
            fwd.wait()
        ns.kill()
        ns.wait()
