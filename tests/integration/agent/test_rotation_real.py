# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""CA rotations on the real Teleport v13 (issue 12), with the agent's DEFAULT timing (credential_ttl 1h,
renewal_interval 20m: no renewal falls into a rotation by schedule), on a private bed (own_bed) because every
rotation changes the cluster's CAs.

* A reader (``kubectl get pods`` as the application user, once a second) through a manual host CA rotation with
  25 s between phases: separate ports with the agent as a process on the bed; TLS routing on a real systemd host
  rolled out by the role with its defaults (hardened unit). Through an automatic user CA rotation with the
  shortest grace period v13 accepts (1s: ``--grace-period=0s`` is refused by v13's tctl, "provide value > 0").
  At most 3 failed reads each, and the agent renews normally afterwards.
* Stopped before ``init`` and started after ``standby``: through a host CA rotation the agent re-establishes trust
  through the proxy's verified HTTPS answer and the reader works again within a minute, with no new token; through
  a user CA rotation (systemd host) ``status`` says ``untrusted``, the bot is not locked, and one rollout
  re-enrols the host.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import pytest
import requests
import yaml

import testbed as tb
from helpers.crash import rolled_out_rig
from helpers.fleet import agent_status
from test_agent_e2e import APP_USER, free_port, http_get, metric, wait_for

pytestmark = [pytest.mark.testbed]

# LANYARD_ROTATION_CONTROL=1 runs the bed-process agents with watch_ca_rotations: false, i.e. as before issue 12:
# the reader tests on them must then FAIL (the control that shows they can; measured: 57 of 113 reads failed).
CONTROL = os.environ.get("LANYARD_ROTATION_CONTROL") or None
SYSTEMD_HOST = "h4-rotation"
PHASES = ("init", "update_clients", "update_servers", "standby")
MAX_FAILED_READS = 3


class Reader:
    """A reader once a second, in a thread; records (time, ok, error). ``read()`` returns a CompletedProcess."""

    def __init__(self, read):
        self.read = read
        self.reads = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def of_process_host(cls, h):
        """``kubectl get pods`` as the application user of a bed-process host."""
        return cls(lambda: h.as_user(APP_USER, str(h.kubectl_bin), "--kubeconfig=%s" % (h.dest / "kubeconfig.yaml"),
                                     "--request-timeout=5s", "get", "pods", "-n", tb.DEMO_NAMESPACE, "-o", "name",
                                     timeout=30))

    @classmethod
    def of_systemd_host(cls, fleet, name):
        """The same inside a systemd host, as its ``app`` user, with the kubeconfig the role's agent writes."""
        return cls(lambda: fleet.reader_get_pods(name, request_timeout="5s", timeout=30))

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            r = self.read()
            ok = r.returncode == 0 and "pod/%s" % tb.DEMO_POD in r.stdout
            self.reads.append((time.strftime("%H:%M:%S"), ok, "" if ok else (r.stderr.strip().splitlines() or [""])[-1]))
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(40)

    @property
    def failed(self):
        return [r for r in self.reads if not r[1]]

    def report(self, what):
        print("%s: %d reads, %d failed %s" % (what, len(self.reads), len(self.failed), self.failed))


def teleport_ready(tp, timeout=120):
    """Teleport notices a phase change and reloads its services in-process a moment later; advancing before that
    reload is over leaves the bed's proxy route to auth broken for minutes (docs/protocol-findings.md section 5).
    So: give the reload time to start, then wait until the proxy, auth and the Kubernetes service answer."""
    time.sleep(4)

    def ready():
        try:
            if not requests.get("http://127.0.0.1:%d/readyz" % tp.diag_port, timeout=2).ok:
                return False
            requests.get(tp.web_url + "/webapi/ping", verify=str(tp.web_ca_path), timeout=2).raise_for_status()
        except requests.RequestException:
            return False
        return tp._kube_registered()
    wait_for(ready, timeout, "teleport ready after a phase change", interval=0.5)


def rotate(tp, ca_type, phase):
    r = tp.tctl("auth", "rotate", "--manual", "--type=%s" % ca_type, "--phase=%s" % phase)
    assert r.returncode == 0, "tctl auth rotate %s %s: %s" % (ca_type, phase, r.stderr[-400:])


def ca_state(tp, ca_type):
    """(state, phase) of the cluster's ``ca_type`` CA rotation, from tctl."""
    docs = json.loads(tp.tctl("get", "cert_authority", "--format=json", check=True).stdout)
    doc = [d for d in docs if d["spec"]["type"] == ca_type][0]
    rot = doc["spec"].get("rotation") or {}
    return rot.get("state", ""), rot.get("phase", "")


def started_agent(own_bed, mode, make_host):
    tp = own_bed.teleport[mode]
    diag = "127.0.0.1:%d" % free_port()
    extra = {"watch_ca_rotations": False} if CONTROL else {}
    h = make_host(tp, kube_cluster=own_bed.kube, diag_addr=diag, **extra)  # the agent's default ttl and interval
    assert h.init().returncode == 0
    p = h.start()
    wait_for(lambda: http_get("http://%s/readyz" % diag)[0] == 200, 90, "first outputs")
    if not extra:
        wait_for(lambda: metric(diag, "ca_watch_up") == 1, 30, "the CA watch to open")
    return tp, h, p, diag


def renews_normally(h, p, diag):
    """A forced renewal afterwards succeeds and the reader still reads."""
    before = metric(diag, "renewals_total")
    p.send_signal(signal.SIGUSR1)
    wait_for(lambda: metric(diag, "renewals_total") > before, 60, "a renewal after the rotation")
    assert http_get("http://%s/readyz" % diag)[0] == 200
    assert h.pods_as(APP_USER).returncode == 0
    assert p.poll() is None


def host_cas_in_kubeconfig(h):
    doc = yaml.safe_load((h.dest / "kubeconfig.yaml").read_bytes())
    return base64.b64decode(doc["clusters"][0]["cluster"]["certificate-authority-data"])


def manual_host_rotation(tp, reader, ca_type="host"):
    """init, update_clients, update_servers, standby, 25 s apart (each after Teleport is back), the reader reading."""
    with reader:
        time.sleep(3)
        for phase in PHASES:
            t0 = time.monotonic()
            rotate(tp, ca_type, phase)
            teleport_ready(tp)
            time.sleep(max(0.0, 25 - (time.monotonic() - t0)))
        time.sleep(10)
    failed = reader.failed
    assert len(reader.reads) >= 90, "the reader read about once a second (%d reads)" % len(reader.reads)
    assert len(failed) <= MAX_FAILED_READS, "%d of %d reads failed: %s" % (len(failed), len(reader.reads), failed)


def test_reader_follows_a_manual_host_ca_rotation_separate_ports(own_bed, make_host):
    """LANYARD_ROTATION_MANUAL_CA=user runs the same with a manual USER CA rotation (not in CI: the automatic user
    CA rotation below covers that CA there)."""
    ca_type = os.environ.get("LANYARD_ROTATION_MANUAL_CA", "host")
    tp, h, p, diag = started_agent(own_bed, "separate", make_host)
    ca_before = (h.dest / "teleport-host-ca.crt").read_bytes()
    rotations_before = metric(diag, "ca_rotation_renewals_total") if CONTROL is None else 0
    reader = Reader.of_process_host(h)
    try:
        manual_host_rotation(tp, reader, ca_type)
    finally:
        reader.report("manual %s CA rotation, separate ports, agent process" % ca_type)
    if ca_type == "user":
        tp.renew_admin_identity()
        assert metric(diag, "ca_rotation_renewals_total") >= rotations_before + 4
        renews_normally(h, p, diag)
        return
    assert metric(diag, "ca_rotation_renewals_total") >= rotations_before + 4, "one renewal per phase"
    ca_after = (h.dest / "teleport-host-ca.crt").read_bytes()
    assert ca_after != ca_before and host_cas_in_kubeconfig(h) == ca_after
    assert ca_before not in ca_after, "after standby only the new host CA is trusted"
    assert "CA rotation" in h.log()
    renews_normally(h, p, diag)


@pytest.fixture(scope="module")
def systemd_host(own_bed, tmp_path_factory):
    """A real systemd host (Debian 12, systemd-nspawn) rolled out by playbooks/rollout.yml with the role's
    defaults (renewal_interval 20m, certificate_ttl 1h, the hardened unit) against the private bed."""
    with rolled_out_rig(tmp_path_factory.mktemp("rot-host"), own_bed.teleport["multiplex"], own_bed.kube, "rot",
                        SYSTEMD_HOST) as rig:
        yield rig


def test_reader_follows_a_manual_host_ca_rotation_on_a_systemd_host(own_bed, systemd_host):
    """TLS routing (multiplex), the role's defaults, the hardened unit."""
    rig = systemd_host
    host = rig.fleet.hosts[SYSTEMD_HOST]
    ca_file = "/opt/machine-id/teleport-host-ca.crt"
    ca_before = host.run(["cat", ca_file]).stdout
    since = host.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    reader = Reader.of_systemd_host(rig.fleet, SYSTEMD_HOST)
    try:
        manual_host_rotation(own_bed.teleport["multiplex"], reader)
    finally:
        reader.report("manual host CA rotation, TLS routing, systemd host")
    journal = rig.sh("journalctl -u machine-id --no-pager -o cat --since '%s'" % since).stdout
    assert journal.count("for a CA rotation") >= 4, journal[-3000:]
    ca_after = host.run(["cat", ca_file]).stdout
    assert ca_after != ca_before and ca_before not in ca_after
    gen = rig.label_generation()
    rig.usr1()
    wait_for(lambda: (rig.label_generation() or 0) > (gen or 0), 60, "a renewal after the rotation")
    assert rig.active_state() == "active"
    assert rig.fleet.reader_get_pods(SYSTEMD_HOST).returncode == 0


def test_systemd_host_stopped_through_a_user_ca_rotation_is_re_enrolled_by_one_rollout(own_bed, systemd_host):
    """The bot's certificate is signed by a user CA the cluster dropped: no trust path can save it. status says
    untrusted (and the bot is not locked), and one rollout re-enrols the host."""
    rig = systemd_host
    tp = own_bed.teleport["multiplex"]
    host = rig.fleet.hosts[SYSTEMD_HOST]
    rig.sh("systemctl stop machine-id")
    for phase in PHASES:
        rotate(tp, "user", phase)
        teleport_ready(tp)
    tp.renew_admin_identity()  # the controller's tctl identity was signed by the dropped user CA too
    rig.sh("systemctl start --no-block machine-id")
    # the agent gives the identity up after 90 s of failures with no success (rotation.USER_CA_GONE_AFTER)
    wait_for(lambda: agent_status(host)["identity"]["state"] == "untrusted", 240, "status untrusted", interval=2)
    st = agent_status(host)["identity"]
    assert "user CA" in st["problem"] and "re-enrol" in st["fix"], st
    assert not rig.locks(), "the bot is not locked"
    run = rig.fleet.rollout()
    assert run.rc == 0, run.stdout[-6000:]
    wait_for(lambda: rig.fleet.reader_get_pods(SYSTEMD_HOST).returncode == 0, 60, "the reader after re-enrolment")
    assert agent_status(host)["identity"]["state"] == "ok"


def test_reader_follows_an_automatic_user_ca_rotation(own_bed, make_host):
    """The fastest rotation v13 allows (--grace-period=1s; 0s is refused): its phases follow each other on the auth
    server's own schedule, and from update_clients on only certificates of the new user CA stay valid."""
    tp, h, p, diag = started_agent(own_bed, "multiplex", make_host)
    reader = Reader.of_process_host(h)
    try:
        with reader:
            r = tp.tctl("auth", "rotate", "--type=user", "--grace-period=1s")
            assert r.returncode == 0, r.stderr[-400:]
            wait_for(lambda: ca_state(tp, "user")[0] == "in_progress", 30, "the user CA rotation to start")
            wait_for(lambda: ca_state(tp, "user")[0] == "standby", 240, "the user CA rotation to finish", interval=1)
            teleport_ready(tp)
            tp.renew_admin_identity()
            time.sleep(15)
    finally:
        reader.report("automatic user CA rotation (grace 1s), TLS routing, agent process")
    failed = reader.failed
    assert len(failed) <= MAX_FAILED_READS, "%d of %d reads failed: %s" % (len(failed), len(reader.reads), failed)
    if CONTROL is None:
        assert metric(diag, "ca_rotation_renewals_total") >= 2
    renews_normally(h, p, diag)


def test_agent_stopped_through_a_host_ca_rotation_recovers_by_itself(own_bed, make_host):
    """Stopped before init, started after standby: trust re-established through the proxy's verified answer, the
    reader back within a minute, no new token. (A missed user CA rotation: the systemd-host test above.)"""
    tp, h, p, diag = started_agent(own_bed, "multiplex", make_host)
    h.stop()
    for phase in PHASES:
        rotate(tp, "host", phase)
        teleport_ready(tp)
    p = h.start("agent-2.log")
    t0 = time.monotonic()
    try:
        wait_for(lambda: h.pods_as(APP_USER).returncode == 0 and http_get("http://%s/readyz" % diag)[0] == 200, 60,
                 "the reader after the missed host rotation")
    except AssertionError as exc:
        raise AssertionError("%s\nagent log:\n%s" % (exc, h.log("agent-2.log")[-5000:])) from None
    print("reader back %.1f s after the start" % (time.monotonic() - t0))
    log = h.log("agent-2.log")
    assert "trust in the auth server re-established through the host CA served by the proxy" in log, log[-3000:]
    st = h.status()
    assert st["identity"]["state"] == "ok" and st["identity"]["ca_trust"]["state"] == "recovered"
    assert "join" not in log.split("re-established")[1], "no new join"
    renews_normally(h, p, diag)
