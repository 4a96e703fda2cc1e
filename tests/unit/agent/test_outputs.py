# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Kubernetes outputs: kubeconfig rendering like tbot, atomic files, exec-plugin credentials."""

from __future__ import annotations

import base64
import datetime as dt
import os
import stat
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from machine_id_agent import fsutil, kubecreds, outputs
from machine_id_agent.config import KubeOutput
from machine_id_agent.errors import OutputError


def _pem_cert(key, issuer_key, cn, days_valid=1.0, ca=False):
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
         .not_valid_after(now + dt.timedelta(days=days_valid)))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclass
class Creds:
    key_pem: bytes
    cert_pem: bytes
    host_ca_pems: list
    not_after: dt.datetime
    ssh_cert: bytes = b""


def make_creds(days_valid=1.0) -> Creds:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _pem_cert(key, ca_key, "bot-example", days_valid)
    return Creds(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption()), cert,
                 [_pem_cert(ca_key, ca_key, "lanyard-testbed", 30, ca=True)], outputs.cert_not_after(cert))


def facts(**kw):
    base = dict(cluster_name="lanyard-testbed", tls_routing=False, kube_public_addr=None, kube_listen_addr=None,
                web_addr="proxy.example.com:3080", raw={})
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("f,server,sni", [
    (facts(tls_routing=True), "https://proxy.example.com:3080", "kube-teleport-proxy-alpn.proxy.example.com"),
    (facts(tls_routing=True, web_addr="127.0.0.1:3080"), "https://127.0.0.1:3080",
     "kube-teleport-proxy-alpn.teleport.cluster.local"),
    (facts(tls_routing=True, raw={"proxy": {"ssh": {"public_addr": "pub.example.com:443"}}}),
     "https://pub.example.com:443", "kube-teleport-proxy-alpn.pub.example.com"),
    (facts(kube_public_addr="kube.example.com:3026"), "https://kube.example.com:3026", None),
    (facts(kube_listen_addr="0.0.0.0:3099"), "https://proxy.example.com:3099", None),
    (facts(), "https://proxy.example.com:3026", None),
])
def test_kube_endpoint_follows_tbot_rules(f, server, sni):
    ep = outputs.kube_endpoint(f)
    assert (ep.server, ep.tls_server_name) == (server, sni)


def test_kube_endpoint_without_facts_is_explained():
    with pytest.raises(OutputError, match="proxy address is unknown"):
        outputs.kube_endpoint(None)


def test_write_kube_inline(tmp_path):
    c = make_creds()
    dest = tmp_path / "out"
    out = KubeOutput(destination=dest, kubernetes_cluster="example-k8s-cluster", exec_plugin=False)
    ep = outputs.KubeEndpoint("https://proxy.example.com:3080", "kube-teleport-proxy-alpn.proxy.example.com")
    res = outputs.write_kube(out, c, "lanyard-testbed", ep, acls="off")
    assert res.not_after == c.not_after
    assert sorted(p.name for p in dest.iterdir()) == ["key", "kubeconfig.yaml", "teleport-host-ca.crt", "tlscert"]
    for p in dest.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    assert (dest / "key").read_bytes() == c.key_pem and (dest / "tlscert").read_bytes() == c.cert_pem
    doc = yaml.safe_load((dest / "kubeconfig.yaml").read_text())
    name = "lanyard-testbed-example-k8s-cluster"
    assert doc["current-context"] == name
    assert [x["name"] for x in doc["clusters"]] == [name] == [x["name"] for x in doc["users"]]
    assert doc["contexts"] == [{"name": name, "context": {"cluster": name, "user": name}}]
    cl = doc["clusters"][0]["cluster"]
    assert cl["server"] == ep.server and cl["tls-server-name"] == ep.tls_server_name
    assert base64.b64decode(cl["certificate-authority-data"]) == c.host_ca_pems[0]
    user = doc["users"][0]["user"]
    assert base64.b64decode(user["client-certificate-data"]) == c.cert_pem
    assert base64.b64decode(user["client-key-data"]) == c.key_pem
    st = outputs.inspect(dest)
    assert st["valid"] and st["present"] and st["seconds_to_expiry"] > 3600 and st["error"] is None


