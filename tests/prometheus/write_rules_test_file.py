# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Writes machine-id-agent.rules-test.yml, the ``promtool test rules`` file for the shipped alert rules:
``python tests/prometheus/write_rules_test_file.py`` after changing the rules or the scenarios below
(tests/unit/agent/test_metrics_alerts.py fails while the file is stale). The expected annotations are the rules'
own templates filled in with the alert's labels, so a scenario names only which alert fires with which labels.

Every scenario is one agent at the role's defaults (certificate_ttl 1h, renewal_interval 20m), sampled each
minute: a healthy agent renews every 20 minutes, so its credentials run from 3600 s down to 2460 s."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import promtool as pt  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "machine-id-agent.rules-test.yml"
HOST = {"job": "machine-id-agent", "instance": "node-1.example:9101"}
IDENT = dict(HOST, service="identity", name="bot-identity-renewal")
OUT_A = dict(HOST, service="kubernetes-output", name="output-renewal", destination="/opt/machine-id",
             kubernetes_cluster="prod")
OUT_B = dict(OUT_A, destination="/opt/machine-id-staging", kubernetes_cluster="staging")
EXPIRY_A = dict(HOST, destination=OUT_A["destination"], kubernetes_cluster="prod")
EXPIRY_B = dict(HOST, destination=OUT_B["destination"], kubernetes_cluster="staging")
SAW = " ".join(["3600-60x19"] * 6)  # 2 h of renewals every 20 minutes
# a kubernetes/v2 output (several clusters in one kubeconfig): the output's series has an empty kubernetes_cluster
# and is the soonest of its clusters; each selected cluster has its own series
V2 = dict(HOST, destination="/opt/machine-id-fleet")
EXPIRY_V2 = dict(V2, kubernetes_cluster="")
EXPIRY_V2_ALPHA = dict(V2, kubernetes_cluster="mc-alpha")
EXPIRY_V2_BETA = dict(V2, kubernetes_cluster="mc-beta")
ALERTS = sorted(pt.rules())


def s(name, labels, values):
    return pt.series(name, labels, values)


def quiet(*times):
    """No alert of any rule at these times."""
    return [{"eval_time": t, "alertname": a, "exp_alerts": []} for t in times for a in ALERTS]


def fires(t, alertname, *label_sets):
    return {"eval_time": t, "alertname": alertname, "exp_alerts": [pt.expected(alertname, lab) for lab in label_sets]}


def healthy():
    """Renews every 20 minutes; one failed cycle at 41m is retried and succeeds a minute later."""
    return {"name": "healthy agent, one transient failure: nothing fires", "interval": "1m", "input_series": [
        s("up", HOST, "1x120"),
        s("machine_id_agent_ready", HOST, "1x40 0 1x79"),
        s("machine_id_agent_identity_seconds_to_expiry", HOST, SAW),
        s("machine_id_agent_seconds_to_expiry", EXPIRY_A, SAW),
        s("machine_id_agent_task_iterations_failed_total", IDENT, "0x40 1x80"),
        s("machine_id_agent_task_iterations_failed_total", OUT_A, "0x40 1x80"),
        s("machine_id_agent_task_iterations_successful_count", IDENT, "1x19 2x20 3x21 4x19 5x19 6x19"),
        s("machine_id_agent_task_iterations_successful_count", OUT_A, "1x19 2x20 3x21 4x19 5x19 6x19"),
    ], "alert_rule_test": quiet("10m", "30m", "45m", "59m", "100m", "119m")}


def teleport_down():
    """The last renewal at 0m; from 18m every retry fails (about one a minute), so nothing is renewed again."""
    return {"name": "Teleport unreachable: failing, not ready, then expiring", "interval": "1m", "input_series": [
        s("up", HOST, "1x70"),
        s("machine_id_agent_ready", HOST, "1x17 0x53"),
        s("machine_id_agent_identity_seconds_to_expiry", HOST, "3600-60x60 0x10"),
        s("machine_id_agent_seconds_to_expiry", EXPIRY_A, "3600-60x60 0x10"),
        s("machine_id_agent_task_iterations_failed_total", IDENT, "0x17 1+1x53"),
        s("machine_id_agent_task_iterations_failed_total", OUT_A, "0x17 1+1x53"),
        s("machine_id_agent_task_iterations_successful_count", IDENT, "4 5x69"),
        s("machine_id_agent_task_iterations_successful_count", OUT_A, "4 5x69"),
    ], "alert_rule_test": quiet("15m") + [
        # 20m: failing for 2 minutes, a success within the window: nothing yet
        {"eval_time": "20m", "alertname": a, "exp_alerts": []} for a in ALERTS] + [
        fires("40m", "MachineIDAgentRenewalsFailing", IDENT, OUT_A),
        fires("40m", "MachineIDAgentNotReady", HOST),
        fires("40m", "MachineIDAgentCredentialsExpiringSoon", EXPIRY_A),  # 3600 - 40 x 60 = 1200 s
        fires("40m", "MachineIDAgentIdentityExpiringSoon", HOST),
        fires("40m", "MachineIDAgentCredentialsExpiring"),  # 1200 s is not critical yet
        fires("40m", "MachineIDAgentIdentityExpiring"),
        fires("40m", "MachineIDAgentDown"),
        fires("55m", "MachineIDAgentCredentialsExpiring", EXPIRY_A),  # 300 s left
        fires("55m", "MachineIDAgentIdentityExpiring", HOST),
        fires("55m", "MachineIDAgentCredentialsExpiringSoon", EXPIRY_A),
    ]}


