# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``ansible-lint --profile production`` reports nothing on the whole collection (playbooks, role, molecule
scenario, changelog fragments), run the way a certified collection's CI runs it: from the collection root inside
an ``ansible_collections/<namespace>/<name>`` tree, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers.playbook import REPO

BIN = Path(sys.executable).parent


def test_ansible_lint_production_profile_is_clean(tmp_path):
    lint = BIN / "ansible-lint"
    assert lint.exists(), "ansible-lint is not installed in the venv; it comes from requirements-test.txt (make venv)"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    root = tmp_path / "ansible_collections" / "lanyard" / "machine_id"
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(tmp_path), NO_COLOR="1", ANSIBLE_NOCOLOR="1",
               PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""), HOME=str(tmp_path / "home"))
    proc = subprocess.run([str(lint), "--offline", "--profile", "production", "-f", "pep8"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "0 failure(s), 0 warning(s)" in out and "Profile 'production' was required, and it passed" in out, out[-3000:]
