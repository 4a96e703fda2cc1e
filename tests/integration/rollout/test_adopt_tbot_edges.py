# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 16 points 6 and 3, what users meet when things go wrong: taking over hosts set up by hand with the real
tbot (v13.3.8), on the real bed and real systemd hosts, with default settings.

Hosts (built by hand per the guide, tests/helpers/tbot_by_hand.py):

- ``te-1`` (Debian 12, the guide's unit ``machine-id.service``, bot ``edge-1``): ``--check --diff`` changes
  nothing; ``--tags machine_id_configure`` and ``--tags machine_id_service`` on their own refuse and leave tbot
  running; with the storage on a full tmpfs the takeover fails clearly without losing the identity, and after
  space is freed a rerun completes it with no token. Then the readers' reload ``.path`` unit: stopped, it is found
  and started by the next rollout; failed (``unit-start-limit-hit``), verify names it and the fix.
- ``te-2`` (Debian 12, ``tbot.service``, bot ``edge-2``): tbot runs while its stored identity is partial (``key``
  missing), then mismatched (``tlscert`` of te-4's bot): the rollout refuses with one line, mints no token and
  touches nothing; the fix the message names (``systemctl reload tbot``) makes the next rollout take it over.
- ``te-3`` (Debian 13 trixie, ``tbot.service``, bot ``edge-3``) and ``te-4`` (Debian 12, ``tbot.service``, bot
  ``edge-4``) in ONE batch with te-4 powered off: te-3 is taken over (and its reader is reloaded on a renewal),
  te-4 is reported unreachable and, powered on again, is exactly as it was.
"""

from __future__ import annotations

import json
import time

import pytest

from helpers.fleet import Fleet, agent_status, changed_by_host, wait_for
from helpers.tbot_by_hand import (DEST, STORAGE, build_by_hand, control_plane_by_hand, sh, tbot_processes,
                                  tree_digest, tree_digest_inside, unit_state)

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

T1, T2, T3, T4 = "te-1", "te-2", "te-3", "te-4"
BOTS = {T1: "edge-1", T2: "edge-2", T3: "edge-3", T4: "edge-4"}
UNITS = {T1: "machine-id", T2: "tbot", T3: "tbot", T4: "tbot"}
RELOAD = "machine-id-reload-demo-reader"
READER_STATE = "/var/lib/demo-reader"
DEMO_READER = f"""[Unit]
Description=Demo reader of the Machine ID kubeconfig (counts its reloads)

[Service]
User=app
StateDirectory=demo-reader
ExecStart=/bin/sh -c 'exec sleep infinity'
ExecReload=/bin/sh -c 'echo reload >> {READER_STATE}/reloads'

[Install]
WantedBy=multi-user.target
"""


@pytest.fixture(scope="module")
def fleet(bed, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("adopt-edges"), teleport=bed.teleport["multiplex"], kube=bed.kube)
    try:
        f.add_hosts([T1, T2, T4])
        f.add_hosts([T3], release="trixie")
        control_plane_by_hand(f.teleport, f.kube, f.workdir)
        for name in (T1, T2, T3, T4):
            build_by_hand(f, bed, name, BOTS[name], UNITS[name])
        yield f
    finally:
        f.stop()


def _failed_lines(run, host):
    return [line for line in run.stdout.splitlines() if line.startswith(f"fatal: [{host}]")]


def _untouched(fleet, name, before_storage, before_dest, pid):
    """tbot still runs (same process), its files and outputs unchanged, no agent identity, the reader reads."""
    host = fleet.hosts[name]
    state = unit_state(host, UNITS[name])
    assert (state[0], state[2]) == ("active", pid), (state, pid)
    assert tree_digest(host, STORAGE) == before_storage
    assert tree_digest(host, DEST) == before_dest
    assert not (host.root / STORAGE.lstrip("/") / "identity.json").exists()
    assert not (host.root / STORAGE.lstrip("/") / "adopted-from-tbot").exists()
    assert fleet.reader_get_pods(name).returncode == 0


def _taken_over(fleet, name):
    host = fleet.hosts[name]
    status = agent_status(host)
    assert status["identity"]["state"] == "ok" and status["identity"]["bot"] == BOTS[name], status
    assert not tbot_processes(host), tbot_processes(host)
    # inside the host: te-1's storage is a tmpfs mounted in the host's own mount namespace
    assert sh(host, f"test -f {STORAGE}/adopted-from-tbot/tlscert", check=False).returncode == 0
    journal = sh(host, "journalctl -u machine-id --no-pager -o cat", check=False).stdout
    assert "adopted the identity tbot left in" in journal and "joining the cluster" not in journal, journal[-3000:]
    assert fleet.reader_get_pods(name).returncode == 0


def test_1_check_mode_and_a_tag_on_its_own_change_nothing_on_a_tbot_host(fleet):
    host = fleet.hosts[T1]
    storage, dest = tree_digest(host, STORAGE), tree_digest(host, DEST)
    pid = unit_state(host, UNITS[T1])[2]
    tokens = fleet.token_creations()

    check = fleet.rollout(check=True, diff=True, extra_args=["--limit", T1])
    assert check.rc == 0, check.stdout[-6000:]
    assert changed_by_host(check)[T1] > 0
    _untouched(fleet, T1, storage, dest, pid)
    assert not (host.root / "opt/machine-id-agent").exists()

    for tag in ("machine_id_configure", "machine_id_service"):
        run = fleet.rollout(extra_args=["--limit", T1, "--tags", tag])
        assert run.rc != 0, run.stdout[-6000:]
        fatal = _failed_lines(run, T1)
        print(f"[--tags {tag}]", fatal)
        assert len(fatal) == 1, run.stdout[-6000:]
        msg = json.loads(fatal[0].split("=> ", 1)[1])["msg"]
        assert "\n" not in msg and "Traceback" not in run.stdout
        assert msg.startswith(f"machine_id on {T1}: machine-id.service runs tbot on {STORAGE}; taking it over needs "
                              "the install, configure and service phases in one run"), msg
        assert "Fix: run again without --tags" in msg
        _untouched(fleet, T1, storage, dest, pid)
        assert unit_state(host, UNITS[T1])[1] == "enabled"
    assert fleet.token_creations() == tokens


def test_2_a_running_tbot_with_a_partial_or_mismatched_storage_is_refused_then_taken_over_after_the_fix(fleet):
    host = fleet.hosts[T2]
    store = host.root / STORAGE.lstrip("/")
    tokens = fleet.token_creations()
    pid = unit_state(host, "tbot")[2]
    good_tlscert = (store / "tlscert").read_bytes()
    # partial: `key` gone (kept aside to put back); mismatched: te-4's certificate (another bot, same CA) over
    # te-2's, next to te-2's key
    cases = {
        "partial": ("mv key /root/key.aside", "is incomplete (key missing or empty)"),
        "mismatched": ("mv /root/key.aside key && cp --no-preserve=all /var/tmp/other-tlscert tlscert "
                       "&& chown teleport:teleport tlscert",
                       "is mismatched: key is not the key of tlscert"),
    }
    other_tlscert = (fleet.hosts[T4].root / STORAGE.lstrip("/") / "tlscert").read_bytes()
    (host.root / "var/tmp/other-tlscert").write_bytes(other_tlscert)
    for case, (damage, why) in cases.items():
        sh(host, f"cd {STORAGE} && {damage}")
        storage, dest = tree_digest(host, STORAGE), tree_digest(host, DEST)
        run = fleet.rollout(extra_args=["--limit", T2])
        assert run.rc != 0, run.stdout[-6000:]
        fatal = _failed_lines(run, T2)
        print(f"[{case}]", fatal)
        assert len(fatal) == 1 and "Traceback" not in run.stdout, run.stdout[-6000:]
        msg = json.loads(fatal[0].split("=> ", 1)[1])["msg"]
        assert "\n" not in msg
        assert msg.startswith(f"machine_id on {T2}: tbot.service runs tbot, but tbot's identity in {STORAGE} {why}"), \
            msg
        assert "no token was minted" in msg and "systemctl reload tbot.service" in msg, msg
        assert fleet.token_creations() == tokens
        _untouched(fleet, T2, storage, dest, pid)
        assert not (host.root / "opt/machine-id-agent").exists()

    # the fix the message names: tbot renews on SIGHUP and writes its whole identity again
    sh(host, "systemctl reload tbot.service")
    assert wait_for(lambda: (store / "tlscert").read_bytes() not in (good_tlscert, other_tlscert), timeout=60), \
        sh(host, "journalctl -u tbot --no-pager -o cat | tail -20", check=False).stdout
    time.sleep(2)  # tbot writes its files one after the other
    run = fleet.rollout(extra_args=["--limit", T2])
    assert run.rc == 0, run.stdout[-8000:]
    assert fleet.token_creations() == tokens
    _taken_over(fleet, T2)
    assert unit_state(host, "tbot")[:2] == ("inactive", "disabled")


def test_3_a_full_storage_fails_the_takeover_clearly_keeps_the_identity_and_a_rerun_completes_it(fleet):
    host = fleet.hosts[T1]
    # tbot's storage onto a 1 MiB tmpfs (tbot stopped for the move: it holds its lock on the old directory), tbot
    # started again on it, then the tmpfs filled up
    sh(host, f"systemctl stop machine-id && rm -rf /root/te-bot && cp -a {STORAGE} /root/te-bot && "
             f"mount -t tmpfs -o size=1m,mode=0700,uid=$(id -u teleport),gid=$(id -g teleport) te-full {STORAGE} && "
             f"cp -a /root/te-bot/. {STORAGE}/ && systemctl start machine-id")
    assert wait_for(lambda: unit_state(host, "machine-id")[0] == "active", 30)
    # tbot renews once when it starts (and rewrites tlscert, key-cert.pub): let that finish before the snapshot
    assert wait_for(lambda: sh(host, "journalctl -u machine-id -o cat --no-pager --since=-60s", check=False).stdout
                    .count("Persisted certificates successfully") >= 1, 60)
    sh(host, f"dd if=/dev/zero of={STORAGE}/filler bs=4k 2>/dev/null; sync", check=False)
    assert sh(host, f"df -k --output=avail {STORAGE} | tail -1").stdout.strip() == "0"
    tbot_files = {k: v for k, v in tree_digest_inside(host, STORAGE).items() if k != "filler"}
    tokens = fleet.token_creations()

    run = fleet.rollout(extra_args=["--limit", T1])
    assert run.rc != 0, run.stdout[-8000:]
    fatal = _failed_lines(run, T1)
    print("[full storage]", fatal)
    assert len(fatal) == 1 and "Traceback" not in run.stdout, run.stdout[-8000:]
    msg = json.loads(fatal[0].split("=> ", 1)[1])["msg"]
    # verify's line: the agent not ready, and its own words from the journal (what, why, the fix)
    assert msg.startswith(f"machine_id on {T1}: machine-id.service is activating"), msg
    assert f"{STORAGE}: cannot import tbot's identity (storage {STORAGE}: only 0 KiB free" in msg, msg
    assert f"free space or fix the permissions of {STORAGE}" in msg, msg
    assert fleet.token_creations() == tokens
    # the identity is not lost: tbot's files as they were (not moved aside), no identity.json half written
    after = tree_digest_inside(host, STORAGE)
    assert {k: after.get(k) for k in tbot_files} == tbot_files, (after, tbot_files)
    assert not [k for k in after if k.startswith("identity.json") or k.startswith(".identity")], after
    assert not tbot_processes(host)

    sh(host, f"rm -f {STORAGE}/filler")
    run = fleet.rollout(extra_args=["--limit", T1])
    assert run.rc == 0, run.stdout[-8000:]
    assert fleet.token_creations() == tokens
    _taken_over(fleet, T1)
    run = fleet.rollout(extra_args=["--limit", T1])
    assert run.rc == 0 and changed_by_host(run)[T1] == 0, run.stdout[-6000:]


def _install_demo_reader(host):
    (host.root / "etc/systemd/system/demo-reader.service").write_text(DEMO_READER)
    sh(host, "systemctl daemon-reload && systemctl enable --now demo-reader.service")


def _reloads(host) -> int:
    return len(sh(host, f"cat {READER_STATE}/reloads 2>/dev/null", check=False).stdout.splitlines())


def _replace_kubeconfig(host):
    """What the agent does to the kubeconfig in a renewal: a new file renamed over it."""
    sh(host, f"cp -a {DEST}/kubeconfig.yaml {DEST}/.kc.tmp && mv {DEST}/.kc.tmp {DEST}/kubeconfig.yaml")


def test_4_verify_and_the_no_change_path_catch_a_stopped_or_failed_reload_path_unit(fleet):
    host = fleet.hosts[T1]
    _install_demo_reader(host)
    fleet.host_vars[T1] = {"machine_id_reload_units": [{"unit": "demo-reader.service"}]}
    run = fleet.rollout(extra_args=["--limit", T1])
    assert run.rc == 0, run.stdout[-6000:]
    assert unit_state(host, f"{RELOAD}.path")[:2] == ("active", "enabled")

    # stopped by hand: the next rollout's one read (agent_state) names it, the full path starts it again
    sh(host, f"systemctl stop {RELOAD}.path")
    run = fleet.rollout(extra_args=["--limit", T1])
    assert run.rc == 0, run.stdout[-6000:]
    assert f"{RELOAD}.path: inactive, expected active" in run.stdout, run.stdout[-6000:]
    assert unit_state(host, f"{RELOAD}.path")[0] == "active"
    n = _reloads(host)
    _replace_kubeconfig(host)
    assert wait_for(lambda: _reloads(host) == n + 1, 20)

    # failed: its service given a start limit by a drop-in and started too often (unit-start-limit-hit)
    dropin = host.root / f"etc/systemd/system/{RELOAD}.service.d/limit.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Unit]\nStartLimitIntervalSec=60\nStartLimitBurst=1\n")
    sh(host, "systemctl daemon-reload")
    for _renewal in range(3):
        _replace_kubeconfig(host)
        time.sleep(1.5)
    assert wait_for(lambda: unit_state(host, f"{RELOAD}.path")[0] == "failed", 20), \
        sh(host, f"systemctl status {RELOAD}.path {RELOAD}.service --no-pager", check=False).stdout
    result = sh(host, f"systemctl show {RELOAD}.path -p Result").stdout.strip()
    print("[failed path unit]", result)
    run = fleet.rollout(extra_args=["--limit", T1, "--tags", "machine_id_verify"])
    assert run.rc != 0, run.stdout[-6000:]
    fatal = _failed_lines(run, T1)
    print("[verify]", fatal)
    assert len(fatal) == 1 and "Traceback" not in run.stdout, run.stdout[-6000:]
    msg = json.loads(fatal[0].split("=> ", 1)[1])["msg"]
    assert msg.startswith(f"machine_id on {T1}: {RELOAD}.path is failed, expected active"), msg
    assert f"systemctl reset-failed {RELOAD}.path" in msg, msg

    # the cause removed, the rollout finds the failed unit and starts it; the reader is reloaded again
    dropin.unlink()
    sh(host, f"systemctl daemon-reload && systemctl reset-failed {RELOAD}.service")
    run = fleet.rollout(extra_args=["--limit", T1])
    assert run.rc == 0, run.stdout[-6000:]
    assert f"{RELOAD}.path: failed, expected active" in run.stdout, run.stdout[-6000:]
    assert unit_state(host, f"{RELOAD}.path")[0] == "active"
    n = _reloads(host)
    _replace_kubeconfig(host)
    assert wait_for(lambda: _reloads(host) == n + 1, 20)


def test_5_one_batch_trixie_host_taken_over_while_the_other_host_is_unreachable(fleet):
    """te-3 (Debian 13) and te-4 in one batch, te-4 powered off: te-3 completes (with a reader reload on a renewal
    of the real agent), te-4 is reported and, powered on again, is exactly as before."""
    t3, t4 = fleet.hosts[T3], fleet.hosts[T4]
    assert "13" in sh(t3, "cat /etc/debian_version").stdout.split(".")[0]
    _install_demo_reader(t3)
    fleet.host_vars[T3] = {"machine_id_reload_units": [{"unit": "demo-reader.service"}]}
    tokens = fleet.token_creations()
    fleet.serial = 2
    t4.power_off()
    try:
        run = fleet.rollout(extra_args=["--limit", f"{T3},{T4}"])
    finally:
        fleet.serial = 1
    print("[batches]", run.batches("Roll out the agent, in batches"))
    assert run.rc != 0, run.stdout[-6000:]
    assert f"fatal: [{T4}]: UNREACHABLE!" in run.stdout, run.stdout[-6000:]
    assert f"rollout stopped after this batch: {T4} failed or could not be reached" in run.stdout, run.stdout[-6000:]
    # the rollout's own report (a run_once task, shown under the batch's first host) is te-3's only failure line
    assert [line for line in _failed_lines(run, T3) if "rollout stopped after this batch" not in line] == []
    assert "Traceback" not in run.stdout
    assert fleet.token_creations() == tokens
    _taken_over(fleet, T3)
    assert unit_state(t3, "tbot")[:2] == ("inactive", "disabled")
    assert unit_state(t3, f"{RELOAD}.path")[:2] == ("active", "enabled")
    # a renewal by the real agent on Debian 13 (SIGUSR1 forces one) reloads the reader once
    n = _reloads(t3)
    sh(t3, "systemctl kill -s USR1 machine-id.service")
    assert wait_for(lambda: _reloads(t3) >= n + 1, 60), sh(t3, "journalctl -u machine-id -o cat -n 20", check=False)
    time.sleep(3)
    assert _reloads(t3) == n + 1

    # te-4 again: nothing was done to it; tbot (enabled) runs again at boot on its own identity, which Teleport
    # still accepts (no lock on its bot)
    t4.power_on()
    assert wait_for(lambda: unit_state(t4, "tbot")[:2] == ("active", "enabled"), 60)
    assert not (t4.root / "opt/machine-id-agent").exists()
    assert not (t4.root / "etc/systemd/system/machine-id.service").exists()
    assert not (t4.root / STORAGE.lstrip("/") / "identity.json").exists()
    assert not (t4.root / STORAGE.lstrip("/") / "adopted-from-tbot").exists()
    assert wait_for(lambda: fleet.reader_get_pods(T4).returncode == 0, 60)
    assert f"bot-{BOTS[T4]}" not in fleet.teleport.tctl("get", "locks", check=True).stdout