def one_output_failing():
    """The staging output cannot be written from 5m on (every 20 minutes: an output error is retried at the normal
    pace); the identity and the prod output keep renewing."""
    return {"name": "one output failing at the normal pace: only that output alerts", "interval": "1m",
            "input_series": [
                s("up", HOST, "1x80"),
                s("machine_id_agent_ready", HOST, "1x4 0x76"),
                s("machine_id_agent_identity_seconds_to_expiry", HOST, " ".join(["3600-60x19"] * 4)),
                s("machine_id_agent_seconds_to_expiry", EXPIRY_A, " ".join(["3600-60x19"] * 4)),
                s("machine_id_agent_seconds_to_expiry", EXPIRY_B, "3600-60x60 0x20"),
                s("machine_id_agent_task_iterations_failed_total", IDENT, "0x80"),
                s("machine_id_agent_task_iterations_failed_total", OUT_A, "0x80"),
                s("machine_id_agent_task_iterations_failed_total", OUT_B, "0x4 1x19 2x19 3x19 4x16"),
                s("machine_id_agent_task_iterations_successful_count", IDENT, "1x19 2x19 3x19 4x20"),
                s("machine_id_agent_task_iterations_successful_count", OUT_A, "1x19 2x19 3x19 4x20"),
                s("machine_id_agent_task_iterations_successful_count", OUT_B, "1x80"),
            ], "alert_rule_test": [
                fires("45m", "MachineIDAgentRenewalsFailing", OUT_B),
                fires("45m", "MachineIDAgentNotReady", HOST),
                fires("45m", "MachineIDAgentCredentialsExpiringSoon", EXPIRY_B),
                fires("45m", "MachineIDAgentIdentityExpiringSoon"),
            ]}


def v2_one_cluster_failing():
    """A kubernetes/v2 output of two clusters: mc-beta's certificate is not renewed from 0m on (the other is): the
    expiry alerts name mc-beta, once, and not the output's own (soonest) series."""
    return {"name": "kubernetes/v2: one cluster not renewed, the expiry alerts name that cluster", "interval": "1m",
            "input_series": [
                s("up", HOST, "1x70"),
                s("machine_id_agent_selected_clusters", V2, "2x70"),
                s("machine_id_agent_seconds_to_expiry", EXPIRY_V2, "3600-60x60 0x10"),
                s("machine_id_agent_cluster_seconds_to_expiry", EXPIRY_V2_ALPHA, " ".join(["3600-60x19"] * 4)),
                s("machine_id_agent_cluster_seconds_to_expiry", EXPIRY_V2_BETA, "3600-60x60 0x10"),
            ], "alert_rule_test": [
                fires("20m", "MachineIDAgentCredentialsExpiringSoon"),
                fires("40m", "MachineIDAgentCredentialsExpiringSoon", EXPIRY_V2_BETA),
                fires("40m", "MachineIDAgentCredentialsExpiring"),
                fires("40m", "MachineIDAgentNoClusterSelected"),
                fires("55m", "MachineIDAgentCredentialsExpiring", EXPIRY_V2_BETA),
                fires("55m", "MachineIDAgentCredentialsExpiringSoon", EXPIRY_V2_BETA),
            ]}


def v2_no_cluster_selected():
    """The selectors of a kubernetes/v2 output match nothing from 5m on (a cluster relabelled in Teleport)."""
    return {"name": "kubernetes/v2: selectors match no cluster", "interval": "1m", "input_series": [
        s("up", HOST, "1x40"),
        s("machine_id_agent_ready", HOST, "1x4 0x36"),
        s("machine_id_agent_selected_clusters", V2, "2x4 0x36"),
    ], "alert_rule_test": [
        fires("15m", "MachineIDAgentNoClusterSelected"),  # pending for 10 minutes
        fires("25m", "MachineIDAgentNoClusterSelected", V2),
        fires("25m", "MachineIDAgentNotReady", HOST),
    ]}


def down_and_absent():
    return [{"name": "agent down: up == 0", "interval": "1m", "input_series": [s("up", HOST, "1x9 0x20")],
             "alert_rule_test": [
                 fires("12m", "MachineIDAgentDown"),  # down for 3 minutes: pending
                 fires("20m", "MachineIDAgentDown", HOST),
                 fires("20m", "MachineIDAgentAbsent")]},
            {"name": "no target scraped at all", "interval": "1m",
             "input_series": [s("up", dict(HOST, job="node"), "1x30")],
             "alert_rule_test": [
                 fires("10m", "MachineIDAgentAbsent"),
                 fires("20m", "MachineIDAgentAbsent", {"job": "machine-id-agent"})]}]


def document() -> str:
    doc = pt.test_file([healthy(), teleport_down(), one_output_failing(), v2_one_cluster_failing(),
                        v2_no_cluster_selected()] + down_and_absent(),
                       rules_path=Path("../../roles/machine_id/files/prometheus/machine-id-agent.rules.yml"))
    head = ("# Generated by tests/prometheus/write_rules_test_file.py: edit the scenarios there and rerun it.\n"
            "# Run: promtool test rules tests/prometheus/machine-id-agent.rules-test.yml\n")
    return head + pt.dump(doc)


if __name__ == "__main__":
    OUT.write_text(document())
    print(OUT)
