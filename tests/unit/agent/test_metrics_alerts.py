# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's task metrics (tbot's task_iterations names) count what a cycle did for the identity and for each
output; the exposition passes ``promtool check metrics``; the shipped alert rules pass their ``promtool test
rules`` file (every alert firing and quiet), which is current and would catch a wrong threshold; and the rules
file is part of the built collection."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import yaml

from machine_id_agent import diag
from machine_id_agent.errors import RenewError
from machine_id_agent.service import Agent

from helpers import promtool as pt
from test_service import FakeBackend, FakeIdent, make_cfg
# logbuf is a fixture the tests take by name
from test_service import logbuf  # noqa: F401  pylint: disable=unused-import

sys.path.insert(0, str(pt.REPO / "tests" / "prometheus"))
import write_rules_test_file  # noqa: E402

TEST_FILE = pt.REPO / "tests" / "prometheus" / "machine-id-agent.rules-test.yml"


def two_outputs(tmp_path):
    return make_cfg(tmp_path, destinations=[
        {"directory": str(tmp_path / "a"), "kubernetes_cluster": "ka"},
        {"directory": str(tmp_path / "b"), "kubernetes_cluster": "kb"}])


def tasks(agent):
    return {(t["labels"]["service"], t["labels"].get("destination", "")): t for t in agent.snapshot()["tasks"]}


