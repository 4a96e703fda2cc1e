# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 16 point 2: several clusters in one kubeconfig (kubernetes/v2 output), on the real v13 bed.

A private bed (multiplex only: these tests add, relabel and remove Kubernetes clusters, which the shared bed
must not see) serves, next to the static ``example-k8s-cluster`` (env=testbed), dynamic ``kube_cluster``
resources registered with ``tctl create`` (tests/testbed/teleport.py put_kube_cluster), all backed by the bed's
one kube-apiserver. The agent runs as the unprivileged bot user and the reader runs kubectl with the
kubeconfig exactly as written (exec plugin, the default).

renewal_interval is short (5s) here because renewal itself is what is under test: the selectors are resolved
again at every renewal, so a relabelled cluster must leave the kubeconfig at the next one.
"""

from __future__ import annotations

import time

import pytest
import yaml
from cryptography import x509

import testbed as tb
from machine_id_agent import config as configmod
from machine_id_agent import identity as ident
from machine_id_agent import kubecreds, outputs, proto, renew

from testbed.teleport import DYNAMIC_KUBE_LABEL
from test_agent_e2e import wait_for  # noqa: E402

APP_USER = "lanyardtest-app"  # see conftest.py
OID_KUBE = x509.ObjectIdentifier("1.3.9999.1.3")  # the certificate's KubernetesCluster subject attribute
TTL, INTERVAL = "2m", "5s"
TEMPLATE = "{{.KubeName}}@{{.ClusterName}}"

pytestmark = [pytest.mark.testbed]


@pytest.fixture(scope="module")
def mc_bed(testbed_bins):
    try:
        bed = tb.Testbed.start(modes=("multiplex",))
    except (tb.TestbedError, tb.BuildError) as exc:
        pytest.fail("a private test bed failed to start: %s" % exc, pytrace=False)
    tp = bed.teleport["multiplex"]
    tp.put_kube_cluster("mc-alpha", {"team": "blue"})
    tp.put_kube_cluster("mc-beta", {"team": "blue"})
    tp.put_kube_cluster("mc-gamma", {"team": "red"})
    yield bed
    bed.stop()


def v2_output(h, **kw):
    out = {"type": "kubernetes/v2", "destination": {"type": "directory", "path": str(h.dest)},
           "context_name_template": TEMPLATE, "default_namespace": tb.DEMO_NAMESPACE}
    out.update(kw)
    return out


def contexts(h):
    try:
        doc = yaml.safe_load((h.dest / "kubeconfig.yaml").read_text())
    except FileNotFoundError:
        return None
    return sorted(c["name"] for c in doc.get("contexts") or [])


def identities(h):
    return sorted(p.name for p in h.dest.iterdir() if p.name.startswith(outputs.IDENTITY_PREFIX))


def routed_to(h, cluster):
    key, cert = kubecreds.split_bundle((h.dest / outputs.identity_name(cluster)).read_bytes())
    assert outputs.key_matches_cert(key, cert)
    return x509.load_pem_x509_certificate(cert).subject.get_attributes_for_oid(OID_KUBE)[0].value


def pods_in(h, context):
    """kubectl as the reader, the namespace from the context's default_namespace (no -n)."""
    return h.kubectl_as(APP_USER, "--context", context, "get", "pods", "-o", "name")


