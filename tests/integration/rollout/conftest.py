# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rollout tests' bed: each test module gets a fresh real bed (Teleport in one listener mode, TLS routing,
plus kube-apiserver), so one module's bots, locks and tokens never meet another's. Each module's ``fleet``
fixture builds its hosts on it; pytest tears the fleet down before the bed."""

from __future__ import annotations

import pytest

import testbed as tb


@pytest.fixture(scope="module")
def bed(testbed_bins):
    try:
        b = tb.Testbed.start(modes=("multiplex",))
    except (tb.TestbedError, tb.BuildError) as exc:
        pytest.fail(f"the real test bed failed to start: {exc}", pytrace=False)
    yield b
    b.stop()