def test_task_iterations_count_identity_and_each_output(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(two_outputs(tmp_path), backend=be, log=logbuf[0])
    a, b = ("kubernetes-output", str(tmp_path / "a")), ("kubernetes-output", str(tmp_path / "b"))
    ident = ("identity", "")
    assert all(t["iterations"] == 0 for t in tasks(agent).values()) and len(tasks(agent)) == 3  # series from start

    assert agent.attempt() is None
    t = tasks(agent)
    assert t[ident]["labels"] == {"service": "identity", "name": "bot-identity-renewal"}
    assert t[b]["labels"] == {"service": "kubernetes-output", "name": "output-renewal", "destination": b[1],
                              "kubernetes_cluster": "kb"}
    for k in (ident, a, b):
        assert (t[k]["iterations"], t[k]["failed"], t[k]["successful"]["count"]) == (1, 0, 1)
        assert t[k]["successful"]["buckets"][0] == 1 and t[k]["duration"]["count"] == 1

    # Teleport unreachable when the identity is due: its renewal fails, neither output is reached (each counts
    # a failed iteration, with no duration sample)
    be.stored = FakeIdent(1, ttl=600)
    be.fail = RenewError("the auth server localhost:3025: connection refused")
    assert agent.attempt() is not None and agent.attempt() is not None
    t = tasks(agent)
    assert (t[ident]["iterations"], t[ident]["failed"], t[ident]["duration"]["count"]) == (3, 2, 3)
    for k in (a, b):
        assert (t[k]["iterations"], t[k]["failed"], t[k]["duration"]["count"]) == (3, 2, 1)

    # back, but output b cannot be written: identity and a succeed after 2 failures, b fails again
    be.fail = None
    (tmp_path / "b").rename(tmp_path / "b.old")
    (tmp_path / "b").write_text("not a directory")
    assert agent.attempt() is not None
    t = tasks(agent)
    for k in (ident, a):
        assert (t[k]["iterations"], t[k]["failed"], t[k]["successful"]["count"]) == (4, 2, 2)
        # buckets le=0,1,2,...: the second success came after 2 failed iterations
        assert t[k]["successful"]["buckets"][:3] == [1, 1, 2] and t[k]["successful"]["sum"] == 2
    assert (t[b]["iterations"], t[b]["failed"], t[b]["successful"]["count"], t[b]["duration"]["count"]) == (4, 3, 1, 2)


def test_metrics_exposition_is_lint_clean_and_keeps_the_documented_names(tmp_path, logbuf):
    be = FakeBackend()
    agent = Agent(two_outputs(tmp_path), backend=be, log=logbuf[0])
    agent.attempt()
    be.stored = FakeIdent(1, ttl=600)  # due: the renewal meets the failure
    be.fail = RenewError("connection refused")
    agent.attempt()
    text = diag.render_metrics(agent.snapshot())
    r = pt.check_metrics(text)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    for name in ("renewals_total", "renewal_failures_total", "ready", "identity_seconds_to_expiry", "seconds_to_expiry",
                 "last_success_timestamp_seconds", "task_iterations_total", "task_iterations_failed_total",
                 "task_iterations_successful", "task_iteration_duration_seconds"):
        assert "# TYPE machine_id_agent_%s " % name in text, name
    ident = 'service="identity",name="bot-identity-renewal"'
    assert "machine_id_agent_task_iterations_total{%s} 2" % ident in text
    assert "machine_id_agent_task_iterations_failed_total{%s} 1" % ident in text
    assert 'machine_id_agent_task_iterations_successful_bucket{%s,le="+Inf"} 1' % ident in text
    assert 'machine_id_agent_task_iteration_duration_seconds_count{%s} 2' % ident in text
    out_b = 'service="kubernetes-output",name="output-renewal",destination="%s",kubernetes_cluster="kb"' % (tmp_path / "b")
    assert "machine_id_agent_task_iterations_failed_total{%s} 1" % out_b in text
    assert "machine_id_agent_task_iteration_duration_seconds_count{%s} 1" % out_b in text  # not reached: no sample


def test_promtool_check_metrics_flags_what_the_agent_avoids():
    """The lint the exposition passes is a real one: tbot's own counter name (no _total) is flagged."""
    bad = "# HELP tbot_task_iterations_failed x\n# TYPE tbot_task_iterations_failed counter\ntbot_task_iterations_failed 1\n"
    r = pt.check_metrics(bad)
    assert "_total" in (r.stdout + r.stderr), (r.stdout, r.stderr)


def test_rules_test_file_is_current():
    assert TEST_FILE.read_text() == write_rules_test_file.document(), \
        "run: python tests/prometheus/write_rules_test_file.py (the rules or the scenarios changed)"


def test_every_alert_is_tested_firing_and_quiet():
    doc = yaml.safe_load(TEST_FILE.read_text())
    firing, quiet = set(), set()
    for t in doc["tests"]:
        for case in t["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert firing == quiet == set(pt.rules())
    for r in pt.rules().values():
        assert r["labels"]["severity"] in ("warning", "critical") and r.get("for")
        assert set(r["annotations"]) == {"summary", "description"} and "Fix" in r["annotations"]["description"]


def test_promtool_rules_pass():
    r = pt.test_rules(TEST_FILE)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_the_rules_test_catches_a_wrong_rule(tmp_path):
    """A threshold a healthy agent at the defaults stays under for minutes (3000 s: it goes down to 2460 s), a
    failing-renewals rule that forgets the later success, an expiry rule that also alerts on a kubernetes/v2
    output's own series (a second alert without the cluster) or misses its per-cluster series: each makes the
    test fail."""
    text = pt.RULES.read_text()
    v2 = 'machine_id_agent_seconds_to_expiry{kubernetes_cluster!=""} < 1800'
    for old, new in ((v2, v2.replace("1800", "3000")), ("unless", "or"),
                     (v2, "machine_id_agent_seconds_to_expiry < 1800"),
                     ("or machine_id_agent_cluster_seconds_to_expiry < 1800", "")):
        assert old in text
        (tmp_path / "rules.yml").write_text(text.replace(old, new, 1))
        doc = yaml.safe_load(TEST_FILE.read_text())
        doc["rule_files"] = [str(tmp_path / "rules.yml")]
        (tmp_path / "test.yml").write_text(yaml.safe_dump(doc))
        r = pt.test_rules(tmp_path / "test.yml")
        assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr, (old, r.stdout)


def test_rules_are_in_the_built_collection():
    galaxy = yaml.safe_load((pt.REPO / "galaxy.yml").read_text())
    rel = str(pt.RULES.relative_to(pt.REPO))
    parts = Path(rel).parts
    for pat in galaxy.get("build_ignore") or []:
        for i in range(1, len(parts) + 1):
            assert not fnmatch.fnmatch("/".join(parts[:i]), pat), (pat, rel)
