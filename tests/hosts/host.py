# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Start, reach and stop test hosts: systemd-nspawn containers with systemd as PID 1.

* Fresh every run: the cached image is copied (``cp --reflink=auto``) into
  ``<cache>/hosts/runs/<name>/rootfs`` and that copy is booted; ``stop()`` deletes it.
* Own network namespace (``--private-network``: loopback only). Ports the host must reach (the
  test bed's Teleport proxy) are forwarded one by one by ``forward.py``.
* ``--register=no --keep-unit``: no machined and no transient scope on the controller, which does
  not run systemd as PID 1.
* Ansible reaches a host with the test-only ``lanyard_nspawn`` connection plugin (nsenter into the
  container's namespaces): no sshd, keys or extra ports, and the network namespace stays private.

Run state (pids, ports) is in ``<cache>/hosts/runs/<name>/state.json``; the connection plugin
reads the container's PID 1 from there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .image import DEFAULT_RELEASE, HostError, build, cache_root, check_release

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FORWARDER = Path(__file__).resolve().parent / "forward.py"


def runs_dir() -> Path:
    return cache_root() / "runs"


# Every container's systemd, journald, logind and path units take inotify instances from root's one per-user budget
# (the containers share the host's user namespace). Debian's default of 128 runs out at about 21 hosts: the 22nd
# host's systemd then never reports its boot finished. A real fleet has one budget per machine.
INOTIFY_INSTANCES = 8192


def ensure_inotify_budget(path: str = "/proc/sys/fs/inotify/max_user_instances") -> None:
    """Raise the per-user inotify instance limit to :data:`INOTIFY_INSTANCES` if it is lower."""
    try:
        with open(path) as f:
            current = int(f.read().strip())
        if current < INOTIFY_INSTANCES:
            with open(path, "w") as f:
                f.write(str(INOTIFY_INSTANCES))
            _log(f"fs.inotify.max_user_instances {current} -> {INOTIFY_INSTANCES} (each test host uses several)")
    except (OSError, ValueError) as exc:
        _log(f"could not raise fs.inotify.max_user_instances ({exc}); more than ~20 test hosts may not boot")


def _log(msg: str) -> None:
    print(f"[hosts] {msg}", file=sys.stderr, flush=True)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _in_new_pid_ns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def _in_new_net_ns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


@dataclass
class Host:
    name: str
    forward_ports: list[int] = field(default_factory=list)
    nspawn_pid: int | None = None
    leader_pid: int | None = None
    forwarder_pid: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    release: str = DEFAULT_RELEASE

    @property
    def run_dir(self) -> Path:
        return runs_dir() / self.name

    @property
    def root(self) -> Path:
        return self.run_dir / "rootfs"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    # -- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def load(cls, name: str) -> "Host":
        path = runs_dir() / name / "state.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise HostError(f"test host {name!r}: no run state at {path} ({exc}). "
                            f"Fix: start it first (python -m hosts start {name})") from None
        return cls(**data)

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "name": self.name, "forward_ports": self.forward_ports, "nspawn_pid": self.nspawn_pid,
            "leader_pid": self.leader_pid, "forwarder_pid": self.forwarder_pid, "timings": self.timings,
            "release": self.release,
        }, indent=1))
        os.rename(tmp, self.state_path)

    @classmethod
    def start(cls, name: str, forward_ports: list[int] | tuple[int, ...] = (), timeout: float = 90,
              release: str = DEFAULT_RELEASE) -> "Host":
        """Boot a fresh copy of the ``release`` image (``bookworm`` = Debian 12, ``trixie`` = Debian 13)."""
        if not name.replace("-", "").isalnum():
            raise HostError(f"test host name {name!r}: use letters, digits and '-' only")
        image = build(release=check_release(release))
        host = cls(name=name, forward_ports=[int(p) for p in forward_ports], release=release)
        if host.run_dir.exists():
            _log(f"{name}: removing the leftovers of an earlier run")
            try:
                cls.load(name).stop()
            except HostError:
                pass
            shutil.rmtree(host.run_dir, ignore_errors=True)
        host.run_dir.mkdir(parents=True)
        ensure_inotify_budget()
        try:
            t0 = time.monotonic()
            subprocess.run(["cp", "-a", "--reflink=auto", str(image), str(host.root)], check=True)
            host.timings["copy"] = round(time.monotonic() - t0, 2)
            host._boot(timeout)
            host.timings["start_total"] = round(time.monotonic() - t0, 2)
            host.save()
        except BaseException:
            host.stop()
            raise
        _log(f"{name} ({release}): up in {host.timings['start_total']:.1f} s (copy {host.timings['copy']:.1f} s, "
             f"boot {host.timings['boot']:.1f} s), forwarded ports {host.forward_ports or 'none'}")
        return host

    def _boot(self, timeout: float) -> None:
        t0 = time.monotonic()
        console = open(self.run_dir / "console.log", "ab")
        argv = ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit", "--private-network",
                f"--directory={self.root}", f"--machine={self.name}", f"--hostname={self.name}",
                "--console=read-only", "--link-journal=no", "--resolv-conf=off", "--timezone=off"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
        console.close()
        self.nspawn_pid = proc.pid
        self.save()
        deadline = time.monotonic() + timeout
        while self.leader_pid is None:
            if proc.poll() is not None:
                raise HostError(f"test host {self.name}: systemd-nspawn exited ({proc.returncode}): "
                                f"{self._console_tail()}")
            for child in _children(proc.pid):
                if _in_new_pid_ns(child):
                    self.leader_pid = child
            if time.monotonic() > deadline:
                raise HostError(f"test host {self.name}: no container process after {timeout:.0f} s")
            time.sleep(0.05)
        self.save()
        if self.forward_ports:
            # The forwarded ports are there from early boot, as a real host's network is: services that start at
            # boot (the agent) reach the proxy before systemd reports the boot finished. PID 1 brings the
            # loopback interface up first thing; the forwarder binds on it.
            # Only into a network namespace of the container's own: the controller's loopback also has 127.0.0.1
            # (and the proxy holds the forwarded port there). A forwarder that failed with "Address already in use"
            # was seen once with three test workers; the cause is not known (a probe of systemd-nspawn's start
            # found the first process in its own namespace from the start), so a failure now reports both
            # namespaces and what listens in the guest.
            while True:
                if _in_new_net_ns(self.leader_pid):
                    lo = subprocess.run(["nsenter", f"--target={self.leader_pid}", "--net", "ip", "-4", "addr",
                                         "show", "lo"], capture_output=True, text=True, check=False)
                    if "127.0.0.1" in lo.stdout:
                        break
                if time.monotonic() > deadline:
                    raise HostError(f"test host {self.name}: loopback not up after {timeout:.0f} s")
                time.sleep(0.05)
            self._start_forwarder()
        state = ""
        while time.monotonic() < deadline:
            r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=max(1, deadline - time.monotonic()))
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            if proc.poll() is not None:
                raise HostError(f"test host {self.name}: container stopped while booting: {self._console_tail()}")
            time.sleep(0.2)
        else:
            raise HostError(f"test host {self.name}: systemd not ready after {timeout:.0f} s "
                            f"(state {state!r}): {self._console_tail()}")
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout.strip()
            _log(f"{self.name}: systemd is degraded (failed units: {failed or '?'})")
        self.timings["boot"] = round(time.monotonic() - t0, 2)

    def _start_forwarder(self) -> None:
        log = open(self.run_dir / "forward.log", "ab")
        proc = subprocess.Popen([sys.executable, str(FORWARDER), str(self.leader_pid), *map(str, self.forward_ports)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True, close_fds=True)
        log.close()
        self.forwarder_pid = proc.pid
        self.save()
        line = proc.stdout.readline().decode().strip() if proc.stdout else ""
        if line != "ready":
            # what holds the port in the guest, and whose network namespace that is (for the next time it happens)
            try:
                netns = f"guest {os.readlink(f'/proc/{self.leader_pid}/ns/net')}, ours {os.readlink('/proc/self/ns/net')}"
            except OSError as exc:
                netns = f"unknown ({exc})"
            held = subprocess.run(["nsenter", f"--target={self.leader_pid}", "--net", "ss", "-ltnp"],
                                  capture_output=True, text=True, check=False)
            raise HostError(f"test host {self.name}: port forwarder failed: "
                            f"{(self.run_dir / 'forward.log').read_text(errors='replace')[-500:]}; "
                            f"network namespaces: {netns}; listening in the guest: "
                            f"{(held.stdout + held.stderr).strip()[-1500:]}")
        proc.stdout.close()

    def _console_tail(self) -> str:
        try:
            return " | ".join((self.run_dir / "console.log").read_text(errors="replace").strip().splitlines()[-8:])
        except OSError:
            return "(no console log)"

    def stop(self, timeout: float = 30) -> None:
        """Power the container off, stop the forwarder and delete the run directory."""
        self.power_off(timeout)
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def power_on(self, timeout: float = 90) -> None:
        """Boot the same root file system again after ``power_off()`` (what was on its disk is still there)."""
        if _alive(self.nspawn_pid):
            raise HostError(f"test host {self.name}: already running")
        if not self.root.is_dir():
            raise HostError(f"test host {self.name}: no root file system at {self.root} (stopped for good)")
        self.nspawn_pid = self.leader_pid = self.forwarder_pid = None
        self._boot(timeout)
        self.save()
        _log(f"{self.name}: powered on again in {self.timings['boot']:.1f} s")

    def power_off(self, timeout: float = 30) -> None:
        """An orderly poweroff of the container (its disk is kept: ``power_on()`` boots it again)."""
        if _alive(self.forwarder_pid):
            os.kill(self.forwarder_pid, signal.SIGTERM)
        if _alive(self.nspawn_pid):
            # nspawn turns SIGTERM into an orderly poweroff of the container (SIGRTMIN+3 to its PID 1).
            os.kill(self.nspawn_pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(self.nspawn_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(self.nspawn_pid):
                os.killpg(self.nspawn_pid, signal.SIGKILL)
                time.sleep(0.5)
        for pid in (self.nspawn_pid, self.forwarder_pid):
            if pid:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if self.leader_pid and _alive(self.leader_pid):
            os.kill(self.leader_pid, signal.SIGKILL)
        # a powered-off host is unreachable, never a recycled pid's namespaces
        self.nspawn_pid = self.leader_pid = self.forwarder_pid = None
        if self.run_dir.exists():
            self.save()

    # -- commands inside ------------------------------------------------------------------------------
    def nsenter_argv(self) -> list[str]:
        if not self.leader_pid or not _alive(self.leader_pid):
            raise HostError(f"test host {self.name}: not running. Fix: python -m hosts start {self.name}")
        return ["nsenter", f"--target={self.leader_pid}", "--mount", "--uts", "--ipc", "--net", "--pid",
                "--cgroup", "--root", "--wd", "--", "/usr/bin/env", "-i", f"PATH={GUEST_PATH}", "HOME=/root",
                "LANG=C.UTF-8", "USER=root", "LOGNAME=root"]

    def run(self, argv: list[str], check: bool = True, input: bytes | str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        proc = subprocess.run(self.nsenter_argv() + list(argv), capture_output=True, text=text, input=input,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise HostError(f"test host {self.name}: {' '.join(argv)} failed ({proc.returncode}): "
                            f"{str(proc.stderr).strip()[-500:]}")
        return proc


def stop_all() -> list[str]:
    stopped = []
    for state in sorted(runs_dir().glob("*/state.json")):
        try:
            Host.load(state.parent.name).stop()
        except HostError:
            shutil.rmtree(state.parent, ignore_errors=True)
        stopped.append(state.parent.name)
    return stopped
