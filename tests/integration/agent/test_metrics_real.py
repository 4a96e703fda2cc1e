# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 16 point 4 on the real bed: the real agent, at the role's default certificate_ttl (1h) and
renewal_interval (20m), serves a /metrics that ``promtool check metrics`` accepts when it is ready and while
Teleport cannot be reached; series built from those scrapes (their real names, labels and values, advanced
minute by minute the way the agent moves them) make the shipped alert rules fire exactly as expected under
``promtool test rules``: nothing on the healthy agent; not ready, renewals failing (identity and output task)
and then each expiry alert, at the minute the real expiry values give, on the failing one; down once the agent
no longer answers."""

from __future__ import annotations

import os
import signal
import urllib.error
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import yaml

from helpers import promtool as pt
from test_agent_e2e import free_port, http_get, wait_for

pytestmark = [pytest.mark.testbed]

JOB = "machine-id-agent"
SOON, CRITICAL = 1800, 600  # the rules' thresholds (checked against the rules file below)

Sample = Tuple[str, Dict[str, str], float]


def parse(text: str) -> List[Sample]:
    """The samples of one exposition (the agent's labels values hold no comma, quote or brace)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _brace, rest = head.partition("{")
        labels = {}
        for part in filter(None, rest.rstrip("}").split(",")):
            k, v = part.split("=", 1)
            labels[k] = v.strip('"')
        out.append((name, labels, float(value)))
    return out


def scraped(samples: List[Sample], instance: str) -> List[Sample]:
    """What Prometheus stores: job and instance added to each sample."""
    return [(n, dict(lab, job=JOB, instance=instance), v) for n, lab, v in samples]


def find(samples: List[Sample], name: str) -> List[Sample]:
    return [s for s in samples if s[0] == name]


def num(v: float) -> str:
    return repr(int(v)) if float(v).is_integer() else repr(v)


def healthy_series(samples: List[Sample], instance: str) -> List[dict]:
    """One hour of the healthy agent: expiry values fall a minute a minute from the scraped value and are back at
    it after each renewal (every 20 minutes), each task counts one more success per renewal, the rest stays."""
    series = []
    for name, lab, v in samples:
        if name.endswith("seconds_to_expiry"):
            values = " ".join(["%s-60x19" % num(v)] * 3)
        elif name == "machine_id_agent_task_iterations_successful_count":
            values = " ".join("%sx19" % num(v + i) for i in range(3)) + " " + num(v + 3)
        else:
            values = "%sx60" % num(v)
        series.append(pt.series(name, lab, values))
    series.append(pt.series("up", {"job": JOB, "instance": instance}, "1x60"))
    return series


def failing_series(ok: List[Sample], bad: List[Sample], instance: str, minutes: int) -> List[dict]:
    """Minute 0: the healthy scrape; from minute 1 the scrape taken while Teleport was unreachable, with every
    failed counter one higher each minute (the agent retries at least once a minute: BACKOFF_CAP 60 s), expiry
    values one minute lower each minute (nothing is renewed) and everything else as scraped."""
    series = []
    first = {(n, tuple(sorted(lab.items()))): v for n, lab, v in ok}
    for name, lab, v in bad:
        v0 = first.get((name, tuple(sorted(lab.items()))), v)
        if name.endswith("seconds_to_expiry"):
            values = "%s %s-60x%d" % (num(v0), num(v), minutes - 1)
        elif name == "machine_id_agent_task_iterations_failed_total" and v > v0:
            values = "%s %s+1x%d" % (num(v0), num(v), minutes - 1)
        else:
            values = "%s %sx%d" % (num(v0), num(v), minutes - 1)
        series.append(pt.series(name, lab, values))
    series.append(pt.series("up", {"job": JOB, "instance": instance}, "1x%d" % minutes))
    return series


def first_minute_below(v: float, limit: float) -> int:
    """The first minute (>= 1) at which v - 60 x (minute - 1) is under the limit."""
    m = 1
    while v - 60 * (m - 1) >= limit:
        m += 1
    return m


def labels_of(sample: Sample) -> Dict[str, str]:
    return dict(sample[1])


def point_at(h, addr: str) -> None:
    """The host's config with the proxy at ``addr`` (as proxy_server: a proxy that does not answer fails the
    cycle at once, without falling back to what an earlier ping learned)."""
    doc = yaml.safe_load(h.config_path.read_text())
    doc.pop("auth_server", None)
    doc["proxy_server"] = addr
    tmp = h.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    st = h.config_path.stat()
    os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, 0o640)
    os.replace(tmp, h.config_path)


