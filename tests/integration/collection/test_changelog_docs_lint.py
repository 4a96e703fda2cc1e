# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Release and documentation checks a certified collection passes: antsibull-changelog lint, antsibull-docs
lint-collection-docs (plugin docs included), a changelog that lists every module, plugin, role and playbook of
the galaxy.yml version, and ``requirements``/``version_added`` on every module and filter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.playbook import REPO

BIN = Path(sys.executable).parent
COLLECTIONS = REPO / "build" / "collections"
MODULES = sorted(p.stem for p in (REPO / "plugins" / "modules").glob("*.py"))
FILTERS = sorted(p.stem for p in (REPO / "plugins" / "filter").glob("*.yml"))
GALAXY_VERSION = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]


def _version(text):
    assert text, "version_added is missing"
    return tuple(int(x) for x in str(text).split("."))


def _run(argv, timeout=900):
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_NOCOLOR="1",
               PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout, check=False)


def _tool(name):
    path = BIN / name
    assert path.exists(), f"{name} is not installed in the venv; it comes from requirements-test.txt"
    return str(path)


def test_antsibull_changelog_lint_is_clean():
    proc = _run([_tool("antsibull-changelog"), "lint"])
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_changelog_releases_the_galaxy_version_with_every_new_object():
    version = GALAXY_VERSION
    changes = yaml.safe_load((REPO / "changelogs" / "changelog.yaml").read_text())
    assert version in changes["releases"], sorted(changes["releases"])
    release = changes["releases"][version]
    assert sorted(m["name"] for m in release["modules"]) == MODULES
    assert sorted(f["name"] for f in release["plugins"]["filter"]) == FILTERS
    assert [r["name"] for r in release["objects"]["role"]] == ["machine_id"]
    assert [p["name"] for p in release["objects"]["playbook"]] == ["rollout"]
    assert release["changes"]["release_summary"]
    text = (REPO / "CHANGELOG.rst").read_text()
    assert f"v{version}\n" in text
    for name in MODULES + FILTERS + ["machine_id", "rollout"]:
        assert f"lanyard.machine_id.{name} - " in text, name
    # Fragments are named <issue>-<name>.yml (or v<version>-<name>.yml) and none is named like a playbook.
    for frag in (REPO / "changelogs" / "fragments").glob("*.y*ml"):
        head = frag.name.split("-", 1)[0]
        assert (head.isdigit() or head.startswith("v")) and "-" in frag.name, frag.name
        assert "playbook" not in frag.name, frag.name


def test_every_module_and_filter_has_requirements_and_version_added():
    proc = _run([_tool("ansible-doc"), "--json", "-t", "module"] + [f"lanyard.machine_id.{m}" for m in MODULES])
    assert proc.returncode == 0, proc.stderr
    docs = json.loads(proc.stdout)
    for m in MODULES:
        doc = docs[f"lanyard.machine_id.{m}"]["doc"]
        assert doc.get("requirements"), m
        assert _version(doc.get("version_added")) <= _version(GALAXY_VERSION), m
    proc = _run([_tool("ansible-doc"), "--json", "-t", "filter"] + [f"lanyard.machine_id.{f}" for f in FILTERS])
    assert proc.returncode == 0, proc.stderr
    for f in FILTERS:
        added = json.loads(proc.stdout)[f"lanyard.machine_id.{f}"]["doc"].get("version_added")
        assert _version(added) <= _version(GALAXY_VERSION), f


@pytest.mark.slow
def test_antsibull_docs_lint_collection_docs_is_clean():
    proc = _run([_tool("antsibull-docs"), "lint-collection-docs", "--plugin-docs", "--validate-collection-refs",
                 "all", "--disallow-unknown-collection-refs", "--check-extra-docs-refs", "."])
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr
