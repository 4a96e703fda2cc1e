# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared pytest wiring: import paths and the real test bed fixtures.

Fixtures:
  testbed_bins  -- paths of the real binaries (fails with the fix command when any is missing)
  testbed       -- ONE bed per session: kube-apiserver + Teleport in both listener modes
  kube          -- the bed's KubeCluster (admin kubeconfig, kubectl, server, CA)
  teleport      -- parametrised over both listener modes ("multiplex", "separate")
  teleport_multiplex / teleport_separate -- one mode only
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
COLLECTIONS = REPO / "build" / "collections"

sys.path.insert(0, str(TESTS))
# The agent from THIS checkout, in this process and in every process the tests start (the agent runs as
# `python -m machine_id_agent`). The venv's editable install is shared by every clone that uses the same venv
# and points at whichever clone ran scripts/bootstrap.sh last.
AGENT_SRC = REPO / "agent" / "src"
sys.path.insert(0, str(AGENT_SRC))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(AGENT_SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(AGENT_SRC)])
# `ansible_collections.lanyard.machine_id` resolves through build/collections (made by scripts/bootstrap.sh).
_link = COLLECTIONS / "ansible_collections" / "lanyard" / "machine_id"
if not _link.exists():
    _link.parent.mkdir(parents=True, exist_ok=True)
    try:
        _link.symlink_to(REPO)
    except FileExistsError:  # another worker of the same run made it first
        pass
sys.path.insert(0, str(COLLECTIONS))
os.environ.setdefault("ANSIBLE_COLLECTIONS_PATH", str(COLLECTIONS))

import testbed as _tb  # noqa: E402


@pytest.fixture(scope="session")
def testbed_bins():
    try:
        return _tb.require_binaries()
    except _tb.BuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def testbed(testbed_bins):
    try:
        bed = _tb.Testbed.start()
    except (_tb.TestbedError, _tb.BuildError) as exc:
        pytest.fail(f"the real test bed failed to start: {exc}", pytrace=False)
    yield bed
    bed.stop()


@pytest.fixture(scope="session")
def kube(testbed):
    return testbed.kube


@pytest.fixture(scope="session", params=_tb.MODES)
def teleport(testbed, request):
    return testbed.teleport[request.param]


@pytest.fixture(scope="session")
def teleport_multiplex(testbed):
    return testbed.teleport["multiplex"]


@pytest.fixture(scope="session")
def teleport_separate(testbed):
    return testbed.teleport["separate"]


# The test files that take longest (minutes each, from CI runs), longest first. scripts/test.sh's workers take one
# file at a time in collection order, so a long file collected last would be the whole run's tail; these go first.
# The other files keep their order after them. A file missing from the list only costs time, never a test.
LONG_FILES_FIRST = (
    "integration/collection/test_controller_matrix.py",
    "integration/agent/test_rotation_real.py",
    "integration/collection/test_controller_matrix_sanity.py",
    "integration/rollout/test_rollout.py",
    "integration/rollout/test_upgrade.py",
    "integration/agent/test_crash_real.py",
    "integration/rollout/test_no_change_path.py",
    "integration/agent/test_agent_e2e.py",
    "integration/teleport/test_teleport_modules.py",
    "integration/rollout/test_adopt_tbot_edges.py",
    "integration/rollout/test_adopt_tbot.py",
    "integration/teleport/test_sanity.py",
    "integration/role/test_molecule.py",
    "integration/rollout/test_mixed_fleet.py",
    "integration/role/test_role_errors.py",
    "integration/rollout/test_reader_reload.py",
    "integration/rollout/test_multi_cluster_role.py",
    "integration/rollout/test_tctl_calls.py",
)


@pytest.hookimpl(trylast=True)  # after pytest has grouped each file's tests by their parametrised fixtures
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}

    def key(item):
        try:
            rel = Path(str(item.path)).resolve().relative_to(TESTS).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(rel, len(rank))

    items.sort(key=key)  # stable: each file's own order, and the order of the files not listed, are kept
