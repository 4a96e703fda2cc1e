#!/usr/bin/env python
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""playbooks/rollout.yml on real batches: the first rollout and the no-change rerun, for fleets of 1, 4, 12 and
24 real systemd hosts, with the default batch ramp ([1, 5, '25%']) and all at once ('100%'), for this tree and
for a baseline commit checked out beside it (a git worktree) in the same run.

    python3 bench/rollout.py [--sizes 1,4,12,24] [--modes ramp,all] [--baseline 648c7e0] [--no-baseline]
                             [--forks 25]

Per tree, size and mode: a fresh bed (TLS routing) and fresh hosts. Measured per run:
- wall time of ansible-playbook;
- controller CPU seconds: user+sys of ansible-playbook and every process it waited for (its forks, the
  connection's nsenter, tctl, the wheel build), from getrusage(RUSAGE_CHILDREN) around the run;
- tctl calls (a counting wrapper) and join tokens created (Teleport's audit log and `tctl bots add`);
- tasks run per host (task results that were not skipped, from the JSON callback);
- memory per test host after the rerun: PSS of every process in the host's PID namespace (systemd, journald,
  the agent, ...), mean over the hosts.
The table goes to stdout (markdown) and everything to bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import testbed as tb  # noqa: E402
from helpers.fleet import Fleet, changed_by_host  # noqa: E402

MODES = {"ramp": "", "all": "100%"}  # "" = the playbook's default ramp [1, 5, '25%']


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _pidns(pid) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def host_pss_kb(leader_pid: int) -> int:
    """PSS (kB) of every process in the PID namespace of a test host's PID 1."""
    ns = _pidns(leader_pid)
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _pidns(entry) != ns:
            continue
        try:
            for line in Path(f"/proc/{entry}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


def tasks_per_host(run) -> float:
    hosts = {}
    for r in run.results:
        if r["status"] != "skipped" and not r["result"].get("skipped"):
            hosts[r["host"]] = hosts.get(r["host"], 0) + 1
    return round(sum(hosts.values()) / len(hosts), 1) if hosts else 0.0


def one_run(tree: Path, n: int, mode: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"lanyard-bench-rollout-{n}-{mode}-"))
    colls = work / "collections"
    (colls / "ansible_collections" / "lanyard").mkdir(parents=True)
    (colls / "ansible_collections" / "lanyard" / "machine_id").symlink_to(tree)
    bed = tb.Testbed.start(modes=("multiplex",))
    fleet = Fleet(work, teleport=bed.teleport["multiplex"], kube=bed.kube, serial=MODES[mode] or None,
                  collections_path=colls)
    try:
        # names unique to this bench process: a second bench (another checkout) starting "bench-1" would stop this
        # run's host of that name first
        fleet.add_hosts([f"bench{os.getpid()}-{i}" for i in range(1, n + 1)])
        sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False).stdout.strip()
        row = {"tree": ("now " if tree == REPO else "baseline ") + sha + ("+changes" if dirty else ""),
               "hosts": n, "mode": mode}
        for label in ("first", "rerun"):
            calls0, tokens0 = fleet.tctl_calls(), fleet.token_creations()
            cpu0, t0 = _children_cpu(), time.monotonic()
            run = fleet.rollout()
            row[f"{label}_s"] = round(time.monotonic() - t0, 1)
            row[f"{label}_cpu_s"] = round(_children_cpu() - cpu0, 1)
            if run.rc != 0:
                raise SystemExit(f"rollout ({tree}, {label}, {n} hosts, {mode}) failed:\n{run.stdout[-4000:]}")
            row[f"{label}_tctl_calls"] = fleet.tctl_calls() - calls0
            row[f"{label}_tokens"] = fleet.token_creations() - tokens0
            row[f"{label}_changed"] = sum(changed_by_host(run).values())
            row[f"{label}_tasks_per_host"] = tasks_per_host(run)
        row["rerun_cpu_s_per_host"] = round(row["rerun_cpu_s"] / n, 2)
        row["host_pss_mb"] = round(sum(host_pss_kb(h.leader_pid) for h in fleet.hosts.values()) / n / 1024, 1)
        return row
    finally:
        fleet.stop()
        bed.stop()
        shutil.rmtree(work, ignore_errors=True)


def baseline_tree(commit: str) -> Path:
    path = Path(os.environ.get("LANYARD_CACHE", Path.home() / ".cache" / "lanyard")) / "bench" / f"baseline-{commit}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,12,24")
    ap.add_argument("--modes", default="ramp,all")
    ap.add_argument("--baseline", default="648c7e0", help="commit to compare with (a git worktree in the cache)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "rollout.json"))
    ap.add_argument("--forks", type=int, default=25,
                    help="ansible-playbook --forks (Ansible's default of 5 would serialise 24 hosts by itself)")
    args = ap.parse_args(argv)
    os.environ["ANSIBLE_FORKS"] = str(args.forks)
    trees = [REPO] + ([] if args.no_baseline else [baseline_tree(args.baseline)])
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            for tree in trees:
                print(f"[bench] {tree.name}: rollout to {n} host(s), {mode} ...", file=sys.stderr, flush=True)
                rows.append(one_run(tree, n, mode))
                print(f"[bench] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
                out = Path(args.out)
                out.parent.mkdir(exist_ok=True)
                out.write_text(json.dumps(rows, indent=2))
    print("| tree | hosts | batches | first (s) | first CPU (s) | first tctl | first tokens | tasks/host | "
          "rerun (s) | rerun CPU (s) | rerun CPU/host (s) | rerun tctl | rerun tasks/host | rerun changed | "
          "host PSS (MB) |")
    print("|" + "---|" * 15)
    for r in rows:
        print(f"| {r['tree']} | {r['hosts']} | {r['mode']} | {r['first_s']} | {r['first_cpu_s']} | "
              f"{r['first_tctl_calls']} | {r['first_tokens']} | {r['first_tasks_per_host']} | {r['rerun_s']} | "
              f"{r['rerun_cpu_s']} | {r['rerun_cpu_s_per_host']} | {r['rerun_tctl_calls']} | "
              f"{r['rerun_tasks_per_host']} | {r['rerun_changed']} | {r['host_pss_mb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
