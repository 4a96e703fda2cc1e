# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One rollout from one controller across Debian 12 and Debian 13 hosts (issue 13, point 9).

A private bed (TLS routing) and two systemd-nspawn hosts with no package index: one Debian 12
(bookworm, Python 3.11) and one Debian 13 (trixie, Python 3.13), both built with debootstrap from
Debian's packages. The controller runs Python 3.11. One playbooks/rollout.yml run (both hosts in
one batch) must leave each host with an agent installed from wheels made for its own Python and
the reader's ``kubectl get pods`` working; a rerun changes nothing.
"""

from __future__ import annotations

import json

import pytest

import testbed as tb
from helpers.fleet import Fleet, agent_python_argv, changed_by_host

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

HOSTS = {"h6-mix-12": ("bookworm", "3.11"), "h6-mix-13": ("trixie", "3.13")}
ROLLOUT_PLAY = "Roll out the agent, in batches"
BUILD_TASK = "Build the agent's wheel sets on the controller (one per host Python, machine and glibc)"


@pytest.fixture(scope="module")
def fleet(bed, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("mixed-fleet"), teleport=bed.teleport["multiplex"], kube=bed.kube, serial=2)
    try:
        for name, (release, _py) in HOSTS.items():
            f.add_hosts([name], release=release)
        yield f
    finally:
        f.stop()


def _build_targets(run) -> dict:
    """The wheel sets the role's controller-side build reported (the role's task names carry a role prefix)."""
    hits = [r for r in run.results if r["task"].endswith(BUILD_TASK) and r["status"] == "ok"]
    assert len(hits) == 1, [r["task"] for r in run.results][:40]  # run_once: one build for the batch
    return json.loads(hits[0]["result"]["stdout"])["targets"]


def _venv_python(fleet, host) -> str:
    r = fleet.hosts[host].run(agent_python_argv("import sys; print('%d.%d' % sys.version_info[:2])"), check=False)
    return r.stdout.strip()


def test_1_one_rollout_installs_and_works_on_debian_12_and_13(fleet):
    for name, (release, py) in HOSTS.items():
        os_release = fleet.hosts[name].run(["cat", "/etc/os-release"]).stdout
        assert f"VERSION_CODENAME={release}" in os_release, (name, os_release)
        assert fleet.hosts[name].run(["python3", "-V"]).stdout.strip().startswith(f"Python {py}."), name
        # no package index reachable from the host: loopback only, no route out (only the proxy is forwarded in)
        assert fleet.hosts[name].run(["ip", "route", "show", "default"]).stdout.strip() == "", name
        assert fleet.hosts[name].run(["ip", "-6", "route", "show", "default"]).stdout.strip() == "", name

    before = fleet.token_creations()
    run = fleet.rollout()
    assert run.rc == 0, run.stdout[-6000:]
    assert run.batches(ROLLOUT_PLAY) == [sorted(HOSTS)], run.batches(ROLLOUT_PLAY)
    assert fleet.token_creations() - before == len(HOSTS)

    # One controller-side build made one wheel set per host Python.
    targets = _build_targets(run)
    assert sorted(t.split(":")[0] for t in targets) == sorted(py for _rel, py in HOSTS.values()), targets
    assert all("dir" in v for v in targets.values()), targets

    for name, (release, py) in HOSTS.items():
        host = fleet.hosts[name]
        assert _venv_python(fleet, name) == py, name
        # the wheel set of the release the agent's command points to (each set in wheels/<its release's key>)
        wheels = host.run(["bash", "-c", "ls /opt/machine-id-agent/wheels/$(basename $(dirname $(dirname "
                                         "$(readlink /opt/machine-id-agent/bin/machine-id-agent))))"]).stdout.split()
        tag = "cp" + py.replace(".", "")
        # compiled dependencies are the host's own CPython ABI (or abi3), never the controller's
        assert any(w.startswith("cffi-") and f"-{tag}-{tag}-" in w for w in wheels), (name, wheels)
        assert any(w.startswith("pyyaml-") and f"-{tag}-{tag}-" in w for w in wheels), (name, wheels)
        assert any(w.startswith("cryptography-") and "-abi3-" in w for w in wheels), (name, wheels)
        assert host.run(["systemctl", "is-active", "machine-id.service"], check=False).stdout.strip() == "active", name
        r = fleet.reader_get_pods(name)
        assert r.returncode == 0 and f"pod/{tb.DEMO_POD}" in r.stdout, (name, r.stderr)


def test_2_rerun_changes_nothing_on_either_release(fleet):
    before = fleet.token_creations()
    run = fleet.rollout()
    assert run.rc == 0, run.stdout[-6000:]
    changed = changed_by_host(run)
    assert all(changed.get(h, 0) == 0 for h in HOSTS), changed
    # the cached wheel sets were reused, not rebuilt
    targets = _build_targets(run)
    assert not any(v.get("built") for v in targets.values()), targets
    assert fleet.token_creations() == before
    for name in HOSTS:
        assert fleet.reader_get_pods(name).returncode == 0, name


def _agent_files(fleet, host) -> str:
    return fleet.hosts[host].run(["sh", "-c", "find /opt/machine-id-agent /etc/tbot.yaml -printf '%p %s %T@\\n' "
                                              "2>/dev/null | sort"], check=False).stdout


def test_3_a_host_python_too_old_or_without_wheels_is_refused_clearly(fleet):
    """Hosts whose Python the agent cannot run on, or for which no wheels exist, are refused by name, before
    anything changes on them. One run per case: the rollout stops the batch at the first failed host."""
    fake = "/usr/local/bin/h6-fake-python"
    cases = [("h6-mix-12", "3.8"), ("h6-mix-13", "3.99")]
    for bad, py in cases:
        for name in HOSTS:
            # stands in for the host's Python when the role probes it (the probe is the only thing that runs it);
            # the other host gets the real one
            script = (f"#!/bin/sh\necho '{{\"python\": \"{py}\", \"machine\": \"x86_64\", \"libc\": [\"glibc\", \"2.36\"]}}'\n"
                      if name == bad else "#!/bin/sh\nexec /usr/bin/python3 \"$@\"\n")
            fleet.hosts[name].run(["sh", "-c", f"cat > {fake} && chmod 755 {fake}"], input=script)
        before = _agent_files(fleet, bad)
        run = fleet.rollout(extra_args=["-e", f"machine_id_agent_python={fake}"])
        assert run.rc != 0, run.stdout[-3000:]
        out = " ".join(run.stdout.split())  # assert messages are folded over lines
        if py == "3.8":
            assert (f"machine_id on {bad}: {fake} is Python 3.8 with libc glibc 2.36; the agent needs Python >= 3.9"
                    in out), run.stdout[-4000:]
        else:
            assert f"machine_id on {bad}: no agent wheels for its Python 3.99 (x86_64, glibc 2.36)" in out, \
                run.stdout[-4000:]
            assert "No matching distribution found" in out, run.stdout[-4000:]
            assert "Fix: let the controller's pip reach the missing wheels" in out, run.stdout[-4000:]
        assert "Traceback" not in run.stdout
        # refused before anything changed on the host
        assert _agent_files(fleet, bad) == before, bad
