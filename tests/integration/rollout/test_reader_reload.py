# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 16 point 3: a reader's service is told about each renewal by systemd, not by the agent.

A private bed (TLS routing) and one systemd-nspawn Debian 12 host. The host runs a demo reader,
``demo-reader.service`` (user ``app``), whose ``ExecReload=`` appends one line per reload to a counter file with
a hash of the kubeconfig it read then, and whose ``ExecStart=`` appends one line per start to another. The rollout
sets ``machine_id_reload_units`` for that host; the role installs ``machine-id-reload-demo-reader.path`` (systemd
watches ``/opt/machine-id/kubeconfig.yaml``) and its oneshot ``.service``. The tests count, over several
renewals, the agent's writes (its journal) against the reader's reloads, then restarts, then nothing once the
entry is removed.
"""

from __future__ import annotations

import time

import pytest

import testbed as tb
from helpers.fleet import Fleet, agent_status, changed_by_host, wait_for

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

HOST = "rl-app"
UNIT = "machine-id-reload-demo-reader"
UNIT_FILES = [f"/etc/systemd/system/{UNIT}.path", f"/etc/systemd/system/{UNIT}.service"]
STATE = "/var/lib/demo-reader"
WROTE = "wrote Kubernetes credentials for example-k8s-cluster to /opt/machine-id;"
RENEWAL_S = 20
DEMO_UNIT = f"""[Unit]
Description=Demo reader of the Machine ID kubeconfig (counts its starts and reloads)

[Service]
User=app
StateDirectory=demo-reader
ExecStart=/bin/sh -c 'echo start >> {STATE}/starts; exec sleep infinity'
ExecReload=/bin/sh -c 'echo "reload $$(sha256sum < /opt/machine-id/identity | cut -c1-16)" >> {STATE}/reloads'

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture(scope="module")
def fleet(bed, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("reader-reload"), teleport=bed.teleport["multiplex"], kube=bed.kube)
    try:
        # A renewal every 20 s (certificates of 1 min) instead of the default 20 min, so that several renewals,
        # each of which must give exactly one reload, fit in a test run of a few minutes.
        f.host_vars[HOST] = {"machine_id_certificate_ttl": "1m", "machine_id_renewal_interval": f"{RENEWAL_S}s",
                             "machine_id_reload_units": [{"unit": "demo-reader.service"}]}
        f.add_hosts([HOST])
        yield f
    finally:
        f.stop()


def _assert_ok(run):
    assert run.rc == 0, run.stdout[-6000:]


def _sh(fleet, script: str) -> str:
    return fleet.hosts[HOST].run(["sh", "-c", script], check=False).stdout


def _writes(fleet) -> int:
    """kubeconfig writes of the agent to /opt/machine-id so far (one per renewal of that output)."""
    log = _sh(fleet, "journalctl -u machine-id.service -o cat --no-pager")
    return sum(1 for line in log.splitlines() if WROTE in line)


def _lines(fleet, name: str) -> list[str]:
    return _sh(fleet, f"cat {STATE}/{name} 2>/dev/null").splitlines()


def _unit_files(fleet) -> str:
    return _sh(fleet, "ls /etc/systemd/system | grep '^machine-id-reload-' || true").strip()


def _measure(fleet, renewals: int):
    """Counters over a window of at least ``renewals`` renewals, taken at quiet points: a few seconds after a write
    (the reaction to it takes milliseconds; the next renewal is ~20 s away). Returns (writes, reloads, starts, the
    reload lines of the window)."""
    def quiet_point():
        w = _writes(fleet)
        assert wait_for(lambda: _writes(fleet) > w, RENEWAL_S * 3, 0.5), "the agent wrote nothing for 60 s"
        time.sleep(3)
        return _writes(fleet), _lines(fleet, "reloads"), _lines(fleet, "starts")

    w0, r0, s0 = quiet_point()
    assert wait_for(lambda: _writes(fleet) >= w0 + renewals - 1, RENEWAL_S * (renewals + 2), 0.5)
    w1, r1, s1 = quiet_point()
    return w1 - w0, len(r1) - len(r0), len(s1) - len(s0), r1[len(r0):]


def test_0_check_mode_on_a_fresh_host_with_reload_units_passes_and_writes_nothing(fleet):
    run = fleet.rollout(check=True, diff=True)
    _assert_ok(run)
    assert changed_by_host(run).get(HOST, 0) > 0
    assert _unit_files(fleet) == ""


