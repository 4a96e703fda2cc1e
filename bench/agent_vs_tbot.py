#!/usr/bin/env python
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""machine-id-agent against the real tbot, on the same bed and the same (guide) config.

Measures, for each program, in each listener mode:
  * start -> usable kubeconfig: wall time of ``start --oneshot`` until it exits with kubeconfig.yaml
    written and ``kubectl get pods -n demo`` through it succeeding (median of --runs runs);
  * resident memory (VmRSS) of the long-running process after --renewals renewals;
  * CPU seconds (user+sys) per renewal over those renewals.
A renewal is counted when the destination's ``tlscert`` changes. Results are ratios agent/tbot; the
table goes to stdout (markdown) and bench/results/agent_vs_tbot.json.

    python3 bench/agent_vs_tbot.py [--runs 5] [--renewals 10] [--interval 3s]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import testbed as tb  # noqa: E402
from testbed.procs import Process  # noqa: E402

ROLE = {"kind": "role", "version": "v6", "metadata": {"name": "bench-kube"},
        "spec": {"allow": {"kubernetes_labels": {"*": "*"}, "kubernetes_groups": ["bench"],
                           "kubernetes_resources": [{"kind": "pod", "namespace": "*", "name": "*"}]}}}


def agent_argv() -> list[str]:
    exe = shutil.which("machine-id-agent") or str(Path(sys.executable).parent / "machine-id-agent")
    return [exe]


def write_config(d: Path, tp, token: str, pin: str, ttl: str, interval: str) -> Path:
    (d / "storage").mkdir(parents=True, mode=0o700)
    (d / "out").mkdir(mode=0o700)
    cfg = d / "tbot.yaml"
    cfg.write_text(yaml.safe_dump({
        "auth_server": tp.proxy_addr,
        "onboarding": {"join_method": "token", "token": token, "ca_pins": [pin]},
        "storage": {"directory": str(d / "storage")},
        "destinations": [{"directory": str(d / "out"), "kubernetes_cluster": tb.KUBE_CLUSTER_NAME}],
        "certificate_ttl": ttl, "renewal_interval": interval,
    }))
    return cfg


def program_argv(name: str, bed, cfg: Path, oneshot: bool) -> list[str]:
    base = [str(bed.bins["tbot"])] if name == "tbot" else agent_argv()
    return base + ["start", "-c", str(cfg)] + (["--oneshot"] if oneshot else [])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_kib(pid: int) -> int:
    """RSS of a process plus its live descendants (the agent renews in short-lived worker processes)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_kib(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, and the reaped children's cutime, cstime (the agent's renewal workers).
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def measure(name: str, bed, mode: str, runs: int, renewals: int, interval: str, work: Path) -> dict:
    tp = bed.teleport[mode]
    pin = tp.status_ca_pin()
    env = dict(tp.env, SSL_CERT_FILE=str(tp.web_ca_path))
    starts = []
    for i in range(runs):
        d = work / f"{name}-{mode}-start-{i}"
        token = tp.bot_add(f"bench-{name}-{mode}-{i}", ["bench-kube"])
        cfg = write_config(d, tp, token, pin, "1h", "20m")
        t0 = time.monotonic()
        r = subprocess.run(program_argv(name, bed, cfg, True), capture_output=True, text=True, env=env, timeout=120,
                           check=False)
        if r.returncode != 0:
            raise SystemExit(f"{name} oneshot failed in {mode}: {r.stderr[-2000:]}")
        k = bed.kube.kubectl("get", "pods", "-n", "demo", kubeconfig=d / "out" / "kubeconfig.yaml")
        starts.append(time.monotonic() - t0)
        if k.returncode != 0:
            raise SystemExit(f"{name} kubeconfig does not work in {mode}: {k.stderr}")
    # Long-running: count renewals by tlscert changes, then read RSS and CPU.
    d = work / f"{name}-{mode}-daemon"
    token = tp.bot_add(f"bench-{name}-{mode}-daemon", ["bench-kube"])
    cfg = write_config(d, tp, token, pin, "1m", interval)
    proc = Process(f"{name}-{mode}", program_argv(name, bed, cfg, False), work / "logs", env=env)
    cert = d / "out" / "tlscert"
    seen, last, cpu0, t_first, peak = 0, None, None, None, 0
    deadline = time.monotonic() + 60 + renewals * 30
    try:
        while seen <= renewals and time.monotonic() < deadline:
            if not proc.alive():
                raise SystemExit(f"{name} exited in {mode}: {proc.log_tail()}")
            try:
                cur = cert.read_bytes()
            except OSError:
                cur = None
            if t_first is not None:
                peak = max(peak, tree_rss_kib(proc.pid))
            if cur and cur != last:
                if last is None:
                    cpu0, t_first = cpu_seconds(proc.pid), time.monotonic()
                else:
                    seen += 1
                last = cur
            time.sleep(0.1)
        if seen < renewals:
            raise SystemExit(f"{name} renewed only {seen} times in {mode}")
        rss = rss_kib(proc.pid)
        cpu = cpu_seconds(proc.pid) - cpu0
        wall = time.monotonic() - t_first
    finally:
        proc.stop()
    return {"start_median_s": statistics.median(starts), "start_runs_s": starts, "rss_kib": rss,
            "peak_tree_rss_kib": peak,
            "cpu_s_per_renewal": cpu / renewals, "renewals": renewals, "renewal_wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--renewals", type=int, default=10)
    ap.add_argument("--interval", default="3s")
    ap.add_argument("--modes", default=",".join(tb.MODES))
    args = ap.parse_args(argv)
    modes = tuple(args.modes.split(","))
    work = Path(tempfile.mkdtemp(prefix="lanyard-bench-"))
    bed = tb.Testbed.start(modes=modes)
    results: dict = {}
    try:
        for mode in modes:
            role = work / f"role-{mode}.yaml"
            role.write_text(yaml.safe_dump(ROLE))
            bed.teleport[mode].tctl("create", "-f", str(role), check=True)
            # Not --clusterrole=view: the bed has no controller-manager to aggregate view's rules.
            bed.kube.kubectl("create", "role", f"bench-{mode}", "-n", "demo", "--verb=get,list", "--resource=pods")
            bed.kube.kubectl("create", "rolebinding", f"bench-{mode}", "-n", "demo", f"--role=bench-{mode}",
                             "--group=bench", check=True)
            for name in ("tbot", "agent"):
                print(f"[bench] {name} in {mode} ...", file=sys.stderr, flush=True)
                results.setdefault(mode, {})[name] = measure(name, bed, mode, args.runs, args.renewals,
                                                             args.interval, work)
    finally:
        bed.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("| mode | metric | tbot | machine-id-agent | ratio (agent/tbot) | target |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        t, a = r["tbot"], r["agent"]
        rows = [("start → usable kubeconfig (median s)", "start_median_s", "≤ 1.0"),
                (f"RSS after {args.renewals} renewals (MiB)", "rss_kib", "≤ 0.6"),
                ("peak RSS incl. workers, sampled every 0.1 s (MiB)", "peak_tree_rss_kib", "-"),
                ("CPU per renewal (s)", "cpu_s_per_renewal", "-")]
        for label, key, target in rows:
            scale = 1024 if key.endswith("rss_kib") else 1
            print(f"| {mode} | {label} | {t[key] / scale:.3f} | {a[key] / scale:.3f} | {a[key] / t[key]:.2f} | {target} |")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "agent_vs_tbot.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
