# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 16 point 2 through the role: a ``machine_id_destinations`` item with ``selectors`` (kubernetes/v2, several
clusters in one kubeconfig) on a real systemd host, with the role's default certificate TTL (1h) and renewal
interval (20m).

A private bed (multiplex only: these tests add, relabel and remove Kubernetes clusters, which the shared bed must
not see) serves, next to the static ``example-k8s-cluster`` (env=testbed), dynamic ``kube_cluster`` resources
registered with ``tctl create`` (mc-alpha and mc-beta labelled team=blue, mc-gamma team=red), all backed by the
bed's one kube-apiserver. One systemd-nspawn Debian 12 host (vr-1) gets the role through playbooks/rollout.yml
with one destination selecting ``team: blue`` and a context name template; the template's braces are marked
``!unsafe`` in an extra-vars file, as docs/role.md tells users to.

The relabel/remove step does not wait 20 minutes for the next scheduled renewal: it triggers one the way an
operator can, ``systemctl reload machine-id.service`` (SIGHUP: the agent reloads its config and runs a renewal
cycle at once, which resolves the selectors against Teleport again; docs/agent.md, "Signals"). Nothing in the
host's configuration is shortened for the test.
"""

from __future__ import annotations

import base64
import re
import time

import pytest
import yaml

import testbed as tb
from helpers import promtool as pt
from helpers.fleet import GUEST_KUBECTL, Fleet, changed_by_host, wait_for
from testbed.teleport import DYNAMIC_KUBE_LABEL

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

HOST = "vr-1"
DEST = "/opt/machine-id-fleet"
DIAG = "127.0.0.1:9101"
TEMPLATE = "{{.KubeName}}@{{.ClusterName}}"
VERIFY = "lanyard.machine_id.machine_id : Ask the cluster, as the reader, the verify question (kubectl auth can-i)"
STATE = "lanyard.machine_id.machine_id : Read the agent's install, identity and unit, and what differs from this role's settings"
FINAL = "The reader reaches the cluster through the kubeconfig"


def _extra_vars(path, selectors) -> None:
    """machine_id_destinations as a user writes it: the Go template marked !unsafe (yaml.safe_dump cannot write
    the tag, so the file is written by hand)."""
    path.write_text("machine_id_destinations:\n"
                    f"  - directory: {DEST}\n"
                    f"    selectors: {yaml.safe_dump(selectors, default_flow_style=True).strip()}\n"
                    f"    context_name_template: !unsafe \"{TEMPLATE}\"\n"
                    f"    default_namespace: {tb.DEMO_NAMESPACE}\n")


@pytest.fixture(scope="module")
def fleet(bed, tmp_path_factory):
    tp = bed.teleport["multiplex"]
    f = None
    try:
        tp.put_kube_cluster("mc-alpha", {"team": "blue"})
        tp.put_kube_cluster("mc-beta", {"team": "blue"})
        tp.put_kube_cluster("mc-gamma", {"team": "red"})
        f = Fleet(tmp_path_factory.mktemp("multi-cluster-role"), teleport=tp, kube=bed.kube)
        # the diagnostics address is opt-in in the role (machine_id_diag_addr); TTL and interval are the defaults
        f.host_vars[HOST] = {"machine_id_diag_addr": DIAG}
        f.extra_vars = f.workdir / "destinations.yml"
        _extra_vars(f.extra_vars, [{"labels": {"team": "blue"}}])
        f.add_hosts([HOST])
        f.cluster_name = tp.ping()["cluster_name"]
        yield f
    finally:
        if f is not None:
            f.stop()


def _rollout(fleet, *args, **kw):
    return fleet.rollout(extra_args=["-e", f"@{fleet.extra_vars}", *args], **kw)


def _assert_ok(run):
    assert run.rc == 0, run.stdout[-6000:]


def _sh(fleet, script: str, user: str | None = None):
    argv = ["sh", "-c", script] if user is None else ["runuser", "-u", user, "--", "sh", "-c", script]
    return fleet.hosts[HOST].run(argv, check=False)


def _contexts(fleet) -> list[str] | None:
    r = _sh(fleet, f"cat {DEST}/kubeconfig.yaml")
    if r.returncode != 0:
        return None
    return sorted(c["name"] for c in (yaml.safe_load(r.stdout) or {}).get("contexts") or [])


def _identities(fleet) -> list[str]:
    return sorted(n for n in _sh(fleet, f"ls {DEST}").stdout.split() if n.startswith("identity-"))


def _pods(fleet, context: str, user: str = "app"):
    """kubectl through the context, the namespace from the context's default_namespace (no -n)."""
    return fleet.hosts[HOST].run(["runuser", "-u", user, "--", GUEST_KUBECTL, "--kubeconfig", f"{DEST}/kubeconfig.yaml",
                                  "--context", context, "get", "pods", "-o", "name"], check=False, timeout=120)


