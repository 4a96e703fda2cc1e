# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A local fleet for playbooks/rollout.yml: the real test bed plus real systemd hosts (systemd-nspawn).

Used by ``make demo`` (scripts/demo.py), the rollout integration tests and bench/rollout.py::

    fleet = Fleet(workdir, teleport=bed.teleport["multiplex"], kube=bed.kube)
    fleet.add_hosts(["app-1", "app-2"])
    run = fleet.rollout()                 # a PlaybookRun (rc, stdout, per-task results)
    fleet.reader_get_pods("app-1")        # kubectl as the reader user inside the host
    fleet.stop()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from helpers.playbook import REPO, PlaybookRun, run_playbook
from hosts import CONNECTION_PLUGINS, Host

ROLLOUT = REPO / "playbooks" / "rollout.yml"
GUEST_KUBECTL = "/usr/local/bin/kubectl"


AGENT = "/opt/machine-id-agent/bin/machine-id-agent"  # where the role installs it (machine_id_agent_venv)


def agent_python_argv(code: str) -> list[str]:
    """Run ``code`` with the Python of the release the agent's command points to (the role installs one virtualenv
    per wheel set under /opt/machine-id-agent/releases and switches the command's symlink to it)."""
    return ["sh", "-c", f'exec "$(dirname "$(readlink -f {AGENT})")/python" -c "$0"', code]


def agent_status(host: Host) -> dict:
    """``machine-id-agent status --json`` on ``host``, as the agent's user like the role's status step (root is
    refused by the storage's owner check); {"error": ...} when it printed no JSON."""
    r = host.run(["runuser", "-u", "teleport", "--", AGENT, "status", "-c", "/etc/tbot.yaml", "--json"], check=False)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"error": (r.stderr or "")[-300:]}


