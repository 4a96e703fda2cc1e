# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Molecule scenario ``default`` of the role, on a real systemd host, against the REAL test bed.

A private bed (Teleport multiplex + kube-apiserver) gets the guide's Teleport role, a bot and the
Kubernetes RoleBinding; molecule then boots a fresh host (tests/hosts, systemd-nspawn, only the
proxy port forwarded in) and runs, step by step, once on Debian 12 (bookworm, Python 3.11) and once
on Debian 13 (trixie, Python 3.13; LANYARD_MOL_RELEASE), one bot per release on the same bed:

  create -> prepare -> converge --check (fresh host) -> converge -> idempotence
  -> converge --check (converged host: zero changes) -> verify
  -> new agent wheel: converge (restart, new PID) -> idempotence -> destroy

The real agent (built into wheels from agent/ on the controller) joins the bed with the bot token,
and verify.yml checks the service, files, ACLs, kubectl as the reader, denial for another user and
the systemd-analyze security score.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hosts
import testbed as tb
from helpers.fleet import agent_python_argv

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[3]
# Debian release -> molecule host name (the bookworm name is the scenario's default).
HOSTS = {"bookworm": "lanyard-mol-1", "trixie": "lanyard-mol-13"}

KUBE_ROLE = """\
kind: role
metadata:
  name: machine-id-kube-role
version: v6
spec:
  allow:
    kubernetes_labels:
      '*': '*'
    kubernetes_resources:
      - kind: pod
        namespace: "*"
        name: "*"
    kubernetes_groups:
    - example
"""


@pytest.fixture(scope="module")
def bed(testbed_bins, tmp_path_factory):
    try:
        b = tb.Testbed.start(modes=("multiplex",))
    except (tb.TestbedError, tb.BuildError) as exc:
        pytest.fail(f"the real test bed failed to start: {exc}", pytrace=False)
    try:
        # The guide's Teleport role and Kubernetes RBAC, once for both releases.
        tp, kube = b.teleport["multiplex"], b.kube
        role_file = tmp_path_factory.mktemp("mol-role") / "role.yaml"
        role_file.write_text(KUBE_ROLE)
        tp.tctl("create", "-f", str(role_file), check=True)
        kube.kubectl("create", "role", "example-role", "--namespace=demo", "--verb=get,list",
                     "--resource=pods", check=True)
        kube.kubectl("create", "rolebinding", "example-rolebinding-group", "--namespace=demo",
                     "--role=example-role", "--group=example", check=True)
    except BaseException:
        b.stop()
        raise
    yield b
    b.stop()


def _recap(output: str, host: str) -> dict[str, int]:
    m = re.search(rf"^{re.escape(host)}\s*:\s*(.*)$", output, re.M)
    assert m, f"no PLAY RECAP line for {host}:\n{output[-3000:]}"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def _task_status(output: str, task: str) -> str:
    """First word of the result line after the last header of ``task`` in ansible output."""
    idx = output.rfind(f": {task}]")
    assert idx >= 0, f"task {task!r} not in the output"
    for line in output[idx:].splitlines()[1:]:
        line = line.strip().lstrip("\u2502").strip()  # molecule may frame ansible output with "│"
        if line and not line.startswith("*"):
            return line.split(":")[0].strip()
    return ""


# CI runs the scenario on Debian 12 only, to stay inside its 90 minutes: Debian 13 is covered in CI by the
# mixed-fleet rollout (tests/integration/rollout/test_mixed_fleet.py); LANYARD_MOL_RELEASES=bookworm,trixie runs
# the scenario on both.
RELEASES = [r for r in os.environ.get("LANYARD_MOL_RELEASES", "bookworm").split(",") if r]


