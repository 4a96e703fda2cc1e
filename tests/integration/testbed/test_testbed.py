# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The test bed itself: admin access both ways, kube impersonation rights, and a teardown that leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import testbed as tb

pytestmark = [pytest.mark.testbed]
TESTS = Path(__file__).resolve().parents[2]


def test_admin_tctl_local_and_remote(teleport):
    local = teleport.tctl("status", check=True).stdout
    remote = teleport.tctl("status", remote=True, check=True).stdout
    assert tb.CLUSTER_NAME in local and tb.CLUSTER_NAME in remote
    assert teleport.status_ca_pin() in remote


def test_kube_cluster_registered_and_teleport_may_impersonate(testbed, teleport):
    servers = json.loads(teleport.tctl("get", "kube_server", "--format=json", check=True).stdout)
    assert tb.KUBE_CLUSTER_NAME in json.dumps(servers)
    for resource in ("users", "groups", "serviceaccounts"):
        r = testbed.kube.kubectl("auth", "can-i", "impersonate", resource, "--as=teleport-kube")
        assert r.stdout.strip() == "yes", (resource, r.stdout, r.stderr)
    log = teleport.process.log_path.read_text(errors="replace")
    warned = [line for line in log.splitlines() if " WARN " in line and "impersonation" in line.lower()]
    assert not warned, f"kubernetes_service warned about its impersonation rights: {warned[:2]}"


def test_demo_namespace_has_the_pod(kube):
    out = kube.kubectl("get", "pods", "-n", tb.DEMO_NAMESPACE, "-o", "name", check=True).stdout
    assert f"pod/{tb.DEMO_POD}" in out


def test_ping_reports_listener_mode(teleport):
    ping = teleport.ping()
    assert ping["cluster_name"] == tb.CLUSTER_NAME
    assert ping["proxy"]["tls_routing_enabled"] is (teleport.mode == "multiplex")
    if teleport.mode == "separate":
        assert ping["proxy"]["kube"]["public_addr"] == teleport.kube_public_addr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_no_process_outlives_a_killed_owner(testbed_bins, tmp_path):
    """SIGKILL the Python process that owns a bed: etcd, kube-apiserver and teleport die with it."""
    script = (
        "import json, sys, time\n"
        "from testbed import Testbed\n"
        "bed = Testbed.start(modes=('multiplex',))\n"
        "pids = [p.pid for p in bed.kube.procs] + [p.pid for t in bed.teleport.values() for p in t.procs]\n"
        "print(json.dumps(pids), flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(TESTS)))
    try:
        line = owner.stdout.readline()
        pids = json.loads(line)
        assert len(pids) == 3 and all(_alive(p) for p in pids)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], "bed processes survived their owner"
