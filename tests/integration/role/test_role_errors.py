# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The role on a real systemd host (tests/hosts), without a Teleport bed: bad input fails early
with one clear message and changes nothing, a fresh host without a token is refused before any
config is written, and the token never shows up in -vvv output, tbot.yaml or argv-visible places."""

from __future__ import annotations

import os
import shutil

import pytest

from helpers.playbook import run_playbook

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLAY = """
- hosts: all
  gather_facts: false
  roles:
    - role: lanyard.machine_id.machine_id
"""
GOOD = {"machine_id_proxy_server": "localhost:1", "machine_id_kubernetes_cluster": "example-k8s-cluster"}
TOKEN = "leakcheck-7f3a9c2e41b86d05"


@pytest.fixture(scope="module")
def host():
    from hosts import Host, HostError

    if shutil.which("systemd-nspawn") is None or shutil.which("debootstrap") is None:
        pytest.fail("systemd-nspawn/debootstrap missing. Fix: apt-get install systemd-container debootstrap",
                    pytrace=False)
    try:
        h = Host.start(f"lanyard-err-{os.getpid()}")
    except HostError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield h
    h.stop()


def play(tmp_path, host, extra, **kw):
    inv = tmp_path / "inventory.ini"
    inv.write_text(f"{host.name} ansible_connection=lanyard_nspawn ansible_python_interpreter=/usr/bin/python3\n")
    from hosts import CONNECTION_PLUGINS

    env = {"ANSIBLE_CONNECTION_PLUGINS": str(CONNECTION_PLUGINS), "ANSIBLE_PIPELINING": "1",
           "ANSIBLE_HOME": str(tmp_path / "ansible-home")}
    return run_playbook(tmp_path / "run", PLAY, extra_vars=extra, inventory=inv, env=env, **kw)


def _exists(host, path: str) -> bool:
    return host.run(["test", "-e", path], check=False).returncode == 0


@pytest.mark.parametrize("extra, words", [
    ({"machine_id_proxy_server": "localhost:1"}, ["machine_id_kubernetes_cluster", "tsh kube ls"]),
    (dict(GOOD, machine_id_auth_server="teleport.example.com:443"), ["exactly one of machine_id_proxy_server"]),
    (dict(GOOD, machine_id_proxy_server="https://teleport.example.com"), ["host:port"]),
    (dict(GOOD, machine_id_ca_pins=["sha256:nothex"]), ["CA pins look like sha256:"]),
    (dict(GOOD, machine_id_reader_user="teleport"), ["reader user must differ"]),
    (dict(GOOD, machine_id_acls="sometimes"), ["machine_id_acls", "try, required, off"]),
    (dict(GOOD, machine_id_reload_units=[{"unit": "myapp"}]),
     ["machine_id_reload_units is wrong", 'entry 1 (unit myapp): unit must be a systemd service name ending in .service',
      "Fix: give each entry unit:"]),
    (dict(GOOD, machine_id_reload_units=[{"unit": "myapp.service", "action": "bounce"}]),
     ["machine_id_reload_units", "reload, restart, reload-or-restart", "bounce"]),
    (dict(GOOD, machine_id_reload_units=[{"unit": "myapp.service", "destination": "/opt/elsewhere"}]),
     ["machine_id_reload_units is wrong", 'destination /opt/elsewhere is not one of the outputs',
      "one of the output directories (/opt/machine-id"]),
    (dict(GOOD, machine_id_reload_units=[{"unit": "myapp.service"}, {"unit": "myapp.service", "action": "restart"}]),
     ["machine_id_reload_units is wrong", 'entry 2 (unit myapp.service): name myapp is used by another entry', "distinct name:"]),
])
def test_bad_input_fails_in_preflight_and_changes_nothing(tmp_path, host, extra, words):
    run = play(tmp_path, host, extra)
    assert run.rc != 0, run.stdout[-2000:]
    for w in words:
        assert w in run.stdout, f"{w!r} missing from the failure:\n{run.stdout[-2000:]}"
    assert "Traceback" not in run.stdout
    assert not [r for r in run.results if r["status"] == "changed"], "preflight must not change the host"
    assert not _exists(host, "/etc/tbot.yaml") and not _exists(host, "/opt/machine-id-agent")


def test_fresh_host_without_token_is_refused_before_any_config(tmp_path, host):
    run = play(tmp_path, host, GOOD)
    assert run.rc != 0
    assert "holds no valid identity, so it needs a join token" in run.stdout, run.stdout[-2000:]
    assert "Traceback" not in run.stdout
    assert not _exists(host, "/etc/tbot.yaml"), "no config may be written for a host that cannot join"


def test_token_is_never_shown_and_lives_only_in_its_0600_file(tmp_path, host):
    # Up to the configure phase (no Teleport here, so the service would not start): -vvv, diff.
    run = play(tmp_path, host, dict(GOOD, machine_id_token=TOKEN), verbosity=3, diff=True,
               extra_args=["--tags", "machine_id_preflight,machine_id_install,machine_id_configure"])
    assert run.rc == 0, run.stdout[-3000:]
    assert TOKEN not in run.stdout, "the join token leaked into -vvv/--diff output"
    assert "token: \"/etc/machine-id-agent/token\"" in host.run(["cat", "/etc/tbot.yaml"]).stdout
    assert TOKEN not in host.run(["cat", "/etc/tbot.yaml"]).stdout
    st = host.run(["stat", "-c", "%U %a", "/etc/machine-id-agent/token", "/etc/tbot.yaml",
                   "/var/lib/teleport/bot"]).stdout.split("\n")
    assert st[:3] == ["teleport 600", "teleport 600", "teleport 700"], st
    assert host.run(["cat", "/etc/machine-id-agent/token"]).stdout.strip() == TOKEN
    # The agent is installed from the copied wheels, no index: its CLI answers, and the destination
    # got the reader ACL from `machine-id-agent init`.
    acl = host.run(["getfacl", "-cp", "/opt/machine-id"]).stdout.split()
    assert "user:app:r-x" in acl and "other::---" in acl, acl
    # Rerun with no token: the identity is still missing, so the role refuses again, and the
    # existing token file is left as it is.
    again = play(tmp_path, host, GOOD, extra_args=["--tags", "machine_id_preflight,machine_id_configure"])
    assert again.rc != 0 and "needs a join token" in again.stdout
    assert host.run(["cat", "/etc/machine-id-agent/token"]).stdout.strip() == TOKEN
