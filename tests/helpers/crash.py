# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Whole-service crashes of the agent on a real systemd host (issue 11 point 3), shared by
tests/integration/agent/test_crash_real.py and bench/crash_kill.py.

One host rolled out by playbooks/rollout.yml with the role's defaults (renewal_interval 20m, certificate_ttl
1h, the hardened unit). :meth:`CrashRig.kill_run` repeats: ``systemctl kill -s USR1`` (a forced renewal),
a random delay, ``systemctl kill -s KILL`` (main process and anything else in the unit's cgroup, as the OOM
killer or a power cut would), then a restart. After each kill it compares the generation Teleport counts
(label ``teleport.internal/bot-generation`` of user ``bot-<name>``, read with tctl) with the generation of the
identity on the host's disk, and looks for locks: a counted renewal that never reached the disk is a *loss*;
a lock is a *lock*. Either is re-enrolled (lock removed, bot re-created, new token) so the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Optional

from cryptography import x509

from helpers.fleet import Fleet, agent_status

SERVICE = "machine-id"
STORAGE = "/var/lib/teleport/bot"
TOKEN_PATH = "/etc/machine-id-agent/token"
GEN_LABEL = "teleport.internal/bot-generation"
OID_GENERATION = x509.ObjectIdentifier("1.3.9999.1.14")
TIMING_RE = re.compile(r"round trip ([0-9.]+) ms, answer to disk ([0-9.]+) ms, to fsync ([0-9.]+) ms")


@contextlib.contextmanager
def rolled_out_rig(workdir, teleport, kube, bot_name: str, host: str):
    """One real systemd host rolled out by playbooks/rollout.yml with the role's defaults; a CrashRig on it,
    the host stopped afterwards."""
    fleet = CrashFleet(workdir, teleport=teleport, kube=kube, bot_name=bot_name)
    try:
        fleet.add_hosts([host])
        run = fleet.rollout()
        assert run.rc == 0, run.stdout[-6000:]
        yield CrashRig(fleet, host)
    finally:
        fleet.stop()


class CrashFleet(Fleet):
    """A Fleet whose group vars can be extended (e.g. machine_id_agent_source for an older agent)."""

    extra_vars: dict = {}

    def group_vars(self) -> dict:
        v = super().group_vars()
        v.update(self.extra_vars)
        return v


@dataclass
class RunStats:
    kills: int = 0
    renewals: int = 0  # generations Teleport counted during the run
    losses: int = 0  # counted renewals whose identity never reached the disk
    locks: int = 0
    reenrolments: int = 0
    delays: list = field(default_factory=list)
    timings: list = field(default_factory=list)  # (rpc ms, to disk ms, to fsync ms) from the agent's log
    events: list = field(default_factory=list)

    def summary(self) -> dict:
        def pct(xs, q):
            xs = sorted(xs)
            return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None
        rpc = [t[0] for t in self.timings]
        disk = [t[1] for t in self.timings]
        fsync = [t[2] for t in self.timings]
        return {"kills": self.kills, "renewals_counted": self.renewals, "losses": self.losses,
                "locks": self.locks, "reenrolments": self.reenrolments,
                "loss_rate": round(self.losses / self.kills, 4) if self.kills else None,
                "lock_rate": round(self.locks / self.kills, 4) if self.kills else None,
                "logged_renewals": len(self.timings),
                "rpc_ms_p50": pct(rpc, 0.5), "rpc_ms_p95": pct(rpc, 0.95),
                "answer_to_disk_ms_p50": pct(disk, 0.5), "answer_to_disk_ms_p95": pct(disk, 0.95),
                "answer_to_disk_ms_max": max(disk) if disk else None,
                "answer_to_fsync_ms_p50": pct(fsync, 0.5), "answer_to_fsync_ms_p95": pct(fsync, 0.95),
                "answer_to_fsync_ms_max": max(fsync) if fsync else None}