def test_1_rollout_wires_the_reader_and_each_renewal_reloads_it_exactly_once(fleet):
    run = fleet.rollout()
    _assert_ok(run)
    h = fleet.hosts[HOST]
    assert _unit_files(fleet).split() == [f"{UNIT}.path", f"{UNIT}.service"]
    assert _sh(fleet, f"systemctl is-enabled {UNIT}.path; systemctl is-active {UNIT}.path").split() == [
        "enabled", "active"]
    # the agent keeps no privilege: same unprivileged unit, and no reload_command in its config
    show = _sh(fleet, "systemctl show machine-id.service -p User -p CapabilityBoundingSet -p NoNewPrivileges")
    assert sorted(show.split()) == ["CapabilityBoundingSet=", "NoNewPrivileges=yes", "User=teleport"], show
    assert "reload_command" not in _sh(fleet, "cat /etc/tbot.yaml")

    h.run(["sh", "-c", "cat > /etc/systemd/system/demo-reader.service"], input=DEMO_UNIT)
    h.run(["systemctl", "daemon-reload"])
    h.run(["systemctl", "enable", "--now", "demo-reader.service"])
    gen0 = agent_status(h)["identity"]["generation"]
    writes, reloads, starts, lines = _measure(fleet, 4)
    gen1 = agent_status(h)["identity"]["generation"]
    print(f"reload: writes={writes} reloads={reloads} starts={starts} generation {gen0}->{gen1}")
    assert writes >= 4 and gen1 > gen0, (writes, gen0, gen1)
    assert (reloads, starts) == (writes, 0), (writes, reloads, starts)
    # every reload read credentials no earlier reload had seen (it ran after the new ones were in place), the last
    # one the file as it is now. The reader hashes `identity`, what the default kubeconfig's exec plugin hands
    # out: the kubeconfig itself is the same text at every renewal in that mode (it is still replaced each time).
    hashes = [line.split()[1] for line in lines]
    assert len(set(hashes)) == len(hashes), lines
    now = _sh(fleet, "sha256sum < /opt/machine-id/identity | cut -c1-16").strip()
    assert hashes[-1] == now
    # systemd started the oneshot once per reload; it never failed, nor did the .path unit
    assert _sh(fleet, f"systemctl is-failed {UNIT}.service {UNIT}.path").split() == ["inactive", "active"]
    journal = _sh(fleet, f"journalctl -u {UNIT}.service -o cat --no-pager")
    assert "stat:" not in journal and "Failed" not in journal, journal[-2000:]


def test_2_rerun_changes_nothing(fleet):
    run = fleet.rollout()
    _assert_ok(run)
    assert changed_by_host(run).get(HOST) == 0, changed_by_host(run)


def test_3_restart_action_restarts_the_reader_once_per_renewal(fleet):
    fleet.host_vars[HOST]["machine_id_reload_units"] = [{"unit": "demo-reader.service", "action": "restart"}]
    run = fleet.rollout()
    _assert_ok(run)
    assert changed_by_host(run).get(HOST, 0) > 0
    assert _sh(fleet, f"systemctl cat {UNIT}.service | grep -o 'demo-reader.service restart$'").strip() == \
        "demo-reader.service restart"
    pid0 = _sh(fleet, "systemctl show -p MainPID --value demo-reader.service").strip()
    writes, reloads, starts, _lines_ = _measure(fleet, 3)
    print(f"restart: writes={writes} reloads={reloads} starts={starts}")
    assert writes >= 3 and (starts, reloads) == (writes, 0), (writes, reloads, starts)
    assert _sh(fleet, "systemctl show -p MainPID --value demo-reader.service").strip() != pid0
    assert _sh(fleet, "systemctl is-active demo-reader.service").strip() == "active"


def test_4_removing_the_entry_removes_the_units_and_stops_the_reloads(fleet):
    fleet.host_vars[HOST]["machine_id_reload_units"] = []
    run = fleet.rollout()
    _assert_ok(run)
    assert _unit_files(fleet) == ""
    # systemd forgot them (daemon-reload after the removal), and nothing is left running or enabled
    assert _sh(fleet, f"systemctl show -p LoadState --value {UNIT}.path {UNIT}.service").split() == [
        "not-found", "not-found"]
    assert _sh(fleet, "ls /etc/systemd/system/paths.target.wants 2>/dev/null | grep machine-id-reload").strip() == ""
    writes, reloads, starts, _lines_ = _measure(fleet, 2)
    print(f"removed: writes={writes} reloads={reloads} starts={starts}")
    assert writes >= 2 and (reloads, starts) == (0, 0), (writes, reloads, starts)
    run = fleet.rollout()
    _assert_ok(run)
    assert changed_by_host(run).get(HOST) == 0, changed_by_host(run)
    r = fleet.reader_get_pods(HOST)
    assert r.returncode == 0 and f"pod/{tb.DEMO_POD}" in r.stdout, r.stderr
