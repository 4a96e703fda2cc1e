# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The role's templates rendered by real Ansible: tbot.yaml must load in the agent's own config
parser with the values given, and the unit must score <= 2.0 in `systemd-analyze security`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers.playbook import run_playbook

ROLE = Path(__file__).resolve().parents[3] / "roles" / "machine_id"
PIN = "sha256:" + "ab" * 32
TOKEN = "s3cr3t-join-token-0123456789"


def render(tmp_path: Path, **extra) -> tuple[str, str]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    vars_ = {"role_dir": str(ROLE), "out_dir": str(out), "_machine_id_systemd_version": 252,
             "machine_id_kubernetes_cluster": "example-k8s-cluster"}
    vars_.update(extra)
    run = run_playbook(tmp_path / "run", ROLE.parent.parent / "tests" / "unit" / "role" / "render.yml", extra_vars=vars_)
    assert run.rc == 0, run.stdout[-3000:]
    return (out / "tbot.yaml").read_text(), (out / "machine-id.service").read_text()


def agent_config(text: str, tmp_path: Path, token_path: str):
    from machine_id_agent import config  # the real agent's parser

    # The config names the token file by absolute path; point it at a test file.
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    return config.parse(yaml.safe_load(text.replace(token_path, str(tok))), source=tmp_path / "tbot.yaml")


def test_tbot_yaml_guide_shape_loads_in_the_agent(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    text, dummy = render(tmp_path, machine_id_auth_server="teleport.example.com:443", machine_id_ca_pins=[PIN],
                         machine_id_token=TOKEN, machine_id_ca_path=str(ca))
    assert TOKEN not in text, "the join token must live in its own 0600 file, not in tbot.yaml"
    cfg = agent_config(text, tmp_path, "/etc/machine-id-agent/token")
    assert cfg.auth_server == "teleport.example.com:443" and cfg.proxy_server is None
    assert cfg.join_method == "token" and cfg.token == TOKEN
    assert cfg.ca_pins == [PIN] and cfg.ca_path == ca
    assert str(cfg.storage_dir) == "/var/lib/teleport/bot"
    assert [(str(o.destination), o.kubernetes_cluster, o.readers) for o in cfg.outputs] == [
        ("/opt/machine-id", "example-k8s-cluster", ["app"])]
    assert (cfg.credential_ttl, cfg.renewal_interval, cfg.acls, cfg.insecure) == (3600, 1200, "try", False)
    assert "exec_plugin: true" in text and cfg.outputs[0].exec_plugin, "the exec-plugin kubeconfig by default"


def test_tbot_yaml_proxy_several_destinations_and_odd_values(tmp_path):
    odd = 'we"ird: cluster #1'
    text, unit = render(
        tmp_path, machine_id_proxy_server="localhost:3080", machine_id_reader_user="",
        machine_id_certificate_ttl="2h", machine_id_renewal_interval="30m", machine_id_acls="required",
        machine_id_diag_addr="127.0.0.1:9191",
        machine_id_kubeconfig_exec_plugin=False,
        machine_id_destinations=[{"directory": "/opt/a", "kubernetes_cluster": odd, "roles": ["kube-a"]},
                                 {"directory": "/opt/b", "kubernetes_cluster": "b", "exec_plugin": True}])
    cfg = agent_config(text, tmp_path, "/etc/machine-id-agent/token")
    assert cfg.proxy_server == "localhost:3080" and cfg.auth_server is None
    assert [(str(o.destination), o.kubernetes_cluster, o.roles, o.readers) for o in cfg.outputs] == [
        ("/opt/a", odd, ["kube-a"], []), ("/opt/b", "b", [], [])]
    # the role-wide opt-out, and a destination's own key over it
    assert [o.exec_plugin for o in cfg.outputs] == [False, True]
    assert (cfg.credential_ttl, cfg.renewal_interval, cfg.acls, cfg.diag_addr) == (7200, 1800, "required", "127.0.0.1:9191")
    assert "ReadWritePaths=/var/lib/teleport/bot /opt/a /opt/b\n" in unit


def _unit_settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


@pytest.mark.parametrize("systemd_version", [252, 254])
def test_unit_directives_follow_systemd_version(tmp_path, systemd_version):
    dummy, unit = render(tmp_path, machine_id_proxy_server="localhost:3080", _machine_id_systemd_version=systemd_version)
    s = _unit_settings(unit)
    assert s["Type"] == ["notify"] and s["WatchdogSec"] == ["120"]
    assert s["ExecStart"] == ["/opt/machine-id-agent/bin/machine-id-agent start -c /etc/tbot.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"] and s["RestartSec"] == ["5"]
    assert s["User"] == ["teleport"] and s["UMask"] == ["0077"] and s["ProtectSystem"] == ["strict"]
    # RestartSteps/RestartMaxDelaySec exist from systemd 254; Debian 12 has 252 and would warn.
    assert ("RestartSteps" in s) is (systemd_version >= 254)
    assert ("RestartMaxDelaySec" in s) is (systemd_version >= 254)
    assert "IPAddressDeny" not in s


def test_unit_security_exposure_at_most_2(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing. Fix: apt-get install systemd", pytrace=False)
    dummy, unit = render(tmp_path, machine_id_proxy_server="localhost:3080", machine_id_ip_address_allow=["localhost"])
    assert "IPAddressDeny=any\nIPAddressAllow=localhost\n" in unit
    path = tmp_path / "machine-id.service"
    path.write_text(unit)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
                          capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for machine-id.service: ([0-9.]+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout
    # and the guide's own unit is far worse (the reference says 9.2)
    guide = tmp_path / "guide" / "machine-id.service"
    guide.parent.mkdir()
    guide.write_text("[Unit]\nDescription=x\n[Service]\nType=simple\nUser=teleport\nGroup=teleport\n"
                     "Restart=on-failure\nExecStart=/usr/local/bin/tbot start -c /etc/tbot.yaml\n"
                     "ExecReload=/bin/kill -HUP $MAINPID\n[Install]\nWantedBy=multi-user.target\n")
    g = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(guide)],
                       capture_output=True, text=True, check=False)
    gm = re.search(r"Overall exposure level for machine-id.service: ([0-9.]+)", g.stdout)
    assert gm and float(gm.group(1)) > 8.0