class CrashRig:
    def __init__(self, fleet: Fleet, host: str, role: str = "machine-id-kube-role"):
        self.fleet = fleet
        self.tp = fleet.teleport
        self.name = host
        self.host = fleet.hosts[host]
        self.bot = f"{fleet.bot_name}-{host}"
        self.user = f"bot-{self.bot}"
        self.role = role

    # -- facts ---------------------------------------------------------------------------------------------
    def label_generation(self) -> Optional[int]:
        r = self.tp.tctl("get", f"user/{self.user}", "--format=json", check=True)
        doc = json.loads(r.stdout)
        doc = doc[0] if isinstance(doc, list) else doc
        v = (doc.get("metadata", {}).get("labels") or {}).get(GEN_LABEL)
        return int(v) if v else None

    def locks(self) -> list:
        r = self.tp.tctl("get", "locks", "--format=json", check=True)
        docs = json.loads(r.stdout or "[]") or []
        return [d for d in docs if (d.get("spec", {}).get("target", {}) or {}).get("user") == self.user]

    def disk_generation(self) -> Optional[int]:
        """Generation of the identity on the host's disk (read inside the host: the storage may be a mount there)."""
        r = self.host.run(["cat", f"{STORAGE}/identity.json"], check=False)
        try:
            doc = json.loads(r.stdout)
            cert = x509.load_pem_x509_certificate(doc["tlscert"].encode())
        except (ValueError, KeyError, TypeError):
            return None
        attrs = cert.subject.get_attributes_for_oid(OID_GENERATION)
        return int(attrs[0].value) if attrs else None

    def sh(self, script: str, check: bool = True, timeout: float = 120):
        return self.host.run(["sh", "-c", script], check=check, timeout=timeout)

    def active_state(self) -> str:
        return self.sh(f"systemctl show -p ActiveState --value {SERVICE}", check=False).stdout.strip()

    def status(self) -> dict:
        return agent_status(self.host)

    def usr1(self) -> None:
        """A forced renewal (the agent's SIGUSR1 handler is in the main process)."""
        self.sh(f"systemctl kill --kill-whom=main -s USR1 {SERVICE}")

    def main_pid(self) -> int:
        return int(self.sh(f"systemctl show -p MainPID --value {SERVICE}").stdout.strip() or 0)

    def wait_active(self, timeout: float = 90) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self.active_state()
            if st == "active":
                return True
            if st == "failed":
                return False
            time.sleep(0.2)
        return False

    def restart_after_kill(self) -> bool:
        self.sh(f"systemctl reset-failed {SERVICE} 2>/dev/null; systemctl start --no-block {SERVICE}")
        return self.wait_active(timeout=40)

    def journal_timings(self, since: str) -> list:
        out = self.sh(f"journalctl -u {SERVICE} -o cat --since '{since}' --no-pager", check=False).stdout
        return [tuple(float(x) for x in m.groups()) for m in TIMING_RE.finditer(out)]

    # -- recovery --------------------------------------------------------------------------------------------
    def reenrol(self) -> None:
        """What an operator does for a lost or locked host: remove the lock, re-create the bot, new token."""
        self.sh(f"systemctl stop {SERVICE}; systemctl reset-failed {SERVICE} 2>/dev/null; true")
        for lock in self.locks():
            self.tp.tctl("rm", f"lock/{lock['metadata']['name']}", check=True)
        self.tp.tctl("bots", "rm", self.bot, check=False)
        token = self.tp.bot_add(self.bot, [self.role])
        self.host.run(["sh", "-c", f"umask 077; cat > {TOKEN_PATH}.new && chown teleport:teleport {TOKEN_PATH}.new "
                                   f"&& mv {TOKEN_PATH}.new {TOKEN_PATH} && rm -f {STORAGE}/identity.json "
                                   f"{STORAGE}/stale-identity {STORAGE}/tokenhash"], input=token + "\n")
        self.sh(f"systemctl start --no-block {SERVICE}")
        if not self.wait_active(90):
            raise AssertionError(f"{self.name}: the agent did not become ready after re-enrolment:\n"
                                 + self.sh(f"journalctl -u {SERVICE} -o cat -n 30 --no-pager", check=False).stdout)
        # Teleport's lock watcher needs a moment to forget a removed lock
        time.sleep(1.0)

    # -- the run ---------------------------------------------------------------------------------------------
    def kill_run(self, kills: int, max_delay: float, seed: Optional[int] = None, log=print,
                 progress: Optional[str] = None) -> RunStats:
        rnd = random.Random(seed)
        stats = RunStats()
        since = self.sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
        if not self.wait_active(90):
            raise AssertionError(f"{self.name}: the agent is not active before the run")
        gen0 = self.label_generation() or 0
        counted = 0
        for i in range(kills):
            delay = rnd.uniform(0.0, max_delay)
            stats.delays.append(delay)
            # one shell: the delay between the two signals is not stretched by nsenter. USR1 goes to the main
            # process (the agent's handler); KILL to every process of the unit (systemctl kill's default).
            # systemctl kill may report EIO for a process of the unit that is exiting at that moment (seen
            # with 648c7e0's workers): the kill is retried and only its effect is checked
            self.sh(f"systemctl kill --kill-whom=main -s USR1 {SERVICE}; sleep {delay:.4f}; "
                    f"systemctl kill -s KILL {SERVICE} || systemctl kill -s KILL {SERVICE}", check=False)
            stats.kills += 1
            ok = self.restart_after_kill()
            # Read after the restart: tctl reads through Teleport's cache, which lags writes by up to a second.
            # A restart with a fresh identity renews nothing (this agent), so label > disk means a renewal
            # Teleport counted never reached the disk. (An agent that renews at every start, like 648c7e0,
            # turns such a loss into a lock right here instead.)
            locks = self.locks()
            if not ok and not locks:
                time.sleep(2)  # a lock appears asynchronously (docs/protocol-findings.md section 3)
                locks = self.locks()
            label = self.label_generation() or 0
            disk = self.disk_generation()
            counted += label - gen0
            gen0 = label
            lost = disk is not None and label > disk
            if lost:
                stats.losses += 1
            if locks:
                stats.locks += 1
            if lost or locks or not ok:
                stats.events.append({"kill": i, "delay": round(delay, 4), "label": label, "disk": disk,
                                     "lost": lost, "locked": bool(locks), "active": ok,
                                     "status": self.status().get("identity")})
                log(f"[crash] kill {i}: delay {delay:.3f}s label {label} disk {disk} lost={lost} "
                    f"locked={bool(locks)} active={ok}")
                self.reenrol()
                stats.reenrolments += 1
                gen0 = self.label_generation() or 0
            if progress:
                stats.renewals = counted
                with open(progress, "w") as f:
                    json.dump({**stats.summary(), "events": stats.events}, f)
        stats.renewals = counted
        stats.timings = self.journal_timings(since)
        return stats
