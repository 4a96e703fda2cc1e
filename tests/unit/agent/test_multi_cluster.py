# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""kubernetes/v2 outputs (several clusters in one kubeconfig): config validation, selector matching,
rendering several contexts, removal of clusters no longer selected, and the service resolving the selectors
again at every renewal (test doubles for Teleport; the real bed is tests/integration/agent/
test_multi_cluster_real.py)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

import test_service
from machine_id_agent import config, kubecreds, outputs, proto
from machine_id_agent.config import KubeSelector
from machine_id_agent.errors import ConfigError, OutputError
from machine_id_agent.service import Agent, select_clusters
from test_outputs import make_creds
from test_service import TOKEN, FakeBackend, FakeClient

logbuf = test_service.logbuf  # a fixture


def v2(tmp_path, **output):
    out = {"type": "kubernetes/v2", "destination": {"type": "directory", "path": str(tmp_path / "out")}}
    out.update(output)
    return {"version": "v2", "proxy_server": "localhost:3080", "onboarding": {"token": TOKEN},
            "storage": {"type": "directory", "path": str(tmp_path / "bot")}, "acls": "off", "outputs": [out]}


# -- config --------------------------------------------------------------------------------------------
def test_config_v2_output_defaults(tmp_path):
    o = config.parse(v2(tmp_path, selectors=[{"labels": {"team": "blue", "tier": 1}}, {"name": "k1"}])).outputs[0]
    assert o.multi and o.type == "kubernetes/v2" and o.kubernetes_cluster == ""
    assert o.selectors == [KubeSelector(labels={"team": "blue", "tier": "1"}), KubeSelector(name="k1")]
    assert o.context_name_template == "{{.ClusterName}}-{{.KubeName}}" and o.default_namespace is None
    assert o.exec_plugin and o.roles == []
    assert o.describe() == "selectors labels={team: blue, tier: 1}, name=k1"


@pytest.mark.parametrize("extra,message", [
    ({}, "outputs[0].selectors: missing; a kubernetes/v2 output needs at least one selector"),
    ({"selectors": []}, "outputs[0].selectors: missing"),
    ({"selectors": "k1"}, "outputs[0].selectors: expected a list, got a string"),
    ({"selectors": [{"name": "a", "labels": {"x": "y"}}]},
     "outputs[0].selectors[0]: give exactly one of name or labels"),
    ({"selectors": [{}]}, "outputs[0].selectors[0]: give exactly one of name or labels"),
    ({"selectors": [{"nmae": "a"}]}, "outputs[0].selectors[0].nmae: unknown key; did you mean 'name'?"),
    ({"selectors": [{"labels": {}}]}, "outputs[0].selectors[0].labels: expected a non-empty mapping"),
    ({"selectors": [{"labels": ["x"]}]}, "outputs[0].selectors[0].labels: expected a non-empty mapping"),
    ({"selectors": [{"labels": {"x": None}}]}, "outputs[0].selectors[0].labels: 'x': None is not a label"),
    ({"selectors": [{"name": "a"}], "kubernetes_cluster": "a"},
     "outputs[0].kubernetes_cluster: a kubernetes/v2 output picks its clusters with selectors; replace it with "
     "selectors: [{name: a}]"),
    ({"selectors": [{"name": "a"}], "context_name_template": "{{.Cluster}}-{{.KubeName}}"},
     "outputs[0].context_name_template: {{.Cluster}} is not supported; only {{.ClusterName}}"),
    ({"selectors": [{"name": "a"}], "context_name_template": "{{ printf \"%s\" .KubeName }}"},
     "is not supported"),
    ({"selectors": [{"name": "a"}], "context_name_template": "{{.ClusterName}}"},
     "does not contain {{.KubeName}}, so several clusters would get the same context name"),
    ({"selectors": [{"name": "a"}], "context_name_template": "{{.KubeName}}}}"}, "has an unbalanced {{ or }}"),
    ({"selectors": [{"name": "a"}], "default_namespace": "Not_A_Namespace"},
     "outputs[0].default_namespace: 'Not_A_Namespace' is not a Kubernetes namespace name"),
    ({"selectors": [{"name": "a"}], "selector": []}, "outputs[0].selector: unknown key; did you mean 'selectors'?"),
])
def test_config_v2_errors_are_one_line_and_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        config.parse(v2(tmp_path, **extra))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_v1_destination_with_selectors_is_a_kubernetes_v2_output(tmp_path):
    doc = {"auth_server": "localhost:3080", "onboarding": {"token": TOKEN},
           "destinations": [{"directory": str(tmp_path / "a"), "selectors": [{"labels": {"team": "blue"}}],
                             "context_name_template": "{{.KubeName}}", "default_namespace": "demo"},
                            {"directory": str(tmp_path / "b"), "kubernetes_cluster": "k"}]}
    a, b = config.parse(doc).outputs
    assert a.multi and a.selectors == [KubeSelector(labels={"team": "blue"})] and a.default_namespace == "demo"
    assert not b.multi and b.kubernetes_cluster == "k"
    doc["destinations"][0]["kubernetes_cluster"] = "k"
    with pytest.raises(ConfigError, match=r"destinations\[0\].kubernetes_cluster: a kubernetes/v2 output picks"):
        config.parse(doc)
    doc["destinations"][0] = {"directory": str(tmp_path / "a"), "default_namespace": "demo"}
    with pytest.raises(ConfigError, match=r"destinations\[0\].selectors: missing"):
        config.parse(doc)