def run_rules(tmp_path: Path, name: str, tests: List[dict]) -> None:
    doc = pt.test_file(tests)
    path = tmp_path / ("%s-test.yml" % name)
    path.write_text(pt.dump(doc))
    r = pt.test_rules(path)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, "promtool test rules (%s):\n%s%s" % (path, r.stdout, r.stderr)


def test_real_metrics_pass_promtool_and_drive_the_alert_rules(teleport, make_host, tmp_path):
    rules = pt.rules()
    # the thresholds this test drives the rules across (a one-cluster output alerts through its own series; a
    # kubernetes/v2 one through its per-cluster series, tests/integration/rollout/test_multi_cluster_role.py)
    expiring = 'machine_id_agent_seconds_to_expiry{kubernetes_cluster!=""} < %d'
    assert expiring % SOON in rules["MachineIDAgentCredentialsExpiringSoon"]["expr"]
    assert expiring % CRITICAL in rules["MachineIDAgentCredentialsExpiring"]["expr"]
    diag = "127.0.0.1:%d" % free_port()
    # the role's defaults, not shortened: the expiry values the alerts see are those of a 1h certificate
    h = make_host(teleport, certificate_ttl="1h", renewal_interval="20m", diag_addr=diag)
    assert h.init().returncode == 0
    p = h.start()
    wait_for(lambda: http_get("http://%s/readyz" % diag)[0] == 200, 90, "first outputs (/readyz 200)")

    code, healthy_text = http_get("http://%s/metrics" % diag)
    assert code == 200
    r = pt.check_metrics(healthy_text)
    assert r.returncode == 0 and r.stdout == r.stderr == "", "promtool check metrics (ready):\n%s%s" % (r.stdout, r.stderr)
    ok = scraped(parse(healthy_text), diag)
    (expiry,) = find(ok, "machine_id_agent_seconds_to_expiry")
    (ident_left,) = find(ok, "machine_id_agent_identity_seconds_to_expiry")
    assert 3300 < expiry[2] <= 3600 and 3300 < ident_left[2] <= 3600, (expiry, ident_left)  # 1h, just issued
    assert find(ok, "machine_id_agent_ready")[0][2] == 1
    tasks = find(ok, "machine_id_agent_task_iterations_total")
    assert sorted(t[1]["service"] for t in tasks) == ["identity", "kubernetes-output"], tasks
    assert all(s[2] == 0 for s in find(ok, "machine_id_agent_task_iterations_failed_total"))

    # Teleport unreachable: the same agent, reloaded with an address where nothing listens, forced to renew
    closed = "127.0.0.1:%d" % free_port()
    point_at(h, closed)
    os.kill(p.pid, signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in h.log(), 30, "the reload")
    os.kill(p.pid, signal.SIGUSR1)

    def failing():
        c, text = http_get("http://%s/metrics" % diag)
        s = parse(text)
        failed = {x[1]["service"]: x[2] for x in find(s, "machine_id_agent_task_iterations_failed_total")}
        return text if failed.get("identity", 0) >= 2 and find(s, "machine_id_agent_ready")[0][2] == 0 else None

    bad_text = wait_for(failing, 120, "two failed identity iterations and ready 0")
    r = pt.check_metrics(bad_text)
    assert r.returncode == 0 and r.stdout == r.stderr == "", "promtool check metrics (failing):\n%s%s" % (r.stdout, r.stderr)
    bad = scraped(parse(bad_text), diag)
    assert p.poll() is None
    h.stop()
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        http_get("http://%s/metrics" % diag)  # what Prometheus records as up == 0

    quiet = [{"eval_time": "%dm" % t, "alertname": a, "exp_alerts": []} for t in (5, 20, 40, 59) for a in rules]
    run_rules(tmp_path, "healthy", [{"name": "real healthy agent", "interval": "1m",
                                     "input_series": healthy_series(ok, diag), "alert_rule_test": quiet}])

    failed_tasks = [labels_of(s) for s in find(bad, "machine_id_agent_task_iterations_failed_total")]
    assert {t["service"] for t in failed_tasks} == {"identity", "kubernetes-output"}
    before = {tuple(sorted(s[1].items())): s[2] for s in find(ok, "machine_id_agent_task_iterations_failed_total")}
    for s in find(bad, "machine_id_agent_task_iterations_failed_total"):  # the identity failed, the output not reached
        assert s[2] >= before[tuple(sorted(s[1].items()))] + 2, s
    for s in find(bad, "machine_id_agent_task_iterations_successful_count"):
        assert s[2] == 1, s  # the first cycle only
    (bad_expiry,) = find(bad, "machine_id_agent_seconds_to_expiry")
    (bad_ident,) = find(bad, "machine_id_agent_identity_seconds_to_expiry")
    host = {"job": JOB, "instance": diag}
    soon_out, crit_out = first_minute_below(bad_expiry[2], SOON), first_minute_below(bad_expiry[2], CRITICAL)
    soon_id, crit_id = first_minute_below(bad_ident[2], SOON), first_minute_below(bad_ident[2], CRITICAL)
    minutes = max(crit_out, crit_id) + 10
    t_fail = 20  # failing for 19 minutes: not ready (15m) and renewals failing (5m) fire; ~2400 s left: no expiry
    t_soon = max(soon_out, soon_id) + 6
    t_crit = max(crit_out, crit_id) + 3
    assert t_fail + 6 < min(soon_out, soon_id) and t_soon < min(crit_out, crit_id), (t_fail, t_soon, t_crit)

    def at(t, alert, *label_sets):
        return {"eval_time": "%dm" % t, "alertname": alert, "exp_alerts": [pt.expected(alert, x) for x in label_sets]}

    expect = [at(3, a) for a in rules]  # nothing has lasted its `for:` yet
    expect += [at(t_fail, "MachineIDAgentNotReady", host), at(t_fail, "MachineIDAgentRenewalsFailing", *failed_tasks),
               at(t_fail, "MachineIDAgentCredentialsExpiringSoon"), at(t_fail, "MachineIDAgentIdentityExpiringSoon"),
               at(t_fail, "MachineIDAgentDown"), at(t_fail, "MachineIDAgentAbsent")]
    expect += [at(t_soon, "MachineIDAgentCredentialsExpiringSoon", labels_of(bad_expiry)),
               at(t_soon, "MachineIDAgentIdentityExpiringSoon", labels_of(bad_ident)),
               at(t_soon, "MachineIDAgentCredentialsExpiring"), at(t_soon, "MachineIDAgentIdentityExpiring")]
    expect += [at(t_crit, "MachineIDAgentCredentialsExpiring", labels_of(bad_expiry)),
               at(t_crit, "MachineIDAgentIdentityExpiring", labels_of(bad_ident)),
               at(t_crit, "MachineIDAgentRenewalsFailing", *failed_tasks),
               at(t_crit, "MachineIDAgentNotReady", host)]
    down = [pt.series("up", host, "1x4 0x15")]
    run_rules(tmp_path, "failing", [
        {"name": "real agent, Teleport unreachable", "interval": "1m",
         "input_series": failing_series(ok, bad, diag, minutes), "alert_rule_test": expect},
        {"name": "real agent stopped: scrape refused", "interval": "1m", "input_series": down,
         "alert_rule_test": [at(6, "MachineIDAgentDown"), at(12, "MachineIDAgentDown", host)]}])
