# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's protocol side against the REAL Teleport 13.3.8 of the test bed, in both listener modes.

Join (proxy, direct auth with CA pins, the guide's ``auth_server: <proxy>`` shape), renewals (generation
increments), Kubernetes credentials that the bed's kubectl accepts, refusals (wrong pin, used token), the
generation lock and how storing before use avoids it, and a host CA rotation.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
import yaml

import testbed as tb
from machine_id_agent import identity as ident
from machine_id_agent import join, renew, webapi
from machine_id_agent.config import Config
from machine_id_agent.errors import JoinError, LockedError, RenewError

pytestmark = [pytest.mark.testbed]

KUBE_GROUP = "lanyard-proto"
TP_ROLE = "lanyard-proto-kube"


# --- bed setup ------------------------------------------------------------------------------------------
def _kube_rbac(kube) -> None:
    """A Role that can read pods in ``demo``, bound to the group the Teleport role maps to."""
    kube.apply(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{tb.DEMO_NAMESPACE}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "lanyard-proto-pods", "namespace": tb.DEMO_NAMESPACE},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    })
    kube.apply(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{tb.DEMO_NAMESPACE}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "lanyard-proto-pods", "namespace": tb.DEMO_NAMESPACE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lanyard-proto-pods"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": KUBE_GROUP}],
    })


def _teleport_role(tp, tmp: Path) -> None:
    f = tmp / f"{TP_ROLE}.yaml"
    f.write_text(yaml.safe_dump({
        "kind": "role", "version": "v6", "metadata": {"name": TP_ROLE},
        "spec": {"allow": {"kubernetes_labels": {"*": "*"},
                           "kubernetes_resources": [{"kind": "pod", "namespace": "*", "name": "*"}],
                           "kubernetes_groups": [KUBE_GROUP]}},
    }))
    tp.tctl("create", "-f", str(f), "--force", check=True)


@pytest.fixture(scope="session")
def proto_kube(kube):
    _kube_rbac(kube)
    return kube


@pytest.fixture(scope="session")
def proto_role(teleport, tmp_path_factory):
    _teleport_role(teleport, tmp_path_factory.mktemp(f"role-{teleport.mode}"))
    return teleport


def new_bot(tp) -> tuple:
    name = f"proto-{tp.mode[:3]}-{uuid.uuid4().hex[:8]}"
    return name, tp.bot_add(name, [TP_ROLE])


def make_cfg(tp, token: str, storage: Path, *, via: str, pins=None) -> Config:
    """``via``: "proxy" (proxy_server), "auth" (auth_server = auth service), "guide" (auth_server = proxy)."""
    return Config(
        auth_server={"auth": tp.auth_addr, "guide": tp.proxy_addr}.get(via),
        proxy_server=tp.proxy_addr if via == "proxy" else None,
        token=token, ca_pins=list(pins or []), ca_path=Path(tp.web_ca_path), storage_dir=storage,
        credential_ttl=3600, renewal_interval=1200, source=storage / "tbot.yaml",
    )


def write_kubeconfig(path: Path, creds: renew.KubeCredentials, facts: webapi.ProxyFacts) -> Path:
    """A minimal kubeconfig as teleport-protocol.md section 4 describes the server choice."""
    def b(data: bytes) -> str:
        return base64.b64encode(data).decode()

    cluster = {"certificate-authority-data": b(b"".join(creds.host_ca_pems))}
    if facts.tls_routing:
        cluster["server"] = f"https://{facts.web_addr}"
        host = webapi.split_addr(facts.web_addr)[0]
        cluster["tls-server-name"] = f"kube-teleport-proxy-alpn.{host}"
    else:
        assert facts.kube_public_addr, "a proxy without TLS routing must publish kube_public_addr"
        cluster["server"] = f"https://{facts.kube_public_addr}"
    name = f"{creds.teleport_cluster}-{creds.kubernetes_cluster}"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": {"client-certificate-data": b(creds.cert_pem),
                                          "client-key-data": b(creds.key_pem)}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
    }))
    path.chmod(0o600)
    return path


def assert_kubectl_lists_demo_pod(kube, kubeconfig: Path) -> None:
    got = kube.kubectl("get", "pods", "-n", tb.DEMO_NAMESPACE, kubeconfig=kubeconfig)
    assert got.returncode == 0, got.stderr
    assert tb.DEMO_POD in got.stdout


def facts_for(tp) -> webapi.ProxyFacts:
    return webapi.ping(tp.proxy_addr, ca_path=Path(tp.web_ca_path))


# --- tests ----------------------------------------------------------------------------------------------
def test_proxy_facts(teleport):
    facts = facts_for(teleport)
    assert facts.cluster_name == tb.CLUSTER_NAME
    assert facts.server_major == 13 and facts.server_version.startswith("13.3.8")
    assert facts.tls_routing is (teleport.mode == "multiplex")
    if teleport.mode == "separate":
        assert facts.kube_public_addr == teleport.kube_public_addr
    assert facts.web_addr == teleport.proxy_addr


