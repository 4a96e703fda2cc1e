# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 11, point 1: nothing on the host but the agent can reach a connection that carries the bot's identity.

On the real bed, both listener modes, the agent runs as its unprivileged user with the guide's config (auth_server
= the proxy, so the ``teleport-auth@`` ALPN route that used to go through a loopback relay) and renews 200 times
(SIGUSR1, counted from its /metrics). Meanwhile:

* an attacker running as ``nobody`` (tests/integration/agent/boundary_attacker.py) scans /proc/net/tcp, tcp6,
  udp, udp6 and unix, and tries every socket of the bot user and every new Unix listener with a TLS handshake and
  an HTTP/2 preface: none of its connections gets anywhere. A positive control (a TLS listener on 127.0.0.1 and a
  world-connectable Unix socket, run as the bot user, like the old relay) shows that the attacker finds and
  enters such a relay;
* the agent runs under ``strace -f -e trace=bind,listen``: its only AF_INET/AF_INET6 bind is the diagnostics
  address, it binds no Unix socket and listens exactly once;
* as root, every 20 renewals, the sockets in the agent's /proc/<pid>/fd (and its children's) are matched against
  /proc/net/*: the diagnostics listener is its only listening socket.

A second test covers the direct route (auth_server = the auth service): the pinned join's unverified
GetClusterCACert and direct mTLS renewals, also under strace: no bind at all but glibc's netlink.
The agent's resident memory (VmRSS) is sampled throughout and printed: steady (idle) and peak during renewals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Set

import pytest

BOT_USER = "lanyardtest-bot"  # see conftest.py
RENEWALS = 200
HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.testbed]


@pytest.fixture(scope="module")
def teleport(teleport_multiplex):
    """One listener mode: what a local user can reach (sockets, files, /proc) is on the host, not on the wire, the
    same in both modes (the transports are tested in both elsewhere)."""
    return teleport_multiplex


# --- helpers -------------------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(diag: str, name: str) -> float:
    code, text = http_get("http://%s/metrics" % diag)
    for line in text.splitlines():
        if line.startswith("machine_id_agent_%s " % name):
            return float(line.split()[-1])
    raise AssertionError("metric %s missing:\n%s" % (name, text))


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # keep polling, report the last problem
            last = e
        time.sleep(interval)
    raise AssertionError("timed out after %.0fs waiting for %s (last: %r)" % (timeout, what, last))


def children(pid: int) -> List[int]:
    out = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> List[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children(p)
    return seen


def socket_inodes(pids) -> Set[str]:
    found = set()
    for pid in pids:
        d = "/proc/%d/fd" % pid
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            try:
                link = os.readlink(os.path.join(d, n))
            except OSError:
                continue
            if link.startswith("socket:["):
                found.add(link[8:-1])
    return found


def listening(inodes: Set[str]) -> List[str]:
    """The listening (or bound UDP) sockets among ``inodes``, as 'tcp 0100007F:1F90' / 'unix path' strings."""
    out = []
    for name in ("tcp", "tcp6", "udp", "udp6"):
        with open("/proc/net/" + name) as f:
            for line in f.read().splitlines()[1:]:
                p = line.split()
                if p[9] in inodes and (name.startswith("udp") or p[3] == "0A"):
                    out.append("%s %s" % (name, p[1]))
    with open("/proc/net/unix") as f:
        for line in f.read().splitlines()[1:]:
            p = line.split()
            if p[6] in inodes and int(p[3], 16) & 0x10000:
                out.append("unix %s" % (p[7] if len(p) > 7 else "(unnamed)"))
    return out


def hex_port(port: int) -> str:
    return "%04X" % port


def rss_kb(pid: int) -> int:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RSSSampler(threading.Thread):
    """VmRSS of the agent process (and of its whole process tree) every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], False

    def run(self):
        while not self.stop:
            own = rss_kb(self.pid)
            total = sum(rss_kb(p) for p in tree(self.pid))
            if own:
                self.samples.append((time.monotonic(), own, total))
            time.sleep(0.02)


BIND_RE = re.compile(r"^(\d+)\s+bind\(\d+, \{sa_family=(AF_\w+)(.*?)\}, \d+\)\s*=\s*(-?\d+)")
LISTEN_RE = re.compile(r"^(\d+)\s+listen\(\d+, \d+\)\s*=\s*(-?\d+)")


def parse_strace(path: Path):
    binds, listens = [], 0
    for line in path.read_text(errors="replace").splitlines():
        m = BIND_RE.match(line)
        if m:
            binds.append((m.group(2), m.group(3), int(m.group(4))))
            continue
        m = LISTEN_RE.match(line)
        if m and int(m.group(2)) == 0:
            listens += 1
    return binds, listens


def inet_binds(binds) -> List[tuple]:
    return [b for b in binds if b[0] in ("AF_INET", "AF_INET6")]


def strace_argv(out: Path) -> List[str]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing; run scripts/bootstrap.sh (it installs Debian's strace)", pytrace=False)
    return [strace, "-f", "-q", "--seccomp-bpf", "-e", "trace=bind,listen", "-o", str(out)]


def start_traced(h, trace: Path, log_name: str = "agent.log"):
    log = open(h.root / log_name, "ab")
    p = subprocess.Popen(strace_argv(trace) + h.argv("start", "-c", str(h.config_path)), stdout=log,
                         stderr=subprocess.STDOUT, env=h.env(), cwd=str(h.root))
    log.close()
    return p


def diag_holder(strace_pid: int, diag_port: int):
    """The process under strace that holds the diagnostics listener: the agent's main process."""
    want = ":" + hex_port(diag_port)
    for pid in tree(strace_pid)[1:]:
        if any(x.startswith("tcp ") and x.endswith(want) for x in listening(socket_inodes([pid]))):
            return pid
    return None


def make_control_pem(path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay-stand-in")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(path, 0o644)  # a throwaway test key the bot user's control process must read


class Attacker:
    def __init__(self, root: Path, bot_uid: int):
        self.dir = root / "attacker"
        self.dir.mkdir(mode=0o755)
        shutil.copy(HERE / "boundary_attacker.py", self.dir / "attacker.py")
        os.chmod(self.dir / "attacker.py", 0o644)
        out_dir = self.dir / "out"
        out_dir.mkdir()
        os.chown(out_dir, 65534, 65534)  # nobody
        self.out = out_dir / "attempts.jsonl"
        self.stop_file = self.dir / "stop"
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        self.proc = subprocess.Popen([runuser, "-u", "nobody", "--", "/usr/bin/python3", str(self.dir / "attacker.py"),
                                      str(self.out), str(self.stop_file), str(bot_uid)], cwd="/",
                                     env={"PATH": "/usr/bin:/bin"}, stderr=subprocess.PIPE)
        wait_for(lambda: self.out.exists() and self.out.stat().st_size > 0, 10, "the attacker to start")

    def records(self) -> List[Dict]:
        if not self.out.exists():
            return []
        return [json.loads(x) for x in self.out.read_text().splitlines() if x.strip()]

    def finish(self) -> List[Dict]:
        self.stop_file.touch()
        try:
            _out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        assert self.proc.returncode == 0, "attacker failed: %s" % err.decode(errors="replace")[-2000:]
        return self.records()


def run_control(h, attacker: Attacker, bot_uid: int) -> tuple:
    """The old relay's shape, run as the bot user for 3 s: the attacker must get into it."""
    cdir = h.root / "control"
    cdir.mkdir(mode=0o755)
    os.chown(cdir, bot_uid, -1)
    pem = cdir / "control.pem"
    make_control_pem(pem)
    ux = cdir / "control.sock"
    p = subprocess.Popen(["setpriv", "--reuid=%s" % BOT_USER, "--regid=%s" % BOT_USER, "--init-groups",
                          "/usr/bin/python3", str(attacker.dir / "attacker.py"), "--control", str(pem), str(ux), "3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    port = int(p.stdout.readline().decode().strip() or 0)
    assert port, p.stderr.read().decode()
    assert p.wait(20) == 0, p.stderr.read().decode()
    recs = [r for r in attacker.records() if r.get("kind")]
    tcp = [r for r in recs if r["kind"] == "tcp" and r["port"] == port]
    unix = [r for r in recs if r["kind"] == "unix" and r["host"] == str(ux)]
    assert any(r["tls"] for r in tcp), "the attacker did not get into the TCP control relay: %s" % tcp
    assert any(r["tls"] for r in unix), "the attacker did not get into the Unix control relay: %s" % unix
    return port, str(ux)


def summarize_rss(samples, busy_from: float) -> Dict[str, int]:
    idle = [s for s in samples if s[0] < busy_from]
    busy = [s for s in samples if s[0] >= busy_from]
    return {
        "steady_kb": sorted(x[1] for x in idle)[len(idle) // 2] if idle else 0,
        "peak_kb": max((x[1] for x in busy), default=0),
        "steady_tree_kb": sorted(x[2] for x in idle)[len(idle) // 2] if idle else 0,
        "peak_tree_kb": max((x[2] for x in busy), default=0),
    }


# --- the proof -----------------------------------------------------------------------------------------------
def test_no_socket_of_the_agent_lets_a_local_user_in(teleport, make_host, agent_users):
    bot_uid = agent_users[BOT_USER]
    diag_port = free_port()
    diag = "127.0.0.1:%d" % diag_port
    h = make_host(teleport, diag_addr=diag)  # the guide's config: auth_server = the proxy; default intervals
    assert h.init().returncode == 0

    attacker = Attacker(h.root, bot_uid)
    control_port, control_unix = run_control(h, attacker, bot_uid)

    trace = h.root / "strace.txt"
    p = start_traced(h, trace)
    pid = None
    sampler = None
    renewals_done = 0
    listeners_seen = []
    busy_from = elapsed = 0.0
    try:
        pid = wait_for(lambda: diag_holder(p.pid, diag_port), 60, "the agent's diagnostics listener", 0.02)
        sampler = RSSSampler(pid)
        sampler.start()
        wait_for(lambda: http_get("http://%s/readyz" % diag)[0] == 200, 120, "first outputs (/readyz 200)", 0.2)
        time.sleep(2)  # idle: the steady RSS window
        busy_from = time.monotonic()
        first = int(metric(diag, "renewals_total"))
        t0 = time.monotonic()
        while renewals_done < RENEWALS:
            before = int(metric(diag, "renewals_total"))
            os.kill(pid, signal.SIGUSR1)
            now_n = wait_for(lambda: int(metric(diag, "renewals_total")) > before and int(metric(diag, "renewals_total")),
                             60, "renewal %d (SIGUSR1)" % (renewals_done + 1))
            renewals_done = int(now_n) - first
            if renewals_done % 20 == 0 or renewals_done >= RENEWALS:
                listeners_seen.append(listening(socket_inodes(tree(pid))))
        elapsed = time.monotonic() - t0
        failures = metric(diag, "renewal_failures_total")
    finally:
        if sampler is not None:
            sampler.stop = True
        records = attacker.finish()
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if p.poll() is not None:
                break
            for target in ([pid] if pid else tree(p.pid)[1:]):
                try:
                    os.kill(target, sig)
                except ProcessLookupError:
                    pass
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                continue
    rss = summarize_rss(sampler.samples, busy_from)
    print("[boundary] mode=%s renewals=%d in %.0fs (%.2fs each) rss=%s attempts=%d" % (
        teleport.mode, renewals_done, elapsed, elapsed / max(1, renewals_done), json.dumps(rss),
        len([r for r in records if r.get("kind")])))
    assert failures == 0, h.log()[-3000:]
    assert renewals_done >= RENEWALS

    # the attacker: found the agent's diagnostics listener (so it saw the bot user's sockets), got nowhere
    attempts = [r for r in records if r.get("kind")]
    agent_attempts = [r for r in attempts if not (r["kind"] == "tcp" and r["port"] == control_port)
                      and not (r["kind"] == "unix" and r["host"] == control_unix)]
    assert any(r["kind"] == "tcp" and r["port"] == diag_port for r in agent_attempts), attempts[:20]
    entered = [r for r in agent_attempts if r["tls"] or r["h2"] or r.get("udp")]
    assert entered == [], entered[:10]
    others = sorted({(r["kind"], r["host"], r["port"]) for r in agent_attempts} - {("tcp", "127.0.0.1", diag_port)})
    print("[boundary] mode=%s attacker attempts on the agent's listener: %d; other targets tried: %s" % (
        teleport.mode, len([r for r in agent_attempts if r["port"] == diag_port]), others))

    # strace: binds of the agent (every process it forked included)
    binds, listens = parse_strace(trace)
    inet = inet_binds(binds)
    assert inet and all(("htons(%d)" % diag_port) in b[1] for b in inet), inet
    assert [b for b in binds if b[0] == "AF_UNIX"] == [], binds
    assert listens == 1, (listens, binds)
    print("[boundary] mode=%s binds by family: %s" % (
        teleport.mode, json.dumps({f: sum(1 for b in binds if b[0] == f) for f in {b[0] for b in binds}})))

    # root's view: the agent's only listening socket, sampled every 20 renewals, is the diagnostics one
    assert len(listeners_seen) >= RENEWALS // 20
    diag_hex = ":" + hex_port(diag_port)
    for snap in listeners_seen:
        assert len(snap) == 1 and snap[0].startswith("tcp ") and snap[0].endswith(diag_hex), listeners_seen


def test_direct_route_and_pinned_join_bind_nothing(teleport, make_host):
    """auth_server = the auth service with ca_pins: the join's unverified GetClusterCACert and the direct mTLS
    renewals. Three oneshot runs under strace: no AF_INET/AF_INET6/AF_UNIX bind, no listen."""
    h = make_host(teleport, auth_server=teleport.auth_addr)
    h.write_config(auth_server=teleport.auth_addr,
                   onboarding={"join_method": "token", "token": h.token, "ca_pins": [h.pin]})
    assert h.init().returncode == 0
    from machine_id_agent import identity as ident

    for n in range(3):
        assert (h.storage / ident.IDENTITY_FILE).exists() == (n > 0)  # run 0 joins, 1 and 2 renew
        trace = h.root / ("strace-%d.txt" % n)
        r = subprocess.run(strace_argv(trace) + h.argv("start", "-c", str(h.config_path), "--oneshot"),
                           capture_output=True, text=True, env=h.env(), cwd=str(h.root), timeout=180, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        binds, listens = parse_strace(trace)
        assert [b for b in binds if b[0] in ("AF_INET", "AF_INET6", "AF_UNIX")] == [], binds
        assert listens == 0
    assert h.pods_as().returncode == 0
