# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A real etcd + kube-apiserver on 127.0.0.1 with RBAC and client-certificate auth."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from .pki import CertificateAuthority, KeyPair, service_account_keys
from .procs import Process, TestbedError, free_port

# Name of the kubeconfig context that Teleport's kubernetes_service registers: the guide's cluster.
KUBE_CLUSTER_NAME = "example-k8s-cluster"
DEMO_NAMESPACE = "demo"
DEMO_POD = "demo-app"
TELEPORT_KUBE_USER = "teleport-kube"
ADMIN_USER = "lanyard-admin"


def write_kubeconfig(path: Path, server: str, ca: Path, client: KeyPair, context: str, user: str) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": user}}],
        "current-context": context,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


@dataclass
class KubeCluster:
    bins: dict[str, Path]
    workdir: Path
    procs: list[Process] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> "KubeCluster":
        d = self.workdir
        pki = d / "pki"
        self.ca = CertificateAuthority(pki, "lanyard-testbed-kube-ca")
        serving = self.ca.issue("apiserver", "kube-apiserver", dns=("localhost", "kubernetes", "kubernetes.default"),
                                ips=("127.0.0.1", "10.0.0.1"), server=True)
        self.admin = self.ca.issue("admin", ADMIN_USER, organizations=("system:masters",))
        self.teleport_client = self.ca.issue("teleport-kube", TELEPORT_KUBE_USER)
        sa = service_account_keys(pki)

        etcd_client, etcd_peer = free_port(), free_port()
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        etcd = Process("etcd", [
            str(self.bins["etcd"]), "--data-dir", str(d / "etcd"), "--name", "testbed",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"testbed=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(512 * 1024 * 1024),
        ], d / "logs")
        self.procs.append(etcd)
        etcd.wait_until(lambda: requests.get(f"http://127.0.0.1:{etcd_client}/health", timeout=1).ok,
                        timeout, "healthy")

        api = Process("kube-apiserver", [
            str(self.bins["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={self.ca.cert_path}", "--authorization-mode=RBAC",
            f"--service-account-issuer={self.server}", f"--service-account-key-file={sa.cert}",
            f"--service-account-signing-key-file={sa.key}", "--service-cluster-ip-range=10.0.0.0/24",
            "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true",
            f"--cert-dir={d / 'apiserver-certs'}",
        ], d / "logs")
        self.procs.append(api)
        api.wait_until(lambda: requests.get(f"{self.server}/readyz", verify=str(self.ca.cert_path),
                                            timeout=2).ok, timeout, "ready")

        self.admin_kubeconfig = write_kubeconfig(d / "admin.kubeconfig", self.server, self.ca.cert_path,
                                                 self.admin, KUBE_CLUSTER_NAME, ADMIN_USER)
        self.teleport_kubeconfig = write_kubeconfig(d / "teleport.kubeconfig", self.server, self.ca.cert_path,
                                                    self.teleport_client, KUBE_CLUSTER_NAME, TELEPORT_KUBE_USER)
        self._bootstrap()
        return self

    # -- API helpers (admin identity) -------------------------------------------------------------
    def session(self) -> requests.Session:
        s = requests.Session()
        # REQUESTS_CA_BUNDLE in the environment would override Session.verify; the bed trusts only its CA.
        s.trust_env = False
        s.cert = (str(self.admin.cert), str(self.admin.key))
        s.verify = str(self.ca.cert_path)
        return s

    def apply(self, path: str, obj: dict) -> dict:
        """Create ``obj`` at collection URL ``path`` (server-side apply, field manager testbed)."""
        name = obj["metadata"]["name"]
        r = self.session().patch(
            f"{self.server}{path}/{name}", params={"fieldManager": "lanyard-testbed", "force": "true"},
            data=yaml.safe_dump(obj), headers={"Content-Type": "application/apply-patch+yaml"}, timeout=30)
        if not r.ok:
            raise TestbedError(f"kube-apiserver refused {path}/{name}: {r.status_code} {r.text[:500]}")
        return r.json()

    def _bootstrap(self) -> None:
        self.apply("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NAMESPACE}})
        self.apply(f"/api/v1/namespaces/{DEMO_NAMESPACE}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": DEMO_POD, "labels": {"app": "demo"}},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/demo:1"}]},
        })
        # What Teleport's kubernetes_service needs: impersonation plus the self-review it runs at start.
        self.apply("/apis/rbac.authorization.k8s.io/v1/clusterroles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "teleport-impersonation"},
            "rules": [
                {"apiGroups": [""], "resources": ["users", "groups", "serviceaccounts"], "verbs": ["impersonate"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                {"apiGroups": ["authorization.k8s.io"],
                 "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
            ],
        })
        self.apply("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "teleport-impersonation"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "teleport-impersonation"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TELEPORT_KUBE_USER}],
        })

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = False,
                timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [str(self.bins["kubectl"]), f"--kubeconfig={kubeconfig or self.admin_kubeconfig}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise TestbedError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