@pytest.mark.parametrize("via", ["proxy", "auth", "guide"])
def test_join_renew_and_kubectl(proto_role, proto_kube, tmp_path, via):
    tp, kube = proto_role, proto_kube
    name, token = new_bot(tp)
    storage = tmp_path / "bot"
    pins = [tp.status_ca_pin()] if via in ("auth", "guide") else []
    cfg = make_cfg(tp, token, storage, via=via, pins=pins)

    idt = join.join(cfg)
    assert idt.bot_name == name and idt.cluster_name == tb.CLUSTER_NAME
    assert idt.generation == 1 and idt.renewable
    stored = ident.load(storage)
    assert stored is not None and stored.tls_cert_pem == idt.tls_cert_pem  # stored before join() returned
    assert ident.token_matches(storage, token)

    facts = None if via == "auth" else facts_for(tp)
    expected_route = "auth" if via == "auth" else "proxy"
    for n in range(3):
        with renew.AuthClient(cfg, idt, facts) as client:
            assert client.route[0] == expected_route
            idt = client.renew_identity(cfg.credential_ttl)
            assert idt.generation == 2 + n
            assert ident.load(storage).generation == idt.generation  # durable before use
            creds = client.kube_credentials(tb.KUBE_CLUSTER_NAME, None, 600)
    assert creds.roles == [TP_ROLE]  # the bot role's impersonate roles
    assert ident.cert_key_matches(creds.cert_pem, creds.key_pem)
    assert creds.key_pem != idt.key_pem  # the output key is not the bot's key
    assert [ident.spki_pin(c) for c in creds.host_ca_pems] == tp.ca_pins()

    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig.yaml", creds, facts or facts_for(tp))
    assert_kubectl_lists_demo_pod(kube, kubeconfig)


def test_wrong_pin_refused_and_token_not_spent(proto_role, tmp_path):
    tp = proto_role
    token = new_bot(tp)[1]
    bad = make_cfg(tp, token, tmp_path / "bad", via="auth", pins=["sha256:" + "0" * 64])
    with pytest.raises(JoinError) as err:
        join.join(bad)
    msg = str(err.value)
    assert "matches none of the configured ca_pins" in msg and "tctl status" in msg and "\n" not in msg
    assert ident.load(tmp_path / "bad") is None
    # The refusal happened before the token was sent: the same token still joins with the right pin.
    good = make_cfg(tp, token, tmp_path / "good", via="auth", pins=[tp.status_ca_pin()])
    assert join.join(good).generation == 1


def test_used_token_refused(proto_role, tmp_path):
    tp = proto_role
    token = new_bot(tp)[1]
    first = make_cfg(tp, token, tmp_path / "first", via="proxy")
    join.join(first)
    # The same storage: refused locally, the token is never sent again.
    with pytest.raises(JoinError, match="already used for the identity stored"):
        join.join(first)
    # Another host (fresh storage) with the spent token: the server refuses, the message says what to do.
    for via, pins in (("proxy", None), ("auth", [tp.status_ca_pin()])):
        again = make_cfg(tp, token, tmp_path / f"second-{via}", via=via, pins=pins)
        with pytest.raises(JoinError) as err:
            join.join(again)
        msg = str(err.value)
        # v13 answers either "token expired or not found" or, while its cache still holds the just-used
        # token, "already been issued a renewable certificate"; both are explained.
        assert "used, expired or unknown" in msg or "already joined once" in msg, msg
        assert "tctl bots add" in msg and token not in msg
        assert ident.load(tmp_path / f"second-{via}") is None


def test_stale_generation_locks_the_bot_and_store_before_use_prevents_it(proto_role, tmp_path):
    tp = proto_role
    name, token = new_bot(tp)
    storage = tmp_path / "bot"
    cfg = make_cfg(tp, token, storage, via="auth", pins=[tp.status_ca_pin()])
    join.join(cfg)
    stale_dir = tmp_path / "stale-copy"
    stale_dir.mkdir(mode=0o700)
    shutil.copy(storage / ident.IDENTITY_FILE, stale_dir / ident.IDENTITY_FILE)  # generation 1

    # renew_identity() stores before it returns: a "crash" right after it (nothing kept in memory)
    # restarts from disk with the generation the server expects, so the next renewal succeeds.
    with renew.AuthClient(cfg, ident.load(storage)) as client:
        client.renew_identity(3600)
    for expected in (3, 4):
        with renew.AuthClient(cfg, ident.load(storage)) as client:
            assert client.renew_identity(3600).generation == expected

    # Presenting the stale generation-1 copy (what a non-durable write or a second agent does) locks the bot.
    # Without our pre-check (tbot has none): with it, the outcome would depend on whether Teleport's read cache
    # already shows generation 4 (then "lost a renewal", nothing presented) or still 1 (presented, locked).
    stale_cfg = make_cfg(tp, token, stale_dir, via="auth")
    with pytest.raises(LockedError) as err:
        with renew.AuthClient(stale_cfg, ident.load(stale_dir)) as client:
            client.renew_identity(3600, check_generation=False)
    msg = str(err.value)
    assert "generation mismatch" in msg and "stored=4, presented=1" in msg and "tctl get locks" in msg
    assert not err.value.retryable
    deadline = time.monotonic() + 15
    while True:  # the lock is written asynchronously to the answer
        out = tp.tctl("get", "locks", "--format=json", check=True).stdout
        locks = json.loads(out or "null") or []
        mine = [d for d in locks if (d.get("spec", {}).get("target") or {}).get("user") == f"bot-{name}"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert mine, f"no lock for bot-{name} after the generation mismatch: {out}"
    assert "generation mismatch" in mine[0]["spec"]["message"]
    # The refused copy is never presented again (every attempt would lock the bot anew).
    with pytest.raises(LockedError, match="never presented again"):
        with renew.AuthClient(stale_cfg, ident.load(stale_dir)) as client:
            client.renew_identity(3600)
    # An admin removes the lock: the agent holding the newest generation renews again, no re-join needed.
    for d in mine:
        tp.tctl("rm", f"lock/{d['metadata']['name']}", check=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            with renew.AuthClient(cfg, ident.load(storage)) as client:
                assert client.renew_identity(3600).generation == 5
            break
        except RenewError as exc:  # the auth server's lock cache follows within seconds
            assert time.monotonic() < deadline, f"still refused after the lock was removed: {exc}"
            time.sleep(1)
