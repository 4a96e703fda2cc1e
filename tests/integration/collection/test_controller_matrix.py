# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller matrix (helpers/matrix.py): every ansible-core minor from the oldest ``requires_ansible`` allows
(2.16) to the newest on PyPI (2.21). On each, the unit tests of the controller side (modules, filters, role
templates and assertions run by that ansible-core); with the oldest and the newest, the real rollout on the bed:
each brings a fresh host up, the other one reruns it with no change (check mode with the newest). The project venv is the
2.19 entry (the whole suite runs on it). ``ansible-test sanity`` on each is in test_controller_matrix_sanity.py (its own
file, so that another test worker can run it meanwhile)."""

from __future__ import annotations

import os
import subprocess

import pytest

import testbed as tb
from helpers.fleet import Fleet, changed_by_host
from helpers.matrix import MATRIX, NEWEST, OLDEST, venv_or_fail
from helpers.playbook import REPO

UNIT = ["tests/unit/teleport", "tests/unit/kube", "tests/unit/rollout", "tests/unit/role"]


@pytest.mark.parametrize("minor", sorted(MATRIX))
def test_controller_unit_tests_on_each_ansible_core(minor):
    bin_dir = venv_or_fail(minor)
    version = subprocess.run([str(bin_dir / "python"), "-c", "import ansible.release as r; print(r.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == MATRIX[minor][0]
    env = dict(os.environ, PATH=str(bin_dir) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO / "agent" / "src")]))
    proc = subprocess.run([str(bin_dir / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"] + UNIT, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200, check=False)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"ansible-core {version}:\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail


@pytest.mark.testbed
@pytest.mark.slow
def test_rollout_with_the_oldest_and_the_newest_ansible_core(testbed_bins, tmp_path):
    old, new = venv_or_fail(OLDEST), venv_or_fail(NEWEST)
    try:
        bed = tb.Testbed.start(modes=("multiplex",))
    except (tb.TestbedError, tb.BuildError) as exc:
        pytest.fail(f"the real test bed failed to start: {exc}", pytrace=False)
    f = Fleet(tmp_path / "fleet", teleport=bed.teleport["multiplex"], kube=bed.kube, serial=2)
    try:
        for minor, bin_dir, host in ((OLDEST, old, "mx-old"), (NEWEST, new, "mx-new")):
            f.add_hosts([host])
            f.ansible_bin_dir = bin_dir
            run = f.rollout()
            assert run.rc == 0, (minor, run.stdout[-5000:])
            assert {r.get("core") for r in run.results} == {MATRIX[minor][0]}  # the run really used that ansible-core
            r = f.reader_get_pods(host)
            assert r.returncode == 0 and f"pod/{tb.DEMO_POD}" in r.stdout, (minor, r.stderr)
            changed = changed_by_host(run)
            assert all(n == 0 for h, n in changed.items() if h != host), (minor, changed)  # the other one: no change
        # the newest already reran the oldest's host; now the oldest reruns both, the newest in check mode
        for bin_dir, check in ((old, False), (new, True)):
            f.ansible_bin_dir = bin_dir
            run = f.rollout(check=check, diff=check)
            assert run.rc == 0, (str(bin_dir), check, run.stdout[-4000:])
            assert all(n == 0 for n in changed_by_host(run).values()), (str(bin_dir), check, changed_by_host(run))
    finally:
        f.stop()
        bed.stop()
