# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Per-cluster series of kubernetes/v2 outputs on /metrics: machine_id_agent_selected_clusters (one per v2
output) and machine_id_agent_cluster_seconds_to_expiry (one per selected cluster), next to the output's
seconds_to_expiry (the soonest of its clusters). Test doubles for Teleport; the real host is
tests/integration/rollout/test_multi_cluster_role.py."""

from __future__ import annotations

import re

import test_multi_cluster as mc
import test_service
from machine_id_agent import diag
from machine_id_agent.service import Agent
from test_outputs import make_creds

from helpers import promtool as pt

logbuf = test_service.logbuf  # a fixture


class PerClusterClient(mc.MultiClient):
    def kube_credentials_for(self, clusters, roles, ttl):
        self.be.calls.append(("kube-multi", tuple(clusters)))
        return {c: self.be.per_cluster[c] for c in clusters}


class PerClusterBackend(mc.MultiBackend):
    def __init__(self):
        super().__init__()
        # a: 1 day, b: half a day, d: a quarter; the output's seconds_to_expiry is the soonest selected
        self.per_cluster = {"a": make_creds(1.0), "b": make_creds(0.5), "d": make_creds(0.25)}

    def client(self, cfg, ident, facts):
        return PerClusterClient(self, ident)


def series(text: str, name: str) -> dict:
    """{labels text: value} of one metric's samples."""
    out = {}
    for m in re.finditer(r"^machine_id_agent_%s(\{[^}]*\})? (\S+)$" % name, text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def near(value, seconds):
    return abs(value - seconds) < 120


def test_each_selected_cluster_has_its_expiry_and_the_output_its_count(tmp_path, logbuf):
    be = PerClusterBackend()
    be.available = {"a": {"team": "blue"}, "b": {"team": "blue"}, "c": {"team": "red"}}
    cfg = mc.load(tmp_path, mc.v2(tmp_path, selectors=[{"labels": {"team": "blue"}}]))
    agent = Agent(cfg, backend=be, log=logbuf[0])
    dest = str(tmp_path / "out")
    # before the first renewal: the output is known to be v2, no cluster selected yet
    text = diag.render_metrics(agent.snapshot())
    assert series(text, "selected_clusters") == {'{destination="%s"}' % dest: 0}
    assert series(text, "cluster_seconds_to_expiry") == {}

    assert agent.attempt() is None
    text = diag.render_metrics(agent.snapshot())
    r = pt.check_metrics(text)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    assert "# TYPE machine_id_agent_cluster_seconds_to_expiry gauge" in text
    assert "# TYPE machine_id_agent_selected_clusters gauge" in text
    assert series(text, "selected_clusters") == {'{destination="%s"}' % dest: 2}
    per = series(text, "cluster_seconds_to_expiry")
    key = '{destination="%s",kubernetes_cluster="%s"}'
    assert sorted(per) == [key % (dest, "a"), key % (dest, "b")]
    assert near(per[key % (dest, "a")], 86400) and near(per[key % (dest, "b")], 43200), per
    # the output's own series is the soonest of its clusters
    soonest = list(series(text, "seconds_to_expiry").values())
    assert soonest == [per[key % (dest, "b")]]

    # relabelled and added in Teleport: the series follow at the next renewal (b's series is gone)
    be.available["b"] = {"team": "red"}
    be.available["d"] = {"team": "blue"}
    assert agent.attempt() is None
    text = diag.render_metrics(agent.snapshot())
    per = series(text, "cluster_seconds_to_expiry")
    assert sorted(per) == [key % (dest, "a"), key % (dest, "d")] and near(per[key % (dest, "d")], 21600), per
    assert series(text, "selected_clusters") == {'{destination="%s"}' % dest: 2}

    # nothing matches: the count says 0, no cluster series, and the exposition stays lint clean
    be.available = {"c": {"team": "red"}}
    assert agent.attempt() is None
    text = diag.render_metrics(agent.snapshot())
    assert series(text, "selected_clusters") == {'{destination="%s"}' % dest: 0}
    assert series(text, "cluster_seconds_to_expiry") == {}
    assert series(text, "ready") == {"": 0}
    r = pt.check_metrics(text)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)


def test_a_restarted_agent_reports_the_clusters_on_disk_before_its_first_renewal(tmp_path, logbuf):
    be = PerClusterBackend()
    be.available = {"a": {"team": "blue"}, "b": {"team": "blue"}}
    cfg = mc.load(tmp_path, mc.v2(tmp_path, selectors=[{"labels": {"team": "blue"}}]))
    assert Agent(cfg, backend=be, log=logbuf[0]).attempt() is None
    again = Agent(cfg, backend=be, log=logbuf[0])  # a new process: only the files
    per = series(diag.render_metrics(again.snapshot()), "cluster_seconds_to_expiry")
    dest = str(tmp_path / "out")
    assert sorted(per) == ['{destination="%s",kubernetes_cluster="a"}' % dest,
                           '{destination="%s",kubernetes_cluster="b"}' % dest]


def test_kubernetes_v1_outputs_get_no_cluster_series():
    snap = {"outputs": [{"destination": "/opt/machine-id", "kubernetes_cluster": "prod", "seconds_to_expiry": 60}]}
    text = diag.render_metrics(snap)
    assert "selected_clusters" not in text and "cluster_seconds_to_expiry" not in text
    assert 'machine_id_agent_seconds_to_expiry{destination="/opt/machine-id",kubernetes_cluster="prod"} 60' in text


def test_cluster_names_are_escaped_as_label_values():
    snap = {"outputs": [{"destination": '/opt/m"x', "kubernetes_cluster": "", "seconds_to_expiry": 5,
                         "kubernetes_clusters": ['we"ird'], "cluster_seconds_to_expiry": {'we"ird': 5}}]}
    text = diag.render_metrics(snap)
    assert 'machine_id_agent_cluster_seconds_to_expiry{destination="/opt/m\\"x",kubernetes_cluster="we\\"ird"} 5' \
        in text
    r = pt.check_metrics(text)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_inspect_names_an_output_whose_selectors_match_nothing(tmp_path, logbuf):
    from machine_id_agent import outputs
    be = PerClusterBackend()
    be.available = {"c": {"team": "red"}}
    cfg = mc.load(tmp_path, mc.v2(tmp_path, selectors=[{"labels": {"team": "blue"}}]))
    assert Agent(cfg, backend=be, log=logbuf[0]).attempt() is None
    st = outputs.inspect(tmp_path / "out")
    assert st["present"] and not st["valid"] and st["clusters"] == []
    assert st["error"].startswith("kubeconfig.yaml has no context: the output's selectors match no Kubernetes "
                                  "cluster"), st