@pytest.mark.parametrize("release", RELEASES)
def test_molecule_default_scenario(bed, tmp_path, release):
    if shutil.which("systemd-nspawn") is None or shutil.which("debootstrap") is None:
        pytest.fail("systemd-nspawn/debootstrap missing. Fix: scripts/bootstrap.sh (as root) or "
                    "apt-get install systemd-container debootstrap", pytrace=False)
    from hosts import Host

    HOST = HOSTS[release]

    def _host(*argv: str) -> str:
        return Host.load(HOST).run(list(argv), check=True).stdout

    def _main_pid() -> int:
        pid = int(_host("systemctl", "show", "-p", "MainPID", "--value", "machine-id.service").strip())
        assert pid > 0, "machine-id.service has no main process"
        return pid

    tp = bed.teleport["multiplex"]
    token = tp.bot_add(f"example-{release}", ["machine-id-kube-role"])

    agent_src = tmp_path / "agent-src"
    shutil.copytree(REPO / "agent", agent_src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env.update({
        "PATH": f"{venv_bin}:{env.get('PATH', '')}",
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / "build" / "collections"),
        "PYTHONPATH": str(REPO / "tests"),
        # keep molecule's and Ansible's state out of $HOME
        "MOLECULE_EPHEMERAL_DIRECTORY": str(tmp_path / "molecule"),
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "PY_COLORS": "0",
        "LANYARD_MOL_HOST": HOST,
        "LANYARD_MOL_RELEASE": release,
        "LANYARD_MOL_FORWARD": str(tp.web_port),
        "LANYARD_MOL_PROXY": tp.proxy_addr,
        "LANYARD_MOL_TOKEN": token,
        "LANYARD_MOL_CA_PIN": tp.status_ca_pin(),
        "LANYARD_MOL_WEB_CA": str(tp.web_ca_path),
        "LANYARD_MOL_KUBECTL": str(bed.bins["kubectl"]),
        "LANYARD_MOL_KUBE_CLUSTER": tb.KUBE_CLUSTER_NAME,
        # A snapshot of the agent's source: the run is not disturbed by edits to agent/ meanwhile,
        # and changing the snapshot below is "a new agent version".
        "LANYARD_MOL_AGENT_SOURCE": str(agent_src),
    })
    log = tmp_path / "molecule.log"
    timings: dict[str, float] = {}

    def molecule(step: str, *extra: str) -> str:
        t0 = time.monotonic()
        proc = subprocess.run(["molecule", step, *extra], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        timings[" ".join((step,) + extra)] = round(time.monotonic() - t0, 1)
        out = proc.stdout + proc.stderr
        with open(log, "a") as fh:
            fh.write(f"\n===== molecule {step} {' '.join(extra)} (rc {proc.returncode}) =====\n{out}")
        assert token not in out, f"the join token leaked into molecule {step}'s output"
        assert proc.returncode == 0, f"molecule {step} {' '.join(extra)} failed (log {log}):\n{out[-6000:]}"
        return out

    t_all = time.monotonic()
    try:
        molecule("destroy")
        molecule("create")
        molecule("prepare")
        os_release = _host("cat", "/etc/os-release")
        assert f"VERSION_CODENAME={release}" in os_release, os_release
        fresh_check = molecule("converge", "--", "--check")
        assert _recap(fresh_check, HOST)["failed"] == 0
        molecule("converge")
        token_sha = _host("sha256sum", "/etc/machine-id-agent/token").split()[0]
        assert token_sha == hashlib.sha256((token + "\n").encode()).hexdigest(), "token file content differs"
        idem = molecule("idempotence")
        # The host now holds a valid identity and nothing differs: the play passes no token, the install,
        # configure (with the token file task) and service phases are skipped as a whole (the no-change path), and
        # the token file stays.
        assert _task_status(idem, "Install, take over, configure and run the agent") == "skipping"
        assert ": Write the join token file (0600, bot user)]" not in idem
        assert _host("sha256sum", "/etc/machine-id-agent/token").split()[0] == token_sha
        converged_check = molecule("converge", "--", "--check")
        recap = _recap(converged_check, HOST)
        assert recap["changed"] == 0 and recap["failed"] == 0, f"check mode on a converged host: {recap}"
        verify = molecule("verify")
        assert "Overall exposure level for machine-id.service" in verify

        pid = _main_pid()
        # A new agent version (different wheel) restarts; again no change on the next run.
        (agent_src / "src" / "machine_id_agent" / "_build_marker.py").write_text("MARKER = 'test rebuild'\n")
        assert _recap(molecule("converge"), HOST)["changed"] >= 1
        new_pid = _main_pid()
        assert new_pid != pid, "a new agent wheel must restart the service"
        assert _host(*agent_python_argv("import machine_id_agent._build_marker as m; print(m.MARKER)")).strip() \
            == "test rebuild"
        molecule("idempotence")
        assert _main_pid() == new_pid
        assert _host("systemctl", "is-active", "machine-id.service").strip() == "active"

        # A config change reloads the agent (SIGHUP, READY=1 again): same process, no restart.
        env["LANYARD_MOL_RENEWAL"] = "15m"
        assert _recap(molecule("converge"), HOST)["changed"] >= 1
        assert "15m" in _host("grep", "renewal_interval", "/etc/tbot.yaml")
        assert _main_pid() == new_pid, "a config change must reload the agent, not restart it"
        assert "Reloaded" in _host("journalctl", "-u", "machine-id.service", "--no-pager", "-o", "cat")
        assert _host("systemctl", "is-active", "machine-id.service").strip() == "active"
    finally:
        try:
            molecule("destroy")
        finally:
            timings["total"] = round(time.monotonic() - t_all, 1)
            print(f"[molecule {release}] step timings (s): {timings}")
    assert not (hosts.runs_dir() / HOST).exists(), "destroy left the host behind"