def _ctx(fleet, *clusters) -> list[str]:
    return sorted(f"{c}@{fleet.cluster_name}" for c in clusters)


def _metrics(fleet) -> str:
    r = _sh(fleet, "python3 -c \"import urllib.request as u; "
                   f"print(u.urlopen('http://{DIAG}/metrics', timeout=10).read().decode(), end='')\"")
    assert r.returncode == 0, r.stderr
    return r.stdout


def _series(text: str, name: str) -> dict:
    return {m.group(1) or "": float(m.group(2))
            for m in re.finditer(r"^machine_id_agent_%s(\{[^}]*\})? (\S+)$" % name, text, re.M)}


def _host_files(fleet) -> str:
    paths = ["/etc/tbot.yaml", "/etc/machine-id-agent", "/var/lib/teleport", DEST, "/opt/machine-id",
             "/opt/machine-id-agent", "/etc/systemd/system/machine-id.service"]
    return _sh(fleet, "find " + " ".join(paths) + " -printf '%p %m %u %s\\n' 2>/dev/null | sort").stdout


def _reload_agent(fleet) -> None:
    """One renewal now, as an operator would trigger it: systemctl reload (SIGHUP) and wait for the cycle's log."""
    def written() -> int:  # output writes so far: with clusters selected, or with none
        out = _sh(fleet, "journalctl -u machine-id.service -o cat --no-pager | "
                         "grep -c -e 'wrote Kubernetes' -e 'no Kubernetes cluster the roles may access' || true")
        return int(out.stdout.strip() or 0)
    n = written()
    r = _sh(fleet, "systemctl reload machine-id.service")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: written() > n, 60, 0.5), _sh(fleet, "journalctl -u machine-id.service -n 20 --no-pager").stdout


def test_0_check_mode_on_a_fresh_host_mints_nothing_and_writes_nothing(fleet):
    tokens, files = fleet.token_creations(), _host_files(fleet)
    run = _rollout(fleet, check=True, diff=True)
    _assert_ok(run)
    assert changed_by_host(run).get(HOST, 0) > 0
    assert run.result("lanyard.machine_id.machine_id : Report that a real run would join this host with a new token "
                      "(check mode)", HOST)
    assert fleet.token_creations() == tokens
    assert _host_files(fleet) == files
    assert "PRIVATE KEY" not in run.stdout


def test_1_rollout_writes_one_kubeconfig_with_a_context_per_selected_cluster(fleet):
    tokens = fleet.token_creations()
    run = _rollout(fleet)
    _assert_ok(run)
    assert fleet.token_creations() - tokens == 1
    want = _ctx(fleet, "mc-alpha", "mc-beta")  # team=blue; example-k8s-cluster and mc-gamma are not selected
    assert _contexts(fleet) == want
    assert _identities(fleet) == ["identity-mc-alpha", "identity-mc-beta"]
    # the verify phase asked the cluster through every context as the reader (and the final check was not repeated)
    asked = run.result(VERIFY, HOST)["checks"]
    assert sorted(r["context"] for r in asked) == want and all(r["stdout"] == "yes" for r in asked), asked
    assert run.result(FINAL, HOST)["_status"] == "skipped"
    for ctx in want:
        r = _pods(fleet, ctx)
        assert r.returncode == 0 and r.stdout.strip() == f"pod/{tb.DEMO_POD}", (ctx, r.stderr)
        # another local user can read neither the kubeconfig nor the identities
        r = _pods(fleet, ctx, user="nobody")
        assert r.returncode != 0 and "permission denied" in r.stderr.lower(), (ctx, r.stdout, r.stderr)
    r = _sh(fleet, f"cat {DEST}/identity-mc-alpha", user="nobody")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    r = _sh(fleet, f"ls {DEST}", user="nobody")
    assert r.returncode != 0, r.stdout


