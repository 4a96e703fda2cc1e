# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Galaxy artifact: it holds the collection only, and the collection installed from it works on its own.

``ansible-galaxy collection build`` from the checkout, the file list checked against what a collection user
gets (no Makefile, tests, scripts ...; the agent's source, which the role builds wheels from, complete), then
``ansible-galaxy collection install --offline`` into a fresh path, and on the real test bed with a real systemd
host: ``ansible-playbook lanyard.machine_id.rollout`` and a play with the role ``lanyard.machine_id.machine_id``,
both with ANSIBLE_COLLECTIONS_PATH = that fresh path only and a working directory outside the checkout. The
agent's wheels are built into a fresh directory from the agent source inside the installed collection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from helpers.fleet import Fleet
from helpers.playbook import REPO, ansible_bin, run_playbook
from helpers.runner import run_with_runner
from hosts import CONNECTION_PLUGINS

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

# What a collection user gets at the top of the artifact, and nothing else.
TOP_LEVEL = {"MANIFEST.json", "FILES.json", "README.md", "COPYING", "CHANGELOG.rst", "meta", "plugins", "roles",
             "playbooks", "agent", "docs", "changelogs", "requirements.txt", "bindep.txt"}
# Development files the artifact must not carry (issue 15).
FORBIDDEN = ("Makefile", "pytest.ini", "requirements-test.txt", ".gitignore", "scripts", "tests", "bench",
             "extensions", "build", ".ci", "changelogs/fragments", "changelogs/.plugin-cache.yaml")
HOST = "artifact-1"


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"ANSIBLE_NOCOLOR": "1", "PATH": str(Path(sys.executable).parent) + os.pathsep + env["PATH"]})
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact")
    proc = subprocess.run([ansible_bin("ansible-galaxy"), "collection", "build", "--output-path", str(out), str(REPO)],
                          capture_output=True, text=True, cwd=out, env=_env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    path = out / f"lanyard-machine_id-{version}.tar.gz"
    assert path.is_file(), sorted(p.name for p in out.iterdir())
    return path


@pytest.fixture(scope="module")
def installed(artifact, tmp_path_factory) -> Path:
    """The collection installed offline from the artifact into a fresh collections path."""
    dest = tmp_path_factory.mktemp("installed-collections")
    proc = subprocess.run([ansible_bin("ansible-galaxy"), "collection", "install", "--offline", "-p", str(dest),
                           str(artifact)], capture_output=True, text=True, cwd=dest,
                          env=_env(ANSIBLE_COLLECTIONS_PATH=str(dest)), timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (dest / "ansible_collections" / "lanyard" / "machine_id" / "MANIFEST.json").is_file(), proc.stdout
    return dest


def _names(artifact: Path) -> list[str]:
    with tarfile.open(artifact) as tar:
        return [m.name.rstrip("/") for m in tar.getmembers()]


def test_artifact_holds_the_collection_only(artifact):
    names = _names(artifact)
    top = {n.split("/", 1)[0] for n in names}
    assert top <= TOP_LEVEL, f"unexpected top-level entries in the artifact: {sorted(top - TOP_LEVEL)}"
    leaked = [n for n in names if any(n == f or n.startswith(f + "/") for f in FORBIDDEN)]
    assert not leaked, leaked
    junk = [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".tar.gz")) or ".egg-info" in n]
    assert not junk, junk
    for need in ("README.md", "COPYING", "CHANGELOG.rst", "changelogs/changelog.yaml", "meta/runtime.yml",
                 "playbooks/rollout.yml", "roles/machine_id/meta/argument_specs.yml",
                 "roles/machine_id/files/build_wheels.py", "roles/machine_id/files/prometheus/machine-id-agent.rules.yml",
                 "plugins/doc_fragments/kube_auth.py",
                 "agent/pyproject.toml", "agent/README.md"):
        assert need in names, need
    for module in sorted((REPO / "plugins" / "modules").glob("*.py")):
        assert f"plugins/modules/{module.name}" in names, module.name
    # Every source file of the agent (the role builds its wheel from them on the controller).
    agent_src = REPO / "agent" / "src" / "machine_id_agent"
    expected = sorted(f"agent/src/machine_id_agent/{p.relative_to(agent_src)}" for p in agent_src.rglob("*.py")
                      if "__pycache__" not in p.parts)
    assert expected and [n for n in expected if n not in names] == []
    # MANIFEST.json / FILES.json agree with the tarball.
    with tarfile.open(artifact) as tar:
        files = json.load(tar.extractfile("FILES.json"))["files"]
        manifest = json.load(tar.extractfile("MANIFEST.json"))["collection_info"]
    assert {f["name"] for f in files if f["name"] != "."} == set(names) - {"MANIFEST.json", "FILES.json"}
    assert manifest["namespace"] == "lanyard" and manifest["name"] == "machine_id"
    assert all(str(manifest[k]).startswith("https://example.invalid/lanyard/machine_id")
               for k in ("repository", "documentation", "issues", "homepage"))