def test_selectors_are_not_accepted_on_a_kubernetes_output(tmp_path):
    doc = v2(tmp_path, selectors=[{"name": "a"}])
    doc["outputs"][0].update(type="kubernetes", kubernetes_cluster="a")
    with pytest.raises(ConfigError, match=r"outputs\[0\].selectors: unknown key"):
        config.parse(doc)


@pytest.mark.parametrize("template,expected", [
    ("{{.ClusterName}}-{{.KubeName}}", "tc-k1"),
    ("{{ .KubeName }}", "k1"),
    ("teleport/{{.ClusterName}}/{{.KubeName}}", "teleport/tc/k1"),
    ("{{.KubeName}}.{{.KubeName}}", "k1.k1"),
])
def test_context_name_template(template, expected):
    config.check_context_template(template, "t")
    assert config.render_context_name(template, "tc", "k1") == expected


# -- selectors -------------------------------------------------------------------------------------------
def test_selector_matching():
    available = {"a": {"team": "blue", "env": "prod"}, "b": {"team": "blue"}, "c": {"team": "red"},
                 "example-k8s-cluster": {"env": "testbed"}}
    blue = KubeSelector(labels={"team": "blue"})
    assert select_clusters([blue], available) == ["a", "b"]
    assert select_clusters([KubeSelector(labels={"team": "blue", "env": "prod"})], available) == ["a"]
    assert select_clusters([KubeSelector(name="c"), blue], available) == ["a", "b", "c"]  # union, sorted, once
    assert select_clusters([KubeSelector(name="c"), KubeSelector(name="c")], available) == ["c"]
    assert select_clusters([KubeSelector(name="gone")], available) == []
    assert select_clusters([KubeSelector(labels={"team": "Blue"})], available) == []  # values are exact


def test_kube_clusters_from_a_list_resources_answer():
    resp = proto.ListResourcesResponse()
    for name, labels in (("a", {"team": "blue"}), ("a", {"team": "blue"}), ("b", {})):
        cl = resp.resources.add().kubernetes_server.spec.cluster
        cl.metadata.name = name
        for k, v in labels.items():
            cl.metadata.labels.add(key=k, value=v)
    dyn = resp.resources.add().kube_cluster
    dyn.metadata.name = "c"
    e = dyn.spec.dynamic_labels.add(key="up")
    e.value.result = "yes"
    resp.resources.add()  # another kind: skipped
    again = proto.ListResourcesResponse.FromString(resp.SerializeToString())
    assert proto.kube_clusters(again) == {"a": {"team": "blue"}, "b": {}, "c": {"up": "yes"}}


# -- writing -----------------------------------------------------------------------------------------------
def out_for(tmp_path, **kw):
    doc = v2(tmp_path, selectors=[{"labels": {"team": "blue"}}], **kw)
    return config.parse(doc).outputs[0]


def ep():
    return outputs.KubeEndpoint("https://proxy.example.com:443", "kube-teleport-proxy-alpn.proxy.example.com")


def kubeconfig(dest):
    return yaml.safe_load((dest / "kubeconfig.yaml").read_text())