def test_exec_plugin_mode_and_credentials(tmp_path):
    c = make_creds()
    dest = tmp_path / "out"
    out = KubeOutput(destination=dest, kubernetes_cluster="k")  # the default: exec plugin
    outputs.write_kube(out, c, "tc", outputs.KubeEndpoint("https://k.example.com:3026"), acls="off")
    assert sorted(p.name for p in dest.iterdir()) == ["identity", "identity.validity.json", "key", "kubeconfig.yaml",
                                                      "teleport-host-ca.crt", "tlscert"]
    assert (dest / "identity").read_bytes() == c.key_pem + c.cert_pem
    doc = yaml.safe_load((dest / "kubeconfig.yaml").read_text())
    user = doc["users"][0]["user"]
    assert list(user) == ["exec"], "no inline key or certificate in the kubeconfig"
    ex = user["exec"]
    assert ex["apiVersion"] == "client.authentication.k8s.io/v1beta1"
    assert ex["args"][-4:] == ["kube", "credentials", "--destination-dir", str(dest)]
    assert os.path.isabs(ex["command"]) and os.access(ex["command"], os.X_OK)
    assert ex["interactiveMode"] == "Never" and ex["provideClusterInfo"] is False
    assert "exec_plugin: false" in ex["installHint"]
    assert "tls-server-name" not in doc["clusters"][0]["cluster"]
    cred = kubecreds.exec_credential(dest)
    assert cred["kind"] == "ExecCredential"
    assert cred["status"]["clientCertificateData"].encode() == c.cert_pem
    assert cred["status"]["clientKeyData"].encode() == c.key_pem
    exp = dt.datetime.strptime(cred["status"]["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.timezone.utc)
    assert abs((c.not_after - exp).total_seconds() - 60) < 2


def test_exec_credential_refuses_expired(tmp_path):
    c = make_creds(days_valid=-0.01)
    dest = tmp_path / "out"
    outputs.write_kube(KubeOutput(destination=dest, kubernetes_cluster="k", exec_plugin=True), c, "tc",
                       outputs.KubeEndpoint("https://x:1"), acls="off")
    with pytest.raises(OutputError, match="expired"):
        kubecreds.exec_credential(dest)
    assert outputs.inspect(dest)["valid"] is False


def test_atomic_write_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def boom(fd):
        raise OSError(28, "No space left on device")
    with pytest.raises(OutputError, match="No space left"):
        fsutil.atomic_write(target, b"new", prepare=boom)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_reader_never_sees_a_torn_kubeconfig(tmp_path):
    """A reader racing many rewrites always parses a kubeconfig whose certificate matches its key."""
    dest = tmp_path / "out"
    out = KubeOutput(destination=dest, kubernetes_cluster="k")
    ep = outputs.KubeEndpoint("https://x:1")
    creds = [make_creds() for dummy in range(3)]
    outputs.write_kube(out, creds[0], "tc", ep, acls="off")
    stop = threading.Event()
    bad = []
    reads = [0]

    def reader():
        while not stop.is_set():
            st = outputs.inspect(dest)
            reads[0] += 1
            if not st["valid"]:
                bad.append(st)
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            outputs.write_kube(out, creds[i % 3], "tc", ep, acls="off")
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:3]
    assert reads[0] > 10
    assert not [p for p in os.listdir(dest) if p.startswith(fsutil.TMP_PREFIX)]


def test_inspect_reports_mismatch_and_garbage(tmp_path):
    a, b = make_creds(), make_creds()
    dest = tmp_path / "out"
    outputs.write_kube(KubeOutput(destination=dest, kubernetes_cluster="k", exec_plugin=False),
                       Creds(a.key_pem, b.cert_pem, a.host_ca_pems, b.not_after), "tc",
                       outputs.KubeEndpoint("https://x:1"), acls="off")
    assert outputs.inspect(dest)["error"] == "certificate does not match key"
    (dest / "kubeconfig.yaml").write_text("{{{ not yaml")
    st = outputs.inspect(dest)
    assert st["present"] and not st["valid"] and st["error"].startswith("unreadable")
    assert outputs.inspect(tmp_path / "none")["present"] is False


# ----- issue 11: destinations opened without following planted symlinks --------------------------------

def test_write_kube_refuses_a_symlinked_parent_and_writes_nothing_through_it(tmp_path):
    real = tmp_path / "real"
    (real / "out").mkdir(parents=True)
    os.symlink(str(real), str(tmp_path / "link"))
    ep = outputs.KubeEndpoint("https://x:1")
    for mode in ("secure", "try-secure"):
        out = KubeOutput(destination=tmp_path / "link" / "out", kubernetes_cluster="k", symlinks=mode, acls="off")
        with pytest.raises(OutputError, match="link is a symlink that the agent will not follow"):
            outputs.write_kube(out, make_creds(), "tc", ep)
        assert os.listdir(real / "out") == []
    # the destination itself a symlink
    os.symlink(str(real / "out"), str(tmp_path / "dest"))
    with pytest.raises(OutputError, match="symlink"):
        outputs.write_kube(KubeOutput(destination=tmp_path / "dest", kubernetes_cluster="k", acls="off"),
                           make_creds(), "tc", ep)
    assert os.listdir(real / "out") == []
    # insecure follows, as tbot does
    out = KubeOutput(destination=tmp_path / "link" / "out", kubernetes_cluster="k", symlinks="insecure", acls="off")
    outputs.write_kube(out, make_creds(), "tc", ep)
    assert "kubeconfig.yaml" in os.listdir(real / "out")


def test_switching_off_exec_plugin_removes_the_identity_file(tmp_path):
    dest = tmp_path / "out"
    ep = outputs.KubeEndpoint("https://x:1")
    outputs.write_kube(KubeOutput(destination=dest, kubernetes_cluster="k", exec_plugin=True), make_creds(), "tc",
                       ep, acls="off")
    assert (dest / outputs.IDENTITY).exists()
    outputs.write_kube(KubeOutput(destination=dest, kubernetes_cluster="k", exec_plugin=False), make_creds(), "tc",
                       ep, acls="off")
    assert not (dest / outputs.IDENTITY).exists()


@pytest.mark.parametrize("exec_plugin", [False, True])
def test_every_renewal_replaces_kubeconfig_last_even_when_its_text_is_the_same(tmp_path, monkeypatch, exec_plugin):
    """The role's reader reload wiring (machine_id_reload_units) has systemd watch kubeconfig.yaml: it must be
    replaced (a new inode by rename) once per renewal and after every other file, in both output modes, also when
    its text does not change (exec-plugin mode). Skipping an unchanged kubeconfig would stop those reloads."""
    order = []
    real = fsutil.Dir.write

    def spy(self, name, *a, **kw):
        order.append(name)
        return real(self, name, *a, **kw)

    monkeypatch.setattr(fsutil.Dir, "write", spy)
    dest = tmp_path / "out"
    out = KubeOutput(destination=dest, kubernetes_cluster="k", exec_plugin=exec_plugin)
    ep = outputs.KubeEndpoint("https://k.example.com:3026")
    c1, c2 = make_creds(), make_creds()
    c2.host_ca_pems = c1.host_ca_pems  # a renewal under the same host CA: new key and certificate only
    outputs.write_kube(out, c1, "tc", ep, acls="off")
    first = dest / "kubeconfig.yaml"
    ino, text = first.stat().st_ino, first.read_bytes()
    keep = open(first, "rb")  # holds the old inode, so its number cannot be reused by the next file
    try:
        order.clear()
        outputs.write_kube(out, c2, "tc", ep, acls="off")
        assert order[-1] == "kubeconfig.yaml" and order.count("kubeconfig.yaml") == 1, order
        assert {"key", "tlscert", "teleport-host-ca.crt"} <= set(order[:-1]), order
        assert (dest / "kubeconfig.yaml").stat().st_ino != ino
        assert ((dest / "kubeconfig.yaml").read_bytes() == text) is exec_plugin
    finally:
        keep.close()


# ----- issue 16: the exec plugin is the default, so long-running clients pick up renewed certificates ------------

def _short_cert(lifetime_s: float, elapsed_s: float):
    """A key and a certificate issued ``elapsed_s`` ago, valid for ``lifetime_s`` in all."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bot-short")])
    nb = now - dt.timedelta(seconds=elapsed_s)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(nb)
            .not_valid_after(nb + dt.timedelta(seconds=lifetime_s)).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    kpem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    return Creds(kpem, pem, [pem], outputs.cert_not_after(pem))


@pytest.mark.parametrize("lifetime,margin", [(3660, 60), (86400, 60), (120, 12), (70, 7)])
def test_expiration_timestamp_is_before_not_after_by_a_tenth_of_the_lifetime_at_most_a_minute(
        tmp_path, lifetime, margin):
    c = _short_cert(lifetime, 1)
    dest = tmp_path / "out"
    outputs.write_kube(KubeOutput(destination=dest, kubernetes_cluster="k"), c, "tc",
                       outputs.KubeEndpoint("https://x:1"), acls="off")
    cred = kubecreds.exec_credential(dest)
    exp = dt.datetime.strptime(cred["status"]["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.timezone.utc)
    assert margin <= (c.not_after - exp).total_seconds() < margin + 1


def test_exec_credential_errors_name_destination_cause_and_fix(tmp_path, monkeypatch):
    ep = outputs.KubeEndpoint("https://x:1")
    dest = tmp_path / "out"
    with pytest.raises(OutputError, match=r"out: no identity or kubeconfig.yaml yet; start the agent"):
        kubecreds.exec_credential(dest)
    outputs.write_kube(KubeOutput(destination=dest, kubernetes_cluster="k"), make_creds(), "tc", ep, acls="off")
    (dest / "identity").unlink()  # exec kubeconfig, identity gone
    st = outputs.inspect(dest)
    assert st["present"] and not st["valid"]
    assert st["error"] == "no identity (what the exec plugin reads) and no inline credentials in kubeconfig.yaml"
    with pytest.raises(OutputError, match=r"out: no key and certificate in identity .*let the agent finish"):
        kubecreds.exec_credential(dest)
    a, b = make_creds(), make_creds()
    (dest / "identity").write_bytes(a.key_pem + b.cert_pem)
    with pytest.raises(OutputError, match=r"out: the key and the certificate do not match; restart the agent"):
        kubecreds.exec_credential(dest)
    (dest / "identity").write_bytes(a.key_pem + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(OutputError, match=r"out: identity is damaged .*restart the agent"):
        kubecreds.exec_credential(dest)
    expired = make_creds(days_valid=-0.01)
    (dest / "identity").write_bytes(expired.key_pem + expired.cert_pem)
    with pytest.raises(OutputError, match=r"out: the certificate expired at .*check that the agent is running"):
        kubecreds.exec_credential(dest)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(fsutil, "read_bytes", denied)
    with pytest.raises(OutputError, match=r"out: \S+ may not read .*identity; add it to the output's readers"):
        kubecreds.exec_credential(dest)


def test_plugin_program_is_this_installation_never_path(tmp_path, monkeypatch):
    # the console script the agent was started as
    script = tmp_path / "venv" / "bin" / "machine-id-agent"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr("sys.argv", [str(script), "start"])
    assert outputs.plugin_program() == [str(script)]
    # started as `python -m machine_id_agent`: the console script of the interpreter's environment ...
    monkeypatch.setattr("sys.argv", ["/somewhere/machine_id_agent/__main__.py", "start"])
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    other = tmp_path / "path" / "machine-id-agent"  # ... never one found on PATH
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", str(other.parent))
    assert outputs.plugin_program() == [str(script)]
    # no console script there: this interpreter with -m
    monkeypatch.setattr("sys.prefix", str(tmp_path / "nothing"))
    import sys
    assert outputs.plugin_program() == [sys.executable, "-m", "machine_id_agent"]


def test_identity_file_carries_the_ssh_certificate_like_teleports_identity_files(tmp_path):
    """With the SSH certificate Teleport issued for the same key, ``identity`` is a Teleport identity file (key, SSH
    certificate line, TLS certificate): tbot's ``kube credentials`` (in a kubeconfig tbot wrote before the agent took
    the host over) refuses one without the SSH line; the agent's own plugin still reads key and certificate."""
    import dataclasses
    c = dataclasses.replace(make_creds(), ssh_cert=b"ssh-rsa-cert-v01@openssh.com AAAAc2g= bot\n")
    dest = tmp_path / "out"
    outputs.write_kube(KubeOutput(destination=dest, kubernetes_cluster="k"), c, "tc",
                       outputs.KubeEndpoint("https://k.example.com:3026"), acls="off")
    data = (dest / "identity").read_bytes()
    assert data == c.key_pem + b"ssh-rsa-cert-v01@openssh.com AAAAc2g= bot\n" + c.cert_pem
    assert outputs.read_credentials(dest) == {"key": c.key_pem, "cert": c.cert_pem}
    assert outputs.inspect(dest)["valid"]
