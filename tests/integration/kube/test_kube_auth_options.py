# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The kube_* connection options kubernetes.core users expect, on the real kube-apiserver of the test bed.

Each ``K8S_AUTH_*`` environment fallback, ``proxy`` / ``no_proxy`` (through a real CONNECT proxy on 127.0.0.1
that records what it tunnels) and ``kubeconfig`` given as a dict; every task writes a Role, read back with the
bed's kubectl. Wrong values fail with one clear line, and no credential reaches the output.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import socketserver
import threading
import uuid

import pytest
import yaml

from helpers.playbook import run_playbook

pytestmark = [pytest.mark.testbed]

NS = "demo"


class _ConnectProxy(socketserver.ThreadingTCPServer):
    """A minimal HTTP CONNECT proxy on 127.0.0.1 that records each tunnel's target. Stopped by the test."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ConnectHandler)
        self.tunnels: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server_address[1]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _ConnectHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
        method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        if method != "CONNECT":
            sock.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.server.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with upstream:
            socks = [sock, upstream]
            while True:
                ready = select.select(socks, [], [], 30)[0]
                if not ready:
                    return
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (upstream if s is sock else sock).sendall(data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sa_token(kube, name: str) -> str:
    """A real bearer token: a ServiceAccount bound to cluster-admin, token from the TokenRequest API."""
    kube.apply(f"/api/v1/namespaces/{NS}/serviceaccounts",
               {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": NS}})
    kube.apply("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NS}]})
    r = kube.session().post(f"{kube.server}/api/v1/namespaces/{NS}/serviceaccounts/{name}/token",
                            json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                  "spec": {"expirationSeconds": 3600}}, timeout=30)
    assert r.ok, r.text
    return r.json()["status"]["token"]


def _role_exists(kube, name: str) -> bool:
    proc = kube.kubectl("get", "role", name, "-n", NS, "-o", "json")
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return False
    return json.loads(proc.stdout)["metadata"]["name"] == name


def _task(title: str, role: str, env: dict | None = None, options: dict | None = None, fail: bool = False) -> str:
    body = {"name": title, "lanyard.machine_id.kube_role": dict(
        options or {}, name=role, namespace=NS, rules=[{"verbs": ["get"], "resources": ["pods"], "api_groups": [""]}])}
    if env:
        body["environment"] = env
    if fail:
        body["ignore_errors"] = True
    return yaml.safe_dump([body], sort_keys=False)


def test_k8s_auth_env_proxy_no_proxy_and_dict_kubeconfig(kube, tmp_path):
    s = uuid.uuid4().hex[:6]
    admin = yaml.safe_load(kube.admin_kubeconfig.read_text())
    user = admin["users"][0]["user"]
    ca = str(kube.ca.cert_path)
    token = _sa_token(kube, f"lanyard-auth-{s}")
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    # Two contexts; the current one points at a port where nothing listens, so only K8S_AUTH_CONTEXT works.
    two = dict(admin)
    two["clusters"] = admin["clusters"] + [{"name": "nowhere", "cluster": {
        "server": f"https://127.0.0.1:{_free_port()}", "certificate-authority": ca}}]
    nowhere = {"cluster": "nowhere", "user": admin["users"][0]["name"]}
    two["contexts"] = admin["contexts"] + [{"name": "nowhere", "context": nowhere}]
    two["current-context"] = "nowhere"
    two_path = tmp_path / "two-contexts.kubeconfig"
    two_path.write_text(yaml.safe_dump(two))
    good_context = admin["contexts"][0]["name"]
    # The kubeconfig as a dict, with the client key inline (base64), passed in as an extra var.
    kc_dict = {"apiVersion": "v1", "kind": "Config", "current-context": "mem",
               "clusters": [{"name": "mem", "cluster": {"server": kube.server, "certificate-authority": ca}}],
               "users": [{"name": "mem", "user": {
                   "client-certificate-data": base64.b64encode(open(user["client-certificate"], "rb").read()).decode(),
                   "client-key-data": base64.b64encode(open(user["client-key"], "rb").read()).decode()}}],
               "contexts": [{"name": "mem", "context": {"cluster": "mem", "user": "mem"}}]}
    via_host = {"K8S_AUTH_HOST": kube.server, "K8S_AUTH_API_KEY": token, "K8S_AUTH_SSL_CA_CERT": ca}
    proxy, spare = _ConnectProxy(), _ConnectProxy()
    try:
        tasks = "".join([
            _task("env kubeconfig and context", f"a1-{s}",
                  env={"K8S_AUTH_KUBECONFIG": str(two_path), "K8S_AUTH_CONTEXT": good_context}),
            _task("env kubeconfig without context", f"a2-{s}", env={"K8S_AUTH_KUBECONFIG": str(two_path)},
                  fail=True),
            _task("env host api_key ssl_ca_cert", f"a3-{s}", env=via_host),
            _task("env host cert_file key_file", f"a4-{s}", env={
                "K8S_AUTH_HOST": kube.server, "K8S_AUTH_CERT_FILE": user["client-certificate"],
                "K8S_AUTH_KEY_FILE": user["client-key"], "K8S_AUTH_SSL_CA_CERT": ca}),
            _task("env verify_ssl false", f"a5-{s}", env={
                "K8S_AUTH_HOST": kube.server, "K8S_AUTH_API_KEY": token, "K8S_AUTH_VERIFY_SSL": "false"}),
            _task("env verify_ssl true", f"a6-{s}", env={
                "K8S_AUTH_HOST": kube.server, "K8S_AUTH_API_KEY": token, "K8S_AUTH_VERIFY_SSL": "true"}, fail=True),
            _task("env verify_ssl invalid", f"a7-{s}", env={
                "K8S_AUTH_HOST": kube.server, "K8S_AUTH_API_KEY": token, "K8S_AUTH_VERIFY_SSL": "maybe"}, fail=True),
            _task("env proxy", f"a8-{s}", env=dict(via_host, K8S_AUTH_PROXY=proxy.url)),
            _task("option proxy", f"a9-{s}", env=via_host, options={"proxy": proxy.url}),
            _task("dead proxy", f"a10-{s}", env=via_host, options={"proxy": dead}, fail=True),
            _task("env no_proxy", f"a11-{s}", env=dict(via_host, K8S_AUTH_PROXY=dead, K8S_AUTH_NO_PROXY="127.0.0.0/8")),
            _task("option no_proxy", f"a12-{s}", env=via_host,
                  options={"proxy": spare.url, "no_proxy": "localhost,127.0.0.1"}),
            _task("dict kubeconfig", f"a13-{s}", options={"kubeconfig": "{{ kc_dict }}"}),
            _task("task kubeconfig beats env host", f"a14-{s}", env={"K8S_AUTH_HOST": "https://127.0.0.1:1"},
                  options={"kubeconfig": str(kube.admin_kubeconfig)}),
            _task("env host and env kubeconfig", f"a15-{s}",
                  env=dict(via_host, K8S_AUTH_KUBECONFIG=str(kube.admin_kubeconfig)), fail=True),
        ])
        play = "- hosts: localhost\n  gather_facts: false\n  tasks:\n" + "\n".join(
            "    " + line if line else line for line in tasks.splitlines()) + "\n"
        r = run_playbook(tmp_path / "play", play, extra_vars={"kc_dict": kc_dict}, diff=True)
    finally:
        proxy.stop()
        spare.stop()

    def ok(title):
        res = r.result(title)
        assert res["_status"] == "ok" and res["changed"], (title, res.get("msg"), r.stdout[-3000:])

    def failed(title, *words):
        res = r.result(title)
        assert res["_status"] == "failed", (title, res)
        msg = res["msg"]
        assert "\n" not in msg and "Traceback" not in msg and all(w in msg for w in words), (title, msg)
        return msg

    for title in ("env kubeconfig and context", "env host api_key ssl_ca_cert", "env host cert_file key_file",
                  "env verify_ssl false", "env proxy", "option proxy", "env no_proxy", "option no_proxy",
                  "dict kubeconfig", "task kubeconfig beats env host"):
        ok(title)
    # Without K8S_AUTH_CONTEXT the kubeconfig's current context (nowhere) is used, and fails.
    failed("env kubeconfig without context", "cannot reach cluster 'nowhere'")
    # K8S_AUTH_VERIFY_SSL=true: verified against the public CAs, which do not sign the bed's API server.
    failed("env verify_ssl true", "TLS with the cluster at " + kube.server)
    failed("env verify_ssl invalid", "$K8S_AUTH_VERIFY_SSL", "not a boolean")
    failed("dead proxy", "the proxy " + dead, "no_proxy")
    failed("env host and env kubeconfig", "$K8S_AUTH_HOST", "$K8S_AUTH_KUBECONFIG")
    # The proxy tunnelled exactly the two proxied tasks' connections to the API server; no_proxy kept the
    # other proxy unused.
    target = kube.server.split("://", 1)[1]
    assert proxy.tunnels and set(proxy.tunnels) == {target}, proxy.tunnels
    assert len(proxy.tunnels) >= 2, proxy.tunnels
    assert spare.tunnels == [], spare.tunnels
    for n in (1, 3, 4, 5, 8, 9, 11, 12, 13, 14):
        assert _role_exists(kube, f"a{n}-{s}"), n
    for n in (2, 6, 7, 10, 15):
        assert not _role_exists(kube, f"a{n}-{s}"), n
    everything = r.stdout + json.dumps(r.results)
    assert token not in everything
    assert "PRIVATE KEY" not in everything
    assert kc_dict["users"][0]["user"]["client-key-data"] not in everything
