# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run real ansible-playbook from tests and get every task result back as data.

    run = run_playbook(tmp_path, PLAY_YAML, extra_vars={...}, check=True, diff=True)
    run.rc, run.stdout (the whole human output), run.results (list of dicts), run.result("task name")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CALLBACKS = Path(__file__).resolve().parent / "callback_plugins"


@dataclass
class PlaybookRun:
    rc: int
    stdout: str
    results: list[dict] = field(default_factory=list)
    starts: list[dict] = field(default_factory=list)

    def hosts_started(self, play: str) -> set[str]:
        """Hosts that started at least one task of ``play``."""
        return {s["host"] for s in self.starts if s.get("play") == play}

    def batches(self, play: str) -> list[list[str]]:
        """The batches Ansible really ran for ``play``, from when each host started and finished its tasks:
        a host whose first task started after every host before it had finished opens a new batch."""
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for s in self.starts:
            if s.get("play") == play:
                first[s["host"]] = min(first.get(s["host"], s["t"]), s["t"])
                last[s["host"]] = max(last.get(s["host"], s["t"]), s["t"])
        for r in self.results:
            if r.get("play") == play and r["host"] in last:
                last[r["host"]] = max(last[r["host"]], r["t"])
        out: list[list[str]] = []
        end = None
        for host in sorted(first, key=lambda h: first[h]):
            if end is None or first[host] > end:
                out.append([])
                end = last[host]
            out[-1].append(host)
            end = max(end, last[host])
        return [sorted(batch) for batch in out]

    def result(self, task: str, host: str | None = None) -> dict:
        hits = [r for r in self.results if r["task"] == task and (host is None or r["host"] == host)]
        if not hits:
            raise AssertionError(f"no result for task {task!r}; tasks seen: {[r['task'] for r in self.results]}\n"
                                 f"{self.stdout[-3000:]}")
        return hits[-1]["result"] | {"_status": hits[-1]["status"]}

    def changed(self, task: str, host: str | None = None) -> bool:
        return bool(self.result(task, host).get("changed"))


def ansible_bin(name: str, bin_dir: Path | None = None) -> str:
    """``name`` from ``bin_dir`` (another ansible-core's venv, see helpers/matrix.py), else from this venv."""
    cand = Path(bin_dir or Path(sys.executable).parent) / name
    return str(cand) if cand.exists() or bin_dir else name


def run_playbook(workdir: Path, playbook: str | Path, extra_vars: dict | None = None, check: bool = False,
                 diff: bool = False, verbosity: int = 0, inventory: str | Path | None = None,
                 env: dict | None = None, timeout: float = 900, extra_args: list[str] | None = None,
                 bin_dir: Path | None = None) -> PlaybookRun:
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(playbook, str) and "\n" in playbook:
        pb = workdir / f"play-{len(list(workdir.glob('play-*.yml')))}.yml"
        pb.write_text(playbook)
    else:
        pb = Path(playbook)
    record = workdir / f"record-{os.getpid()}-{len(list(workdir.glob('record-*')))}.jsonl"
    argv = [ansible_bin("ansible-playbook", bin_dir), str(pb), "-i", str(inventory or "localhost,"),
            "-e", json.dumps(extra_vars or {})]
    if inventory is None:
        python = str(Path(bin_dir) / "python") if bin_dir else sys.executable
        argv += ["-c", "local", "-e", json.dumps({"ansible_python_interpreter": python})]
    if check:
        argv.append("--check")
    if diff:
        argv.append("--diff")
    if verbosity:
        argv.append("-" + "v" * verbosity)
    argv += extra_args or []
    full_env = dict(os.environ)
    full_env.update({
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / "build" / "collections"),
        "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACKS),
        "ANSIBLE_CALLBACKS_ENABLED": "lanyard_record",
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": str(workdir / ".ansible-tmp"),
        "LANYARD_RECORD_FILE": str(record),
    })
    full_env.update(env or {})
    proc = subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=workdir,
                          check=False)
    results, starts = [], []
    if record.exists():
        results = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    starts_file = Path(str(record) + ".starts")
    if starts_file.exists():
        starts = [json.loads(line) for line in starts_file.read_text().splitlines() if line.strip()]
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr, results, starts)
