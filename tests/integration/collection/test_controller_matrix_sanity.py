# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller matrix's sanity half (helpers/matrix.py): ``ansible-test sanity`` with every test that ansible-core
version has and the empty ignore files, on each ansible-core minor besides the project venv's 2.19 (which
teleport/test_sanity.py runs). The unit tests and the rollout on each are in test_controller_matrix.py."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from helpers.matrix import MATRIX, venv_or_fail
from helpers.playbook import REPO


# Every sanity test ansible-test has on that version, with the empty ignore files (as test_sanity.py on 2.19);
# these must have run, so a run that skipped everything cannot pass.
MUST_RUN = ("validate-modules", "ansible-doc", "import", "compile", "yamllint", "action-plugin-docs", "pep8",
            "pylint", "shebang")


@pytest.mark.slow
@pytest.mark.parametrize("minor", sorted(MATRIX))
def test_sanity_on_each_ansible_core(minor):
    bin_dir = venv_or_fail(minor)
    env = dict(os.environ, LANYARD_SANITY_VENV=str(bin_dir.parent),
               PATH=str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONPATH", None)  # ansible-test's import test must see the collection alone
    proc = subprocess.run([str(REPO / "scripts" / "sanity.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500, check=False)
    out = proc.stdout + proc.stderr
    ran = set(re.findall(r'Running sanity test "([^"]+)"', out))
    errors = [ln for ln in out.splitlines() if ln.startswith(("ERROR:", "FATAL:"))]
    assert proc.returncode == 0 and set(MUST_RUN) <= ran, (
        f"ansible-core {MATRIX[minor][0]}: sanity exited {proc.returncode}, ran {sorted(ran)}\n"
        + "\n".join(errors[:60]) + ("\n" + out[-2000:] if not errors else ""))
