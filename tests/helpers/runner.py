# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run a playbook the way AWX / Ansible Automation Platform does: ``ansible-runner run`` on a private data dir.

    <pdd>/project/<playbook>.yml      the project (here: one import_playbook of the collection's playbook)
    <pdd>/inventory/hosts.yml         the inventory
    <pdd>/env/extravars               extra vars (YAML)
    <pdd>/env/envvars                 environment of the run
    <pdd>/artifacts/<ident>/          what runner leaves: job_events/*.json, stdout, rc, status, command

    job = run_with_runner(pdd, "lanyard.machine_id.rollout", inventory=inv_path, extravars={...}, envvars={...})
    job.rc, job.status, job.events (list of dicts, in counter order), job.artifact_files() (every file runner wrote)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class RunnerJob:
    rc: int
    status: str
    stdout: str
    artifacts: Path
    events: list[dict] = field(default_factory=list)

    def artifact_files(self) -> list[Path]:
        return sorted(p for p in self.artifacts.rglob("*") if p.is_file())

    def ok_results(self, task: str, host: str | None = None) -> list[dict]:
        """``event_data.res`` of every runner_on_ok event of a task whose name contains ``task`` (on ``host``)."""
        return [e["event_data"].get("res") or {} for e in self.events
                if e.get("event") == "runner_on_ok" and task in (e["event_data"].get("task") or "")
                and (host is None or e["event_data"].get("host") == host)]


def runner_bin() -> str:
    cand = Path(sys.executable).parent / "ansible-runner"
    return str(cand) if cand.exists() else "ansible-runner"


def run_with_runner(pdd: Path, playbook: str, inventory: Path, extravars: dict | None = None,
                    envvars: dict | None = None, ident: str = "job-1", timeout: float = 1800) -> RunnerJob:
    """``playbook`` is a playbook FQCN (or a file name in the project); the project imports it."""
    (pdd / "project").mkdir(parents=True, exist_ok=True)
    (pdd / "inventory").mkdir(exist_ok=True)
    (pdd / "env").mkdir(exist_ok=True)
    (pdd / "project" / "site.yml").write_text(f"---\n- name: The collection's playbook\n"
                                              f"  ansible.builtin.import_playbook: {playbook}\n")
    shutil.copy2(inventory, pdd / "inventory" / "hosts.yml")
    (pdd / "env" / "extravars").write_text(yaml.safe_dump(extravars or {}))
    env = {"ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_HOST_KEY_CHECKING": "False",
           "ANSIBLE_RETRY_FILES_ENABLED": "False", "ANSIBLE_LOCAL_TEMP": str(pdd / "tmp")}
    env.update(envvars or {})
    (pdd / "env" / "envvars").write_text(yaml.safe_dump(env))
    for name in ("extravars", "envvars"):
        (pdd / "env" / name).chmod(0o600)
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    proc = subprocess.run([runner_bin(), "run", str(pdd), "-p", "site.yml", "--ident", ident],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(os.environ, PATH=path))
    art = pdd / "artifacts" / ident
    events = []
    for f in (art / "job_events").glob("*.json"):
        events.append(json.loads(f.read_text()))
    events.sort(key=lambda e: e.get("counter", 0))
    status = (art / "status").read_text().strip() if (art / "status").exists() else "?"
    rc = int((art / "rc").read_text().strip()) if (art / "rc").exists() else proc.returncode
    return RunnerJob(rc=rc, status=status, stdout=proc.stdout + proc.stderr, artifacts=art, events=events)