def test_write_several_clusters_exec_plugin(tmp_path):
    o = out_for(tmp_path, default_namespace="demo", context_name_template="{{.KubeName}}@{{.ClusterName}}")
    creds = {"zeta": make_creds(), "alpha": make_creds(days_valid=0.5)}
    res = outputs.write_kube_multi(o, creds, "tc", ep(), creds["zeta"].host_ca_pems)
    dest = tmp_path / "out"
    assert sorted(os.listdir(dest)) == ["identity-alpha", "identity-zeta", "identity.validity.json", "kubeconfig.yaml",
                                        "teleport-host-ca.crt"]
    assert all(os.stat(dest / n).st_mode & 0o777 == 0o600 for n in os.listdir(dest))
    assert res.clusters == ["alpha", "zeta"] and res.not_after == creds["alpha"].not_after
    # each cluster's identity file has its record (the plugin's answer without reading the certificate)
    record = json.loads((dest / kubecreds.VALIDITY).read_text())
    assert sorted(record) == ["identity-alpha", "identity-zeta"]
    assert record["identity-alpha"]["not_after"] == creds["alpha"].not_after.isoformat()
    kc = kubeconfig(dest)
    assert [c["name"] for c in kc["contexts"]] == ["alpha@tc", "zeta@tc"]
    assert kc["current-context"] == "alpha@tc"
    for c in kc["contexts"]:
        assert c["context"] == {"cluster": c["name"], "user": c["name"], "namespace": "demo"}
    assert {c["cluster"]["server"] for c in kc["clusters"]} == {"https://proxy.example.com:443"}
    assert {c["cluster"]["tls-server-name"] for c in kc["clusters"]} == {"kube-teleport-proxy-alpn.proxy.example.com"}
    by_user = {u["name"]: u["user"]["exec"] for u in kc["users"]}
    assert by_user["alpha@tc"]["args"][-4:] == ["--destination-dir", str(dest), "--cluster", "alpha"]
    assert by_user["zeta@tc"]["args"][-2:] == ["--cluster", "zeta"]
    # the exec plugin hands out exactly that cluster's pair
    for name in ("alpha", "zeta"):
        ec = kubecreds.exec_credential(dest, cluster=name)
        assert ec["status"]["clientCertificateData"] == creds[name].cert_pem.decode()
        assert ec["status"]["clientKeyData"] == creds[name].key_pem.decode()
    with pytest.raises(OutputError, match="no identity-gone; cluster 'gone' is not \\(or no longer\\) selected"):
        kubecreds.exec_credential(dest, cluster="gone")
    st = outputs.inspect(dest)
    assert st["valid"] and st["clusters"] == ["alpha", "zeta"]
    assert st["expires"] == creds["alpha"].not_after.isoformat()


def test_write_removes_clusters_no_longer_selected_and_files_of_a_v1_output(tmp_path):
    o = out_for(tmp_path)
    dest = tmp_path / "out"
    dest.mkdir(mode=0o700)
    for stale in ("identity", "key", "tlscert"):  # a kubernetes output wrote here before
        (dest / stale).write_text("old")
    outputs.write_kube_multi(o, {"a": make_creds(), "b": make_creds()}, "tc", ep(), make_creds().host_ca_pems)
    assert sorted(os.listdir(dest)) == ["identity-a", "identity-b", "identity.validity.json", "kubeconfig.yaml",
                                        "teleport-host-ca.crt"]
    res = outputs.write_kube_multi(o, {"b": make_creds()}, "tc", ep(), make_creds().host_ca_pems)
    assert res.clusters == ["b"]
    assert sorted(os.listdir(dest)) == ["identity-b", "identity.validity.json", "kubeconfig.yaml", "teleport-host-ca.crt"]
    assert list(json.loads((dest / "identity.validity.json").read_text())) == ["identity-b"]
    assert [c["name"] for c in kubeconfig(dest)["contexts"]] == ["tc-b"]
    # nothing selected: a kubeconfig without contexts, no identities, not valid
    res = outputs.write_kube_multi(o, {}, "tc", ep(), make_creds().host_ca_pems)
    assert res.clusters == [] and res.not_after is None
    assert sorted(os.listdir(dest)) == ["kubeconfig.yaml", "teleport-host-ca.crt"]
    kc = kubeconfig(dest)
    assert kc["contexts"] == [] and "current-context" not in kc
    assert not outputs.inspect(dest)["valid"]


def test_write_inline_credentials(tmp_path):
    o = out_for(tmp_path, exec_plugin=False)
    creds = {"a": make_creds(), "b": make_creds()}
    outputs.write_kube_multi(o, creds, "tc", ep(), creds["a"].host_ca_pems)
    dest = tmp_path / "out"
    assert sorted(os.listdir(dest)) == ["kubeconfig.yaml", "teleport-host-ca.crt"]
    users = {u["name"]: u["user"] for u in kubeconfig(dest)["users"]}
    import base64
    assert base64.b64decode(users["tc-a"]["client-certificate-data"]) == creds["a"].cert_pem
    assert base64.b64decode(users["tc-b"]["client-key-data"]) == creds["b"].key_pem


def test_write_refuses_a_cluster_name_that_cannot_be_a_file(tmp_path):
    with pytest.raises(OutputError, match="cannot name a file"):
        outputs.write_kube_multi(out_for(tmp_path), {"../evil": make_creds()}, "tc", ep(), make_creds().host_ca_pems)
    assert not (tmp_path / "evil").exists()


def test_cli_kube_credentials_cluster(tmp_path, capsys):
    from machine_id_agent import cli
    o = out_for(tmp_path)
    creds = {"a": make_creds(), "b": make_creds()}
    outputs.write_kube_multi(o, creds, "tc", ep(), creds["a"].host_ca_pems)
    assert cli.main(["kube", "credentials", "--destination-dir", str(tmp_path / "out"), "--cluster", "b"]) == 0
    assert json.loads(capsys.readouterr().out)["status"]["clientCertificateData"] == creds["b"].cert_pem.decode()


# -- the service: selectors resolved at every renewal --------------------------------------------------------
class MultiClient(FakeClient):
    def kube_clusters(self, roles, ttl):
        self.be.calls.append(("list", tuple(roles or ())))
        return dict(self.be.available)

    def kube_credentials_for(self, clusters, roles, ttl):
        self.be.calls.append(("kube-multi", tuple(clusters)))
        return {c: self.be.creds for c in clusters}


class MultiBackend(FakeBackend):
    def __init__(self):
        super().__init__()
        self.available = {}

    def client(self, cfg, ident, facts):
        return MultiClient(self, ident)


def load(tmp_path, doc):
    p = tmp_path / "tbot.yaml"
    p.write_text(yaml.safe_dump(doc))
    return config.load(p)


def test_service_follows_added_relabelled_and_removed_clusters(tmp_path, logbuf):
    be = MultiBackend()
    be.available = {"a": {"team": "blue"}, "b": {"team": "blue"}, "c": {"team": "red"}}
    cfg = load(tmp_path, v2(tmp_path, selectors=[{"labels": {"team": "blue"}}], roles=["kube-role"]))
    agent = Agent(cfg, backend=be, log=logbuf[0])
    dest = tmp_path / "out"
    assert agent.attempt() is None
    assert ("list", ("kube-role",)) in be.calls and ("kube-multi", ("a", "b")) in be.calls
    assert [c["name"] for c in kubeconfig(dest)["contexts"]] == ["lanyard-testbed-a", "lanyard-testbed-b"]
    snap = agent.snapshot()
    assert snap["ready"] and snap["outputs"][0]["kubernetes_clusters"] == ["a", "b"]
    # relabelled in Teleport: gone at the next renewal (no restart), with its file
    be.available["b"] = {"team": "red"}
    be.available["d"] = {"team": "blue"}  # and a new one appears
    assert agent.attempt() is None
    assert [c["name"] for c in kubeconfig(dest)["contexts"]] == ["lanyard-testbed-a", "lanyard-testbed-d"]
    assert sorted(n for n in os.listdir(dest) if n.startswith("identity-")) == ["identity-a", "identity-d"]
    # nothing matches any more: not a crash, not a failed renewal, but not ready, and it says why
    be.available = {"c": {"team": "red"}}
    assert agent.attempt() is None
    snap = agent.snapshot()
    assert not snap["ready"] and "no Kubernetes cluster the roles may access matches selectors labels={team: blue}" \
        in snap["reason"]
    assert kubeconfig(dest)["contexts"] == [] and not [n for n in os.listdir(dest) if n.startswith("identity-")]
    assert "no Kubernetes cluster the roles may access matches" in logbuf[1].getvalue()
    # back again
    be.available = {"a": {"team": "blue"}}
    assert agent.attempt() is None and agent.snapshot()["ready"]
