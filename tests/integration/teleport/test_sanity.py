# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`ansible-test sanity` over the whole collection passes with an empty ignore file (scripts/sanity.sh)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.slow]

# Tests that must have run, so a run that silently skipped everything cannot pass.
MUST_RUN = ("ansible-doc", "compile", "import", "pep8", "pylint", "validate-modules", "yamllint", "shebang")


def test_ignore_file_is_empty():
    ignores = sorted((REPO / "tests" / "sanity").glob("ignore-*.txt"))
    assert ignores, "tests/sanity/ignore-2.19.txt is missing"
    for path in ignores:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        assert lines == [], f"{path.name} must stay empty; fix the code instead: {lines}"


def test_ansible_test_sanity_passes():
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONPATH", None)  # ansible-test's import test must see the collection alone
    proc = subprocess.run([str(REPO / "scripts" / "sanity.sh")], capture_output=True, text=True, timeout=1500,
                          cwd=REPO, env=env, check=False)
    out = proc.stdout + proc.stderr
    ran = set(re.findall(r'Running sanity test "([^"]+)"', out))
    missing = [t for t in MUST_RUN if t not in ran]
    errors = [ln for ln in out.splitlines() if ln.startswith(("ERROR:", "FATAL:"))]
    assert proc.returncode == 0 and not missing, (
        f"scripts/sanity.sh exited {proc.returncode}; tests not run: {missing}\n" + "\n".join(errors[:80])
        + ("\n" + out[-2000:] if not errors else ""))