@dataclass
class Fleet:
    workdir: Path
    teleport: object  # testbed.teleport.TeleportCluster
    kube: object  # testbed.kube.KubeCluster
    bot_name: str = "example"
    hosts: dict[str, Host] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)
    host_vars: dict[str, dict] = field(default_factory=dict)  # per host, written into the inventory
    serial: int | str = 1
    # An installed collection (the directory that holds ansible_collections/): when set, the rollout is
    # lanyard.machine_id.rollout from there, with nothing else on ANSIBLE_COLLECTIONS_PATH.
    collections_path: Path | None = None
    # Another ansible-core's bin directory (helpers/matrix.py) to run the rollout with; None: this venv's.
    ansible_bin_dir: Path | None = None

    # -- hosts -------------------------------------------------------------------------------------
    def add_hosts(self, names: list[str], release: str = "bookworm") -> None:
        """Boot ``names`` as Debian ``release`` hosts (bookworm = 12, trixie = 13)."""
        for name in names:
            host = Host.start(name, forward_ports=[self.teleport.web_port], release=release)
            self.hosts[name] = host
            # kubectl for the final check as the reader user (the role never installs it).
            dst = host.root / GUEST_KUBECTL.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.kube.bins["kubectl"], dst)
            os.chmod(dst, 0o755)

    def remove_host(self, name: str) -> None:
        """Mark a host absent: the next rollout removes its agent and revokes what it held."""
        self.absent.add(name)

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()
        self.hosts.clear()

    # -- inventory and rollout ------------------------------------------------------------------------
    def group_vars(self) -> dict:
        tp = self.teleport
        return {
            "machine_id_proxy_server": tp.proxy_addr,
            "machine_id_controller_proxy_ca_path": str(tp.web_ca_path),
            "machine_id_ca_pem": Path(tp.web_ca_path).read_text(),
            "machine_id_kubernetes_cluster": "example-k8s-cluster",
            "machine_id_tctl_connection": {
                "tctl_path": str(self.tctl_wrapper()),
                "auth_server": tp.auth_addr,
                "identity_file": str(tp.admin_identity),
            },
            "machine_id_kube_connection": {"kubeconfig": str(self.kube.admin_kubeconfig)},
            "machine_id_teleport_role_name": "machine-id-kube-role",
            "machine_id_teleport_role_spec": {"allow": {
                "kubernetes_labels": {"*": "*"},
                "kubernetes_resources": [{"kind": "pod", "namespace": "*", "name": "*"}],
                "kubernetes_groups": ["example"],
                "kubernetes_users": ["alice"],
            }},
            "machine_id_bot_name": self.bot_name,
            "machine_id_bot_per_host": True,
            "machine_id_token_ttl": "30m",
            "machine_id_kube_roles": [{"name": "example-role", "namespace": "demo", "rules": [
                {"api_groups": [""], "resources": ["pods", "deployments"], "verbs": ["get", "list"]}]}],
            "machine_id_kube_rolebindings": [{"name": "example-rolebinding-group", "namespace": "demo",
                                              "role": "example-role", "groups": ["example"]}],
            "machine_id_rollout_serial": self.serial,
            "machine_id_kubectl": GUEST_KUBECTL,
            "machine_id_verify_namespace": "demo",
            "ansible_connection": "lanyard_nspawn",
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def write_inventory(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        hosts = {}
        for name in self.hosts:
            hv = dict(self.host_vars.get(name) or {})
            if name in self.absent:
                hv["machine_id_state"] = "absent"
            hosts[name] = hv or None
        inv = {"machine_id": {"hosts": hosts, "vars": self.group_vars()}}
        path = self.workdir / "inventory.yml"
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        path.chmod(0o600)
        return path

    def rollout(self, check: bool = False, verbosity: int = 0, timeout: float = 1800, diff: bool = False,
                extra_args: list[str] | None = None, playbook: str = "rollout") -> PlaybookRun:
        """Run playbooks/<playbook>.yml (lanyard.machine_id.<playbook> from an installed collection)."""
        inv = self.write_inventory()
        env = {"ANSIBLE_CONNECTION_PLUGINS": str(CONNECTION_PLUGINS), "ANSIBLE_PIPELINING": "True",
               "SSL_CERT_FILE": str(self.teleport.web_ca_path)}
        path = ROLLOUT.parent / f"{playbook}.yml"
        if self.collections_path is not None:
            env["ANSIBLE_COLLECTIONS_PATH"] = str(self.collections_path)
            path = f"lanyard.machine_id.{playbook}"
        return run_playbook(self.workdir, path, inventory=inv, check=check, verbosity=verbosity,
                            env=env, timeout=timeout, diff=diff, extra_args=extra_args, bin_dir=self.ansible_bin_dir)

    # -- checks ------------------------------------------------------------------------------------------
    def reader_get_pods(self, name: str, reader: str = "app", request_timeout: str = "", timeout: float = 120):
        extra = ["--request-timeout=" + request_timeout] if request_timeout else []
        return self.hosts[name].run(["runuser", "-u", reader, "--", GUEST_KUBECTL, "--kubeconfig",
                                     "/opt/machine-id/kubeconfig.yaml", *extra, "get", "pods", "-n", "demo", "-o",
                                     "name"], check=False, timeout=timeout)

    def token_creations(self) -> int:
        """Join tokens created so far: ``join_token.create`` audit events (tokens made with ``tctl create``)
        plus ``tctl bots add`` calls (v13 makes the bot's first token without that audit event)."""
        log = self.teleport.process.log_path.read_text(errors="replace")
        events = len(re.findall(r"event:join_token\.create\b", log))
        return events + sum(1 for call in self._calls() if call[:2] == ["bots", "add"])

    def _calls(self) -> list[list[str]]:
        counter = self.workdir / "tctl-calls"
        if not counter.exists():
            return []
        calls = []
        for line in counter.read_text().splitlines():
            words, skip = [], False
            for w in line.split():
                if skip:
                    skip = False
                elif w in ("-i", "--identity", "-c", "--config", "--auth-server"):
                    skip = True
                elif not w.startswith("-"):
                    words.append(w)
            calls.append(words)
        return calls

    def tctl_calls(self) -> int:
        """How many times the rollout ran tctl (through the counting wrapper in :meth:`tctl_wrapper`)."""
        return len(self._calls())

    def tctl_wrapper(self) -> Path:
        """A tctl that records each call (argv only: tokens never travel in argv) and execs the real one."""
        path = self.workdir / "tctl"
        path.write_text(f"#!/bin/sh\necho \"$*\" >> {self.workdir / 'tctl-calls'}\n"
                        f"exec {self.teleport.bins['tctl']} \"$@\"\n")
        path.chmod(0o755)
        return path


def changed_by_host(run: PlaybookRun) -> dict[str, int]:
    """Number of changed task results per host (the PLAY RECAP's changed=)."""
    counts: dict[str, int] = {}
    for r in run.results:
        counts.setdefault(r["host"], 0)
        if r["status"] == "ok" and r["result"].get("changed"):
            counts[r["host"]] += 1
    return counts


def wait_for(predicate, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


__all__ = ["Fleet", "changed_by_host", "wait_for"]
