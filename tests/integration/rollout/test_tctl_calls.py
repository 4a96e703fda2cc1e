# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""tctl runs of playbooks/rollout.yml per host (issue 14), counted on the real bed with real systemd hosts.

Default settings (one bot per host, the default batch ramp [1, 5, '25%']), tctl through the counting wrapper of
helpers/fleet.py (the one bench/rollout.py counts with; it counts every run, ``tctl version`` included):

1. a first rollout of one fresh host, then its no-change rerun;
2. two more fresh hosts, which the default ramp puts in one batch (their bot tasks run in parallel forks): each
   new host costs exactly its two runs (a read of its bot's user and ``tctl bots add``), everything else is the
   rerun's constant control-plane part, and both hosts join with the token ``bots add`` printed (no read-back);
3. the rerun of the three hosts makes the same tctl runs as the rerun of one host.
"""

from __future__ import annotations

from collections import Counter

import pytest

from helpers.fleet import Fleet, changed_by_host

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

BOT = "example"
MAX_PER_NEW_HOST = 2


@pytest.fixture(scope="module")
def fleet(bed, tmp_path_factory):
    # serial=None: machine_id_rollout_serial is empty, so the playbook's default ramp applies
    f = Fleet(tmp_path_factory.mktemp("tc-fleet"), teleport=bed.teleport["multiplex"], kube=bed.kube, serial=None,
              bot_name=BOT)
    try:
        f.add_hosts(["tc-1"])
        yield f
    finally:
        f.stop()


def _rollout(fleet):
    """One rollout; the tctl runs it made (argv words without flags, as helpers/fleet.py records them)."""
    before = fleet.tctl_calls()
    run = fleet.rollout()
    assert run.rc == 0, run.stdout[-6000:]
    return run, fleet._calls()[before:]


def _names(call, host):
    """Does this tctl run name the host's bot (the bot, its user or its role)?"""
    names = (f"{BOT}-{host}", f"bot-{BOT}-{host}")
    return any(w == n or w.endswith("/" + n) for w in call for n in names)


def _of_host(calls, host):
    return [c for c in calls if _names(c, host)]


def _host_free(calls, hosts):
    return [c for c in calls if not any(_names(c, h) for h in hosts)]


RESULTS: dict[str, list[list[str]]] = {}


def test_1_one_fresh_host_then_its_rerun(fleet):
    _run, first = _rollout(fleet)
    assert _of_host(first, "tc-1") == [["get", "user/bot-example-tc-1"], ["bots", "add", "example-tc-1"]], first
    run, rerun = _rollout(fleet)
    assert changed_by_host(run)["tc-1"] == 0, run.stdout[-4000:]
    assert _of_host(rerun, "tc-1") == [] and not [c for c in rerun if c[:1] in (["bots"], ["tokens"])], rerun
    RESULTS["rerun_1"] = rerun
    assert fleet.reader_get_pods("tc-1").returncode == 0


def test_2_two_fresh_hosts_in_one_batch_cost_two_runs_each(fleet):
    assert "rerun_1" in RESULTS, "needs test_1"
    fleet.add_hosts(["tc-2", "tc-3"])
    run, calls = _rollout(fleet)
    new = ("tc-2", "tc-3")
    # the default ramp: tc-1 alone (the canary), then tc-2 and tc-3 together
    bot_tasks = [r for r in run.results if r["task"].endswith("a new bot comes with a token")
                 and r["status"] != "skipped" and not r["result"].get("skipped")]
    assert sorted(r["host"] for r in bot_tasks) == list(new)
    for host in new:
        assert _of_host(calls, host) == [["get", f"user/bot-{BOT}-{host}"], ["bots", "add", f"{BOT}-{host}"]], calls
        assert fleet.reader_get_pods(host).returncode == 0  # joined with the token bots add printed
    # nothing else per host: the rest is the control plane's constant part, as in the rerun of one host
    assert Counter(map(tuple, _host_free(calls, new))) == Counter(map(tuple, RESULTS["rerun_1"])), calls
    per_new_host = (len(calls) - len(RESULTS["rerun_1"])) / len(new)
    print(f"tctl runs: rollout with 2 new hosts {len(calls)}, rerun of 1 host {len(RESULTS['rerun_1'])}, "
          f"per new host {per_new_host}")
    assert per_new_host <= MAX_PER_NEW_HOST


def test_3_rerun_of_three_hosts_makes_the_runs_of_one(fleet):
    assert "rerun_1" in RESULTS, "needs test_1"
    run, rerun = _rollout(fleet)
    assert all(n == 0 for n in changed_by_host(run).values()), run.stdout[-4000:]
    print(f"tctl runs: rerun of 1 host {len(RESULTS['rerun_1'])}, of 3 hosts {len(rerun)}: {rerun}")
    assert Counter(map(tuple, rerun)) == Counter(map(tuple, RESULTS["rerun_1"]))