def test_2_metrics_name_each_cluster_and_pass_promtool(fleet):
    text = _metrics(fleet)
    r = pt.check_metrics(text)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    assert _series(text, "selected_clusters") == {f'{{destination="{DEST}"}}': 2}, text
    per = _series(text, "cluster_seconds_to_expiry")
    key = '{destination="%s",kubernetes_cluster="%s"}'
    assert sorted(per) == [key % (DEST, "mc-alpha"), key % (DEST, "mc-beta")], text
    # the role's default certificate_ttl (1h): fresh certificates, each valid for about an hour
    assert all(3000 < v <= 3600 for v in per.values()), per
    soonest = list(_series(text, "seconds_to_expiry").values())
    assert soonest == [min(per.values())]
    print("metrics: " + " ".join(f"{k}={v:.0f}" for k, v in sorted(per.items())))


def test_3_reruns_change_nothing(fleet):
    tokens = fleet.token_creations()
    for args, check in (((), False), (("--tags", "machine_id_configure"), False), ((), True)):
        run = _rollout(fleet, *args, check=check)
        _assert_ok(run)
        assert changed_by_host(run).get(HOST) == 0, (args, check, changed_by_host(run))
        if not args and not check:
            # the converged run still asks the cluster through every context: in the one module run on the host
            asked = run.result(STATE, HOST)["cluster_check"]
            assert sorted(r["context"] for r in asked) == _ctx(fleet, "mc-alpha", "mc-beta"), asked
            assert [r["stdout"] for r in asked] == ["yes", "yes"], asked
    assert fleet.token_creations() == tokens
    assert _contexts(fleet) == _ctx(fleet, "mc-alpha", "mc-beta")


def test_4_the_kubeconfig_follows_teleport_at_the_next_renewal(fleet):
    tp = fleet.teleport
    before = _sh(fleet, "systemctl show -p MainPID --value machine-id.service").stdout.strip()
    # relabelled away: mc-beta leaves at the next renewal, its identity file with it
    tp.put_kube_cluster("mc-beta", {"team": "red"})
    _reload_agent(fleet)
    assert _contexts(fleet) == _ctx(fleet, "mc-alpha")
    assert wait_for(lambda: _identities(fleet) == ["identity-mc-alpha"], 10, 0.5), _identities(fleet)
    r = _pods(fleet, _ctx(fleet, "mc-beta")[0])
    assert r.returncode != 0 and "context" in r.stderr, r.stderr
    # relabelled in: mc-gamma joins, and works for the reader
    tp.put_kube_cluster("mc-gamma", {"team": "blue"})
    _reload_agent(fleet)
    assert _contexts(fleet) == _ctx(fleet, "mc-alpha", "mc-gamma")
    r = _pods(fleet, _ctx(fleet, "mc-gamma")[0])
    assert r.returncode == 0 and r.stdout.strip() == f"pod/{tb.DEMO_POD}", r.stderr
    assert _series(_metrics(fleet), "selected_clusters") == {f'{{destination="{DEST}"}}': 2}
    # removed from Teleport: mc-gamma leaves
    tp.remove_kube_cluster("mc-gamma")
    _reload_agent(fleet)
    assert _contexts(fleet) == _ctx(fleet, "mc-alpha")
    assert wait_for(lambda: _identities(fleet) == ["identity-mc-alpha"], 10, 0.5), _identities(fleet)
    text = _metrics(fleet)
    assert _series(text, "selected_clusters") == {f'{{destination="{DEST}"}}': 1}
    assert list(_series(text, "cluster_seconds_to_expiry")) == [
        f'{{destination="{DEST}",kubernetes_cluster="mc-alpha"}}']
    # the same process throughout (a reload, not a restart), and the role still sees a converged host
    assert _sh(fleet, "systemctl show -p MainPID --value machine-id.service").stdout.strip() == before
    run = _rollout(fleet)
    _assert_ok(run)
    assert changed_by_host(run).get(HOST) == 0, changed_by_host(run)


