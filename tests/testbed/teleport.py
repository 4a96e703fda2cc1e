# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A real Teleport cluster in one process: auth + proxy + kubernetes_service on loopback.

Two listener modes, as in the guide:
  * ``multiplex`` -- TLS routing: web, SSH, tunnel and Kubernetes all on the one web port;
  * ``separate``  -- legacy ports, with ``kube_listen_addr`` and ``kube_public_addr`` set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .kube import KUBE_CLUSTER_NAME, KubeCluster
from .pki import CertificateAuthority
from .procs import Process, TestbedError, free_port

MODES = ("multiplex", "separate")
CLUSTER_NAME = "lanyard-testbed"
ADMIN_USER = "lanyard-admin"
DYNAMIC_KUBE_LABEL = "lanyard-testbed-dynamic"


def _has_labels(found, labels: dict) -> bool:
    return found is not None and all(found.get(k) == v for k, v in labels.items())


@dataclass
class TeleportCluster:
    bins: dict[str, Path]
    workdir: Path
    kube: KubeCluster
    mode: str = "multiplex"
    procs: list[Process] = field(default_factory=list)

    # -- start -------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> "TeleportCluster":
        if self.mode not in MODES:
            raise TestbedError(f"unknown listener mode {self.mode!r}; use one of {MODES}")
        d = self.workdir
        d.mkdir(parents=True, exist_ok=True)
        self.data_dir = d / "data"
        # The proxy's HTTPS certificate comes from a test CA; clients trust it through ca_path or
        # SSL_CERT_FILE (Go) -- never through --insecure.
        self.web_ca = CertificateAuthority(d / "web-pki", "lanyard-testbed-web-ca")
        web = self.web_ca.issue("proxy", "localhost", dns=("localhost",), ips=("127.0.0.1", "::1"), server=True)
        self.web_ca_path = self.web_ca.cert_path

        self.auth_port = free_port()
        self.web_port = free_port()
        self.diag_port = free_port()
        self.kube_service_port = free_port()
        self.auth_addr = f"127.0.0.1:{self.auth_port}"
        self.proxy_addr = f"localhost:{self.web_port}"
        self.web_url = f"https://localhost:{self.web_port}"
        proxy: dict = {
            "enabled": True,
            "web_listen_addr": f"127.0.0.1:{self.web_port}",
            "public_addr": self.proxy_addr,
            "https_keypairs": [{"key_file": str(web.key), "cert_file": str(web.cert)}],
        }
        self.kube_public_addr = None
        if self.mode == "separate":
            self.ssh_port, self.tunnel_port, self.kube_port = free_port(), free_port(), free_port()
            self.kube_public_addr = f"localhost:{self.kube_port}"
            proxy.update({
                "listen_addr": f"127.0.0.1:{self.ssh_port}",
                "tunnel_listen_addr": f"127.0.0.1:{self.tunnel_port}",
                "kube_listen_addr": f"127.0.0.1:{self.kube_port}",
                "kube_public_addr": self.kube_public_addr,
            })
        config = {
            "version": "v3",
            "teleport": {
                "nodename": f"testbed-{self.mode}",
                "data_dir": str(self.data_dir),
                "log": {"output": "stderr", "severity": os.environ.get("LANYARD_TELEPORT_LOG", "INFO")},
            },
            "auth_service": {
                "enabled": True,
                "listen_addr": self.auth_addr,
                "cluster_name": CLUSTER_NAME,
                "proxy_listener_mode": self.mode,
                "authentication": {"type": "local", "second_factor": "off"},
            },
            "proxy_service": proxy,
            "ssh_service": {"enabled": False},
            "kubernetes_service": {
                "enabled": True,
                "listen_addr": f"127.0.0.1:{self.kube_service_port}",
                "kubeconfig_file": str(self.kube.teleport_kubeconfig),
                "labels": {"env": "testbed"},
                # dynamic registration: kube_cluster resources with this label (put_kube_cluster) are served
                # too, next to the static example-k8s-cluster, and follow relabels and removals at run time
                "resources": [{"labels": {DYNAMIC_KUBE_LABEL: "yes"}}],
            },
        }
        self.config_path = d / "teleport.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.env = dict(os.environ, SSL_CERT_FILE=str(self.web_ca_path))
        self.start_process(timeout)
        self._make_admin_identity()
        return self

    def start_process(self, timeout: float = 90.0) -> None:
        """Start (or start again, with the same config, ports and data) the teleport process."""
        proc = Process(f"teleport-{self.mode}", [
            str(self.bins["teleport"]), "start", "-c", str(self.config_path),
            f"--diag-addr=127.0.0.1:{self.diag_port}",
        ], self.workdir / "logs", env=self.env)
        self.procs.append(proc)
        self.process = proc
        proc.wait_until(lambda: requests.get(f"http://127.0.0.1:{self.diag_port}/readyz", timeout=1).ok,
                        timeout, "ready (/readyz)")
        proc.wait_until(self._kube_registered, timeout, f"serving kube cluster {KUBE_CLUSTER_NAME}")

    def stop_process(self) -> None:
        """Stop teleport but keep its state, so :meth:`start_process` brings the same cluster back."""
        self.process.stop()
        self.procs.remove(self.process)

    def restart(self, down_for: float = 0.0, timeout: float = 90.0) -> None:
        self.stop_process()
        time.sleep(down_for)
        self.start_process(timeout)

    def _kube_registered(self) -> bool:
        out = self.tctl("get", "kube_server", "--format=json", check=True).stdout
        return any(KUBE_CLUSTER_NAME in json.dumps(item) for item in json.loads(out or "[]"))

    # -- more Kubernetes clusters (dynamic kube_cluster resources, all on the bed's one kube-apiserver) ------
    def kube_servers(self) -> dict:
        """{kube cluster name: labels} as the kube_server heartbeats show them now."""
        out = self.tctl("get", "kube_server", "--format=json", check=True).stdout
        found = {}
        for item in json.loads(out or "[]"):
            cluster = (item.get("spec") or {}).get("cluster") or {}
            meta = cluster.get("metadata") or {}
            if meta.get("name"):
                found[meta["name"]] = dict(meta.get("labels") or {})
        return found

    def put_kube_cluster(self, name: str, labels: dict, timeout: float = 60.0) -> None:
        """Create or update (relabel: ``labels`` replace the old ones) a ``kube_cluster`` resource served by the
        bed's kubernetes_service, pointing at the bed's kube-apiserver, and wait until its kube_server shows
        these labels."""
        k = self.kube
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": name, "cluster": {
                "server": k.server,
                "certificate-authority-data": base64.b64encode(k.ca.cert_path.read_bytes()).decode()}}],
            "users": [{"name": "teleport", "user": {
                "client-certificate-data": base64.b64encode(k.teleport_client.cert.read_bytes()).decode(),
                "client-key-data": base64.b64encode(k.teleport_client.key.read_bytes()).decode()}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": "teleport"}}],
            "current-context": name,
        }
        all_labels = dict(labels, **{DYNAMIC_KUBE_LABEL: "yes"})
        doc = {"kind": "kube_cluster", "version": "v3", "metadata": {"name": name, "labels": all_labels},
               "spec": {"kubeconfig": base64.b64encode(yaml.safe_dump(kubeconfig).encode()).decode()}}
        path = self.workdir / f"kube_cluster-{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        path.chmod(0o600)
        try:
            self.tctl("create", "-f", "--force", str(path), check=True)
        finally:
            path.unlink()
        # the served cluster also carries the kubernetes_service's static labels (env=testbed) and
        # teleport.dev/origin=dynamic (seen on v13.3.8; docs/protocol-findings.md section 10)
        self.process.wait_until(lambda: _has_labels(self.kube_servers().get(name), all_labels),
                                timeout, f"serving kube cluster {name} with labels {all_labels}")

    def remove_kube_cluster(self, name: str, timeout: float = 60.0) -> None:
        self.tctl("rm", f"kube_cluster/{name}", check=True)
        self.process.wait_until(lambda: name not in self.kube_servers(), timeout, f"no longer serving {name}")

    def _make_admin_identity(self) -> None:
        """A user with the preset ``editor`` + ``access`` roles and an identity file for remote tctl."""
        self.tctl("users", "add", ADMIN_USER, "--roles=editor,access", check=True)
        self.renew_admin_identity()

    def renew_admin_identity(self) -> None:
        """(Re-)sign the admin identity file: after a user CA rotation the old one is signed by a dropped CA."""
        self.admin_identity = self.workdir / "admin-identity.pem"
        self.tctl("auth", "sign", f"--user={ADMIN_USER}", "--format=file", f"--out={self.admin_identity}",
                  "--ttl=24h", "--overwrite", check=True)

    # -- admin tctl ------------------------------------------------------------------------------
    @property
    def tctl_local_argv(self) -> list[str]:
        """tctl as the local admin: reads the auth server's own identity from data_dir."""
        return [str(self.bins["tctl"]), "-c", str(self.config_path)]

    @property
    def tctl_remote_argv(self) -> list[str]:
        """tctl as the ``lanyard-admin`` user through the auth address and an identity file."""
        return [str(self.bins["tctl"]), f"--auth-server={self.auth_addr}", "-i", str(self.admin_identity)]

    def tctl(self, *args: str, check: bool = False, remote: bool = False, input: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
        argv = (self.tctl_remote_argv if remote else self.tctl_local_argv) + list(args)
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, input=input, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise TestbedError(f"tctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        return proc

    def bot_add(self, name: str, roles: list[str]) -> str:
        """``tctl bots add NAME --roles=...`` as the guide runs it; returns the join token it prints."""
        out = self.tctl("bots", "add", name, f"--roles={','.join(roles)}", check=True).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("the bot token:"):
                return line.split(":", 1)[1].strip()
        raise TestbedError(f"tctl bots add {name} printed no token line:\n{out}")

    # -- facts -------------------------------------------------------------------------------------
    def ping(self) -> dict:
        r = requests.get(f"{self.web_url}/webapi/ping", verify=str(self.web_ca_path), timeout=10)
        r.raise_for_status()
        return r.json()

    def ca_pins(self) -> list[str]:
        """``sha256:<hex SPKI>`` of every host CA TLS certificate, computed from ``tctl get cert_authority``."""
        out = self.tctl("get", "cert_authority", "--format=json", check=True).stdout
        pins = []
        for ca in json.loads(out):
            if ca["spec"]["type"] != "host":
                continue
            for kp in ca["spec"]["active_keys"].get("tls", []):
                cert = x509.load_pem_x509_certificate(base64.b64decode(kp["cert"]))
                spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
                pins.append("sha256:" + hashlib.sha256(spki).hexdigest())
        return pins

    def status_ca_pin(self) -> str:
        """The CA pin exactly as ``tctl status`` prints it."""
        for line in self.tctl("status", check=True).stdout.splitlines():
            if line.strip().startswith("CA pin"):
                return line.split()[-1]
        raise TestbedError("tctl status printed no CA pin")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
