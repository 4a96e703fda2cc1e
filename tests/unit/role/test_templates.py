# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The role's templates rendered by real Ansible: tbot.yaml must load in the agent's own config
parser with the values given, and the unit must score <= 2.0 in `systemd-analyze security`."""

from __future__ import annotations

import json
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


def test_reload_units_defaults_names_and_what_they_run(tmp_path):
    """machine_id_reload_units: defaults filled in (action reload, the first output, name from the unit), the .path
    unit watches the kubeconfig of its destination, the oneshot runs `systemctl <action> <unit>` only for an active
    unit, with no start limit (a limit hit would fail the .path unit for good)."""
    render(tmp_path, machine_id_proxy_server="localhost:3080",
           machine_id_destinations=[{"directory": "/opt/a", "kubernetes_cluster": "a"},
                                    {"directory": "/opt/b", "kubernetes_cluster": "b"}],
           machine_id_reload_units=[{"unit": "myapp.service"},
                                    {"unit": "worker@1.service", "action": "restart", "destination": "/opt/b"},
                                    {"unit": "myapp.service", "action": "reload-or-restart", "destination": "/opt/b",
                                     "name": "myapp-b"}])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("machine-id-reload-*")) == [
        "machine-id-reload-myapp-b.path", "machine-id-reload-myapp-b.service", "machine-id-reload-myapp.path",
        "machine-id-reload-myapp.service", "machine-id-reload-worker_1.path", "machine-id-reload-worker_1.service"]
    cases = [("myapp", "/opt/a", "myapp.service", "reload"), ("worker_1", "/opt/b", "worker@1.service", "restart"),
             ("myapp-b", "/opt/b", "myapp.service", "reload-or-restart")]
    for name, dest, unit, action in cases:
        p = _unit_settings((out / f"machine-id-reload-{name}.path").read_text())
        assert p["PathChanged"] == [f"{dest}/kubeconfig.yaml"] and p["Unit"] == [f"machine-id-reload-{name}.service"]
        assert p["WantedBy"] == ["paths.target"]
        s = _unit_settings((out / f"machine-id-reload-{name}.service").read_text())
        assert s["Type"] == ["oneshot"] and s["StartLimitIntervalSec"] == ["0"]
        assert s["ExecCondition"] == [f"/bin/systemctl is-active --quiet {unit}"]
        (start,) = s["ExecStart"]
        assert start.endswith(f"' machine-id-reload-{name} {dest}/kubeconfig.yaml {unit} {action}"), start
        assert "User" not in s and s["CapabilityBoundingSet"] == ["CAP_DAC_READ_SEARCH"]
        # what sh gets once systemd has undone its escapes ($$ -> $, %% -> %) parses
        script = start.split("'")[1].replace("$$", "$").replace("%%", "%")
        assert "systemctl \"$3\" -- \"$2\"" in script
        assert subprocess.run(["sh", "-n", "-c", script], check=False).returncode == 0


def test_reload_script_acts_again_only_when_the_kubeconfig_was_replaced_meanwhile(tmp_path):
    """The oneshot's loop, run by sh with a stand-in for systemctl: one action when nothing changes during it, a
    second one when a renewal replaced the kubeconfig while the first ran (systemd does not watch then), and it
    stops after 5 when renewals keep coming."""
    render(tmp_path, machine_id_proxy_server="localhost:3080", machine_id_reload_units=[{"unit": "myapp.service"}])
    start = _unit_settings((tmp_path / "out" / "machine-id-reload-myapp.service").read_text())["ExecStart"][0]
    script = start.split("'")[1].replace("$$", "$").replace("%%", "%")
    fake = tmp_path / "systemctl"
    kc = tmp_path / "kubeconfig.yaml"
    log = tmp_path / "calls"
    script = script.replace("/bin/systemctl", str(fake))

    def run(replacements: int) -> list[str]:
        kc.write_text("v0\n")
        log.write_text("")
        # each call logs its argv and, while replacements are left, replaces the kubeconfig by a rename like the agent
        fake.write_text("#!/bin/sh\necho \"$*\" >> %s\nn=$(wc -l < %s)\nif [ \"$n\" -le %d ]; then\n"
                        "  echo v$n > %s.tmp && mv %s.tmp %s\nfi\n" % (log, log, replacements, kc, kc, kc))
        fake.chmod(0o755)
        r = subprocess.run(["sh", "-c", script, "x", str(kc), "myapp.service", "reload"], capture_output=True,
                           text=True, check=False)
        assert r.returncode == 0, r.stderr
        return log.read_text().splitlines()

    assert run(0) == ["reload -- myapp.service"]
    assert run(1) == ["reload -- myapp.service"] * 2
    assert len(run(100)) == 5


def test_tbot_yaml_destination_with_selectors_is_a_kubernetes_v2_output(tmp_path):
    # context_name_template holds Go-template braces: in Ansible variables they must be marked !unsafe (or
    # Ansible would try to evaluate them itself); the role passes the text through unchanged
    varsfile = tmp_path / "vars.yml"
    varsfile.write_text(
        "machine_id_destinations:\n"
        "  - directory: /opt/many\n"
        "    selectors: [{labels: {team: blue, tier: '1'}}, {name: example-k8s-cluster}]\n"
        "    context_name_template: !unsafe '{{.KubeName}}@{{.ClusterName}}'\n"
        "    default_namespace: demo\n"
        "    roles: [kube-a]\n"
        "  - directory: /opt/one\n"
        "    kubernetes_cluster: example-k8s-cluster\n")
    out = tmp_path / "out"
    out.mkdir()
    vars_ = {"role_dir": str(ROLE), "out_dir": str(out), "_machine_id_systemd_version": 252,
             "machine_id_auth_server": "teleport.example.com:443", "machine_id_token": TOKEN}
    run = run_playbook(tmp_path / "run", ROLE.parent.parent / "tests" / "unit" / "role" / "render.yml",
                       extra_vars=vars_, extra_args=["-e", "@%s" % varsfile])
    assert run.rc == 0, run.stdout[-3000:]
    cfg = agent_config((out / "tbot.yaml").read_text(), tmp_path, "/etc/machine-id-agent/token")
    many, one = cfg.outputs
    assert many.multi and not one.multi and one.kubernetes_cluster == "example-k8s-cluster"
    assert [(s.name, s.labels) for s in many.selectors] == [(None, {"team": "blue", "tier": "1"}),
                                                            ("example-k8s-cluster", {})]
    assert many.context_name_template == "{{.KubeName}}@{{.ClusterName}}" and many.default_namespace == "demo"
    assert many.roles == ["kube-a"] and many.exec_plugin


def _settings_assert(tmp_path, extra_vars):
    """The role's "Assert the settings are sane" task alone, with the role's defaults and ``extra_vars``."""
    tasks = yaml.safe_load((ROLE / "tasks" / "preflight.yml").read_text())
    task = next(t for t in tasks if t["name"] == "Assert the settings are sane")
    play = [{"name": "preflight settings", "hosts": "localhost", "gather_facts": False,
             "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")], "tasks": [task]}]
    pb = tmp_path / "play.yml"
    pb.write_text(yaml.safe_dump(play))
    return run_playbook(tmp_path / "run", pb, extra_vars=dict({"machine_id_proxy_server": "teleport.example.com:443"},
                                                              **extra_vars))


@pytest.mark.parametrize("destinations,ok", [
    ([{"directory": "/opt/a", "selectors": [{"labels": {"team": "blue"}}]}], True),
    ([{"directory": "/opt/a", "selectors": [{"name": "k"}]}, {"directory": "/opt/b", "kubernetes_cluster": "k"}], True),
    ([{"directory": "/opt/a", "selectors": [{"name": "k"}], "kubernetes_cluster": "k"}], False),  # both
    ([{"directory": "/opt/a", "selectors": []}], False),
    ([{"directory": "/opt/a", "selectors": "k"}], False),
    ([{"directory": "/opt/a", "selectors": {"name": "k"}}], False),  # a mapping, not a list
    ([{"directory": "/opt/a"}], False),  # neither
])
def test_preflight_outputs_assert_accepts_selectors_or_a_cluster(tmp_path, destinations, ok):
    run = _settings_assert(tmp_path, {"machine_id_destinations": destinations})
    assert (run.rc == 0) == ok, run.stdout[-2000:]
    if not ok:
        assert "either a kubernetes_cluster or a non-empty list of selectors (not both)" in run.stdout


@pytest.mark.parametrize("verb,resource,ok", [
    ("list", "pods", True),
    ("get", "configmaps/app-settings", True),
    ("watch", "deployments.apps", True),
    ("get", "--as=system:admin", False),  # a flag for kubectl
    ("", "pods", False),
    ("list", "pods secrets", False),
])
def test_preflight_refuses_a_verify_question_that_is_not_one_word_each(tmp_path, verb, resource, ok):
    run = _settings_assert(tmp_path, {"machine_id_kubernetes_cluster": "k", "machine_id_verify_verb": verb,
                                      "machine_id_verify_resource": resource})
    assert (run.rc == 0) == ok, run.stdout[-2000:]
    if not ok:
        msg = run.result("Assert the settings are sane")["msg"]
        assert "the verify question is `kubectl auth can-i VERB RESOURCE`" in msg, msg
        assert "machine_id_verify_resource=%s" % json.dumps(resource) in msg, msg