def test_5_verify_names_the_destination_whose_selectors_match_nothing(fleet):
    _extra_vars(fleet.extra_vars, [{"labels": {"team": "nobody"}}])
    try:
        started = time.monotonic()
        run = _rollout(fleet)
        took = time.monotonic() - started
        assert run.rc != 0, run.stdout[-4000:]
        failed = [r for r in run.results if r["status"] == "failed" and r["host"] == HOST]
        assert [r["task"] for r in failed] == ["lanyard.machine_id.machine_id : Assert the agent works"], failed
        msg = failed[0]["result"]["msg"]
        print(f"verify failed after {took:.0f}s: {msg}")
        assert "\n" not in msg and "Traceback" not in run.stdout, msg
        assert msg.startswith(f"machine_id on {HOST}: machine-id.service is active"), msg
        assert msg.count(DEST) == 1 and (
            f"destination {DEST}: its kubeconfig has no context, the selectors match no Kubernetes cluster the "
            "Teleport role may access (check the clusters' labels with `tctl get kube_server` and the selectors in "
            "machine_id_destinations)") in msg, msg
        assert _contexts(fleet) == [] and _identities(fleet) == []
    finally:
        _extra_vars(fleet.extra_vars, [{"labels": {"team": "blue"}}])
    # back to the working selectors: the rollout passes again, without a new token
    tokens = fleet.token_creations()
    run = _rollout(fleet)
    _assert_ok(run)
    assert fleet.token_creations() == tokens
    assert _contexts(fleet) == _ctx(fleet, "mc-alpha")


def _put_unreachable_kube_cluster(tp, name: str, labels: dict) -> None:
    """A kube_cluster Teleport serves but cannot reach (its API server address refuses connections): Teleport issues
    certificates for it like for any other, so it gets a context, but nothing works through that context."""
    kubeconfig = {"apiVersion": "v1", "kind": "Config",
                  "clusters": [{"name": name, "cluster": {"server": "https://127.0.0.1:9"}}],
                  "users": [{"name": "x", "user": {"token": "unused"}}],
                  "contexts": [{"name": name, "context": {"cluster": name, "user": "x"}}], "current-context": name}
    labels = dict(labels, **{DYNAMIC_KUBE_LABEL: "yes"})  # the label the bed's kubernetes_service serves
    doc = {"kind": "kube_cluster", "version": "v3", "metadata": {"name": name, "labels": labels},
           "spec": {"kubeconfig": base64.b64encode(yaml.safe_dump(kubeconfig).encode()).decode()}}
    path = tp.workdir / f"kube_cluster-{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        tp.tctl("create", "-f", "--force", str(path), check=True)
    finally:
        path.unlink()
    assert wait_for(lambda: name in tp.kube_servers(), 60, 1), tp.kube_servers()


def test_6_verify_names_the_context_that_does_not_work(fleet):
    tp = fleet.teleport
    _put_unreachable_kube_cluster(tp, "mc-down", {"team": "blue"})
    try:
        _reload_agent(fleet)  # the next renewal, now: mc-down (team=blue) gets a context
        assert _contexts(fleet) == _ctx(fleet, "mc-alpha", "mc-down"), (
            tp.kube_servers(), _sh(fleet, "journalctl -u machine-id.service -n 15 --no-pager -o cat").stdout)
        run = _rollout(fleet)
        assert run.rc != 0, run.stdout[-4000:]
        failed = [r for r in run.results if r["status"] == "failed" and r["host"] == HOST]
        assert [r["task"] for r in failed] == ["lanyard.machine_id.machine_id : Assert the agent works"], failed
        msg = failed[0]["result"]["msg"]
        print(f"verify failed: {msg}")
        assert "\n" not in msg and "Traceback" not in run.stdout, msg
        down, alpha = _ctx(fleet, "mc-down")[0], _ctx(fleet, "mc-alpha")[0]
        assert f"destination {DEST} context {down}: kubectl auth can-i list pods -n {tb.DEMO_NAMESPACE} answered" \
            in msg and alpha not in msg, msg
    finally:
        tp.remove_kube_cluster("mc-down")
    _reload_agent(fleet)
    run = _rollout(fleet)
    _assert_ok(run)
    assert _contexts(fleet) == _ctx(fleet, "mc-alpha")
