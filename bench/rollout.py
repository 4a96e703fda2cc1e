#!/usr/bin/env python
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""playbooks/rollout.yml on real batches: the first rollout and the no-change rerun, for fleets of 1, 4, 12 and
24 real systemd hosts, with the default batch ramp ([1, 5, '25%']) and all at once ('100%'), for this tree and
for a baseline commit checked out beside it (a git worktree) in the same run.

    python3 bench/rollout.py [--sizes 1,4,12,24] [--modes ramp,all] [--baseline 648c7e0] [--no-baseline]
                             [--baseline-modes all] [--reruns 3] [--baseline-reruns 1] [--forks 25]

Per tree (this tree's rows first, then the baseline's), size and mode: a fresh bed (TLS routing) and fresh
hosts. Measured per run:
- wall time of ansible-playbook (the no-change rerun is run --reruns times in a row: median and range);
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
import statistics
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


def one_run(tree: Path, n: int, mode: str, reruns: int = 3) -> dict:
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
        samples = []
        for label in ["first"] + ["rerun"] * reruns:
            calls0, tokens0 = fleet.tctl_calls(), fleet.token_creations()
            cpu0, t0 = _children_cpu(), time.monotonic()
            run = fleet.rollout()
            wall, cpu = round(time.monotonic() - t0, 1), round(_children_cpu() - cpu0, 1)
            if run.rc != 0:
                raise SystemExit(f"rollout ({tree}, {label}, {n} hosts, {mode}) failed:\n{run.stdout[-4000:]}")
            got = {"s": wall, "cpu_s": cpu, "tctl_calls": fleet.tctl_calls() - calls0,
                   "tokens": fleet.token_creations() - tokens0, "changed": sum(changed_by_host(run).values()),
                   "tasks_per_host": tasks_per_host(run)}
            if label == "first":
                row.update({f"first_{k}": v for k, v in got.items()})
            else:
                samples.append(got)
        # the no-change rerun, run `reruns` times in a row: the median, and every sample (the spread)
        for k in ("s", "cpu_s"):
            row[f"rerun_{k}"] = statistics.median(x[k] for x in samples)
            row[f"rerun_{k}_samples"] = [x[k] for x in samples]
        for k in ("tctl_calls", "tokens", "changed", "tasks_per_host"):  # the worst sample
            row[f"rerun_{k}"] = max(x[k] for x in samples)
        row["rerun_cpu_s_per_host"] = round(row["rerun_cpu_s"] / n, 2)
        row["host_pss_mb"] = round(sum(host_pss_kb(h.leader_pid) for h in fleet.hosts.values()) / n / 1024, 1)
        return row
    finally:
        fleet.stop()
        bed.stop()
        shutil.rmtree(work, ignore_errors=True)


def _range(xs) -> str:
    return f"{min(xs)}-{max(xs)}" if len(xs) > 1 else str(xs[0])


def table(rows) -> str:
    """The markdown table, then the issue's ratios computed from the same rows."""
    out = ["| tree | hosts | batches | first (s) | first CPU (s) | first tctl | first tokens | first tasks/host | "
           "rerun (s), median [range] | rerun CPU (s), median [range] | rerun CPU/host (s) | rerun tctl | "
           "rerun tasks/host | rerun changed | host PSS (MB) |", "|" + "---|" * 15]
    for r in rows:
        out.append(f"| {r['tree']} | {r['hosts']} | {r['mode']} | {r['first_s']} | {r['first_cpu_s']} | "
                   f"{r['first_tctl_calls']} | {r['first_tokens']} | {r['first_tasks_per_host']} | "
                   f"{r['rerun_s']} [{_range(r['rerun_s_samples'])}] | "
                   f"{r['rerun_cpu_s']} [{_range(r['rerun_cpu_s_samples'])}] | {r['rerun_cpu_s_per_host']} | "
                   f"{r['rerun_tctl_calls']} | {r['rerun_tasks_per_host']} | {r['rerun_changed']} | "
                   f"{r['host_pss_mb']} |")
    now = [r for r in rows if r["tree"].startswith("now")]
    base = [r for r in rows if r["tree"].startswith("baseline")]
    out.append("")
    for r in now:
        b = [x for x in base if x["hosts"] == r["hosts"]]
        if b:
            out.append(f"- {r['hosts']} host(s), {r['mode']}: rerun CPU per host {r['rerun_cpu_s_per_host']} / "
                       f"baseline {b[0]['rerun_cpu_s_per_host']} ({b[0]['mode']}) = "
                       f"{r['rerun_cpu_s_per_host'] / b[0]['rerun_cpu_s_per_host']:.3f}x (target <= 0.3x)")
    for mode in sorted({r["mode"] for r in now}):
        one = [r for r in now if r["mode"] == mode and r["hosts"] == 1]
        for r in (x for x in now if x["mode"] == mode and x["hosts"] > 1):
            if one:
                out.append(f"- {r['hosts']} hosts vs 1, {mode}: rerun wall {r['rerun_s']} / {one[0]['rerun_s']} = "
                           f"{r['rerun_s'] / one[0]['rerun_s']:.2f}x (medians; target for 24 all-at-once <= 4x)")
    return "\n".join(out)


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
    ap.add_argument("--baseline-modes", default="all",
                    help="modes the baseline runs in (its rerun costs ~30 CPU-s per host, so one mode by default)")
    ap.add_argument("--reruns", type=int, default=3,
                    help="no-change reruns per fleet; the table gives the median and the range")
    ap.add_argument("--baseline-reruns", type=int, default=1, help="the same for the baseline (slow: one by default)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "rollout.json"))
    ap.add_argument("--forks", type=int, default=25,
                    help="ansible-playbook --forks (Ansible's default of 5 would serialise 24 hosts by itself)")
    args = ap.parse_args(argv)
    os.environ["ANSIBLE_FORKS"] = str(args.forks)
    trees = [REPO] + ([] if args.no_baseline else [baseline_tree(args.baseline)])
    rows = []
    # this tree's rows first, at every size, then the baseline's: the wall-time target compares this tree's rows
    # with each other, so they run back to back (and a long baseline row cannot come between them)
    for tree in trees:
        for n in (int(s) for s in args.sizes.split(",")):
            for mode in args.modes.split(","):
                if tree != REPO and mode not in args.baseline_modes.split(","):
                    continue
                print(f"[bench] {tree.name}: rollout to {n} host(s), {mode} ...", file=sys.stderr, flush=True)
                reruns = args.reruns if tree == REPO else args.baseline_reruns
                rows.append(one_run(tree, n, mode, reruns))
                print(f"[bench] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
                out = Path(args.out)
                out.parent.mkdir(exist_ok=True)
                out.write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