def test_installed_collection_documents_itself(installed, tmp_path):
    env = _env(ANSIBLE_COLLECTIONS_PATH=str(installed))
    proc = subprocess.run([ansible_bin("ansible-doc"), "--json", "-t", "module", "--list", "lanyard.machine_id"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)) == sorted(
        f"lanyard.machine_id.{p.stem}" for p in (REPO / "plugins" / "modules").glob("*.py"))
    proc = subprocess.run([ansible_bin("ansible-doc"), "--json", "-t", "role", "lanyard.machine_id.machine_id"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    role = json.loads(proc.stdout)["lanyard.machine_id.machine_id"]
    assert role["path"].startswith(str(installed)), role["path"]


def _builder() -> str:
    cand = Path(sys.executable).parent / "ansible-builder"
    return str(cand) if cand.exists() else "ansible-builder"


def test_execution_environment_from_the_installed_collection(artifact, installed, tmp_path):
    """Issue 14 point 4: ansible-builder reads the collection's EE needs (meta/execution-environment.yml) from the
    installed collection, and the documented EE definition (docs/examples/execution-environment.yml) makes a build
    context that installs this artifact and tctl (no image is built here: no container runtime)."""
    proc = subprocess.run([_builder(), "introspect", "--sanitize", str(installed)], capture_output=True, text=True,
                          env=_env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deps = yaml.safe_load(proc.stdout[proc.stdout.index("---"):])
    python = [line.split("#")[0].strip() for line in deps["python"] if "lanyard.machine_id" in line]
    assert "requests>=2.25" in python, deps
    assert any(line.startswith("ca-certificates") for line in deps["system"]), deps

    work = tmp_path / "ee"
    work.mkdir()
    shutil.copy2(REPO / "docs" / "examples" / "execution-environment.yml", work)
    shutil.copy2(artifact, work)
    definition = yaml.safe_load((work / "execution-environment.yml").read_text())
    assert definition["dependencies"]["galaxy"]["collections"][0]["name"].endswith(artifact.name), \
        "docs/examples/execution-environment.yml names another artifact version than galaxy.yml's"
    proc = subprocess.run([_builder(), "create", "-f", "execution-environment.yml", "-c", "context",
                           "--output-filename", "Containerfile"], capture_output=True, text=True, cwd=work,
                          env=_env(), timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ctx = work / "context"
    containerfile = (ctx / "Containerfile").read_text()
    assert (ctx / "_build" / "collections" / artifact.name).read_bytes() == artifact.read_bytes()
    assert "ansible-galaxy collection install" in containerfile
    assert "introspect" in containerfile  # the collection's requirements are resolved at build time
    tctl = [line for line in containerfile.splitlines() if "cdn.teleport.dev" in line]
    assert tctl and "sha256sum -c" in tctl[0] and "/usr/local/bin/tctl" in tctl[0], tctl


class _ArtifactFleet(Fleet):
    """The checkout's fleet helper, with the agent's wheels built into a fresh directory (no cached set)."""

    wheel_dir: Path | None = None

    def group_vars(self) -> dict:
        return dict(super().group_vars(), machine_id_agent_build_dir=str(self.wheel_dir))


def test_rollout_and_role_from_the_installed_collection(installed, teleport_multiplex, kube, tmp_path):
    workdir = tmp_path / "work"  # outside the checkout: the playbook is found through the collection only
    assert REPO not in workdir.parents
    fleet = _ArtifactFleet(workdir, teleport=teleport_multiplex, kube=kube, bot_name="artifact",
                           collections_path=installed)
    fleet.wheel_dir = tmp_path / "wheels"
    coll = installed / "ansible_collections" / "lanyard" / "machine_id"
    try:
        fleet.add_hosts([HOST])
        # The first rollout as AWX runs it: ansible-runner on a private data dir (project, inventory, env/extravars,
        # env/envvars), in an environment that has only the installed collection.
        tokens = fleet.token_creations()
        job = run_with_runner(tmp_path / "pdd", "lanyard.machine_id.rollout", inventory=fleet.write_inventory(),
                              extravars={"machine_id_rollout_serial": 1},
                              envvars={"ANSIBLE_CONNECTION_PLUGINS": str(CONNECTION_PLUGINS),
                                       "ANSIBLE_PIPELINING": "True", "ANSIBLE_COLLECTIONS_PATH": str(installed),
                                       "SSL_CERT_FILE": str(teleport_multiplex.web_ca_path)})
        assert job.rc == 0 and job.status == "successful", job.stdout[-6000:]
        assert fleet.token_creations() - tokens == 1
        # The wheels were built from the agent source inside the installed collection (read from the job events).
        build = job.ok_results("Build the agent's wheel sets", HOST)
        assert build, sorted({e["event_data"].get("task") for e in job.events if e["event_data"].get("task")})[:60]
        argv = build[0]["cmd"]
        assert argv[1] == str(coll / "roles" / "machine_id" / "files" / "build_wheels.py"), argv
        assert Path(argv[2]).resolve() == (coll / "agent").resolve(), argv
        assert list(fleet.wheel_dir.glob("*/machine_id_agent-*.whl")), sorted(fleet.wheel_dir.rglob("*"))
        got = fleet.reader_get_pods(HOST)
        assert got.returncode == 0 and "pod/" in got.stdout, (got.stdout, got.stderr)
        # The token that was minted, sent and used is in no job event and no other file runner wrote.
        token = fleet.hosts[HOST].run(["cat", "/etc/machine-id-agent/token"]).stdout.strip()
        assert len(token) >= 16
        assert len(job.events) > 50 and job.ok_results("This host's bot", HOST), len(job.events)
        leaked = [str(f.relative_to(job.artifacts)) for f in job.artifact_files()
                  if token.encode() in f.read_bytes()]
        assert leaked == [], leaked
        assert token not in job.stdout

        # The role on its own, from the installed collection, on the host that now holds an identity, with the
        # CA pins the rollout gives it (read with the installed collection's teleport_cluster_info).
        play = """
- name: The role from the installed collection
  hosts: machine_id
  module_defaults:
    group/lanyard.machine_id.teleport: "{{ machine_id_tctl_connection }}"
  pre_tasks:
    - name: Read the cluster
      lanyard.machine_id.teleport_cluster_info:
        proxy_addr: "{{ machine_id_proxy_server }}"
        ca_path: "{{ machine_id_controller_proxy_ca_path }}"
      register: cluster
      run_once: true
      delegate_to: localhost
  roles:
    - role: lanyard.machine_id.machine_id
      vars:
        machine_id_ca_pins: "{{ cluster.cluster.ca_pins }}"
"""
        env = {"ANSIBLE_CONNECTION_PLUGINS": str(CONNECTION_PLUGINS), "ANSIBLE_PIPELINING": "True",
               "ANSIBLE_COLLECTIONS_PATH": str(installed), "SSL_CERT_FILE": str(teleport_multiplex.web_ca_path)}
        role_run = run_playbook(workdir / "role", play, inventory=fleet.write_inventory(), env=env)
        assert role_run.rc == 0, role_run.stdout[-6000:]
        ran = [r for r in role_run.results if r["host"] == HOST]
        assert any("Build the agent's wheel sets" in r["task"] for r in role_run.results), role_run.stdout[-3000:]
        changed = [r["task"] for r in ran if r["status"] == "ok" and r["result"].get("changed")]
        assert changed == [], changed  # the rollout already did the work: the role alone changes nothing
        active = fleet.hosts[HOST].run(["systemctl", "is-active", "machine-id.service"], check=False)
        assert active.stdout.strip() == "active", active.stdout + active.stderr
        got = fleet.reader_get_pods(HOST)
        assert got.returncode == 0 and "pod/" in got.stdout, (got.stdout, got.stderr)
    finally:
        fleet.stop()