def test_two_clusters_by_label_in_one_kubeconfig_and_a_relabelled_one_leaves_at_the_next_renewal(mc_bed, make_host):
    tp = mc_bed.teleport["multiplex"]
    h = make_host(tp, kube_cluster=mc_bed.kube)
    h.write_config_v2([v2_output(h, selectors=[{"labels": {"team": "blue"}}])],
                      credential_ttl=TTL, renewal_interval=INTERVAL)
    assert h.init().returncode == 0
    h.start()
    cluster_name = tp.ping()["cluster_name"]
    want = ["mc-alpha@" + cluster_name, "mc-beta@" + cluster_name]
    wait_for(lambda: contexts(h) == want, 90, "kubeconfig with the two team=blue clusters\n" + h.log())
    doc = yaml.safe_load((h.dest / "kubeconfig.yaml").read_text())
    assert doc["current-context"] == want[0]
    assert all(c["context"]["namespace"] == tb.DEMO_NAMESPACE for c in doc["contexts"])
    # example-k8s-cluster (env=testbed) and mc-gamma (team=red) are not selected; one identity per cluster,
    # each certificate routed to its own cluster (v13 routes by that attribute: one certificate per cluster)
    assert identities(h) == ["identity-mc-alpha", "identity-mc-beta"]
    assert routed_to(h, "mc-alpha") == "mc-alpha" and routed_to(h, "mc-beta") == "mc-beta"
    for ctx in want:
        r = pods_in(h, ctx)
        assert r.returncode == 0 and r.stdout.strip() == "pod/%s" % tb.DEMO_POD, (ctx, r.stderr)

    # relabel mc-beta in Teleport: it leaves the kubeconfig (and its file goes) at the next renewal, no restart
    tp.put_kube_cluster("mc-beta", {"team": "red"})
    relabelled = time.monotonic()
    wait_for(lambda: contexts(h) == want[:1], 60, "mc-beta gone from the kubeconfig\n" + h.log()[-3000:])
    took = time.monotonic() - relabelled
    # the stale identity goes right after the kubeconfig is replaced (in that order, so that every context of
    # any kubeconfig a reader loaded has its identity): wait for that step of the same write
    wait_for(lambda: identities(h) == ["identity-mc-alpha"], 10, "identity-mc-beta removed")
    r = pods_in(h, want[1])
    assert r.returncode != 0 and "context" in r.stderr, r.stderr
    assert pods_in(h, want[0]).returncode == 0
    # a cluster added in Teleport appears the same way
    tp.put_kube_cluster("mc-delta", {"team": "blue"})
    wait_for(lambda: contexts(h) == [want[0], "mc-delta@" + cluster_name], 60, "mc-delta added\n" + h.log()[-3000:])
    r = pods_in(h, "mc-delta@" + cluster_name)
    assert r.returncode == 0 and r.stdout.strip() == "pod/%s" % tb.DEMO_POD, r.stderr
    tp.remove_kube_cluster("mc-delta")
    wait_for(lambda: contexts(h) == want[:1], 60, "mc-delta removed\n" + h.log()[-3000:])
    wait_for(lambda: identities(h) == ["identity-mc-alpha"], 10, "identity-mc-delta removed")
    st = h.status()["outputs"][0]
    assert st["valid"] and st["clusters"] == ["mc-alpha"], st
    print("relabelled cluster left the kubeconfig %.1f s after Teleport showed the new labels" % took)


def test_selector_by_name_and_zero_matches(mc_bed, make_host):
    tp = mc_bed.teleport["multiplex"]
    cluster_name = tp.ping()["cluster_name"]
    h = make_host(tp, kube_cluster=mc_bed.kube)
    h.write_config_v2([v2_output(h, selectors=[{"name": "mc-gamma"}, {"name": tb.KUBE_CLUSTER_NAME}])])
    assert h.init().returncode == 0
    r = h.oneshot()
    assert r.returncode == 0, r.stderr
    names = ["%s@%s" % (tb.KUBE_CLUSTER_NAME, cluster_name), "mc-gamma@" + cluster_name]
    assert contexts(h) == names
    for ctx in names:
        r = pods_in(h, ctx)
        assert r.returncode == 0 and r.stdout.strip() == "pod/%s" % tb.DEMO_POD, (ctx, r.stderr)
    # nothing matches: no crash, an empty kubeconfig, the old identities removed, and the log says why
    h.write_config_v2([v2_output(h, selectors=[{"labels": {"team": "nobody"}}])])
    r = h.oneshot()
    assert r.returncode == 0, r.stderr
    assert contexts(h) == [] and identities(h) == []
    assert "no Kubernetes cluster the roles may access matches selectors labels={team: nobody}" in r.stderr + r.stdout


def test_v13_lists_kube_clusters_only_for_the_impersonated_roles(mc_bed, make_host, monkeypatch):
    """The fact the design rests on (docs/protocol-findings.md section 10): the bot's own certificate lists no
    Kubernetes cluster; a certificate impersonating the output's role lists every cluster the role's
    kubernetes_labels allow, with its labels."""
    tp = mc_bed.teleport["multiplex"]
    h = make_host(tp, kube_cluster=mc_bed.kube)
    h.write_config_v2([v2_output(h, selectors=[{"name": "mc-alpha"}])])
    assert h.init().returncode == 0
    assert h.oneshot().returncode == 0
    monkeypatch.setenv("SSL_CERT_FILE", str(tp.web_ca_path))
    cfg = configmod.load(h.config_path)
    idt = ident.load(h.storage)
    with renew.AuthClient(cfg, idt) as client:
        req = proto.ListResourcesRequest(resource_type="kube_server", namespace="default", limit=100)
        own = proto.kube_clusters(client._call("ListResources", req, "list as the bot"))
        listed = client.kube_clusters(None, 600)
    assert own == {}
    assert {tb.KUBE_CLUSTER_NAME, "mc-alpha", "mc-beta", "mc-gamma"} <= set(listed)
    assert listed[tb.KUBE_CLUSTER_NAME]["env"] == "testbed"
    assert listed["mc-alpha"]["team"] == "blue" and listed["mc-gamma"]["team"] == "red"
    assert listed["mc-alpha"][DYNAMIC_KUBE_LABEL] == "yes"
