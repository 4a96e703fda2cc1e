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

    python3 bench/agent_vs_tbot.py [--runs 5] [--renewals 10] [--interval 3s] [--agent LABEL=DIR ...]

``--agent LABEL=DIR`` (repeatable) measures the agent from another source tree, e.g. a ``git worktree`` of an
older commit (``git worktree add --detach /tmp/old b567b8e`` then ``--agent old=/tmp/old/agent --agent
now=agent``): each is run by a console script made from its own pyproject's entry point, with
``PYTHONPATH=DIR/src``, byte-compiled first as an install is. The start runs interleave
every program (tbot, then each agent, run after run), so a drift of the machine hits all of them alike; the
table then gains one ratio per agent and, with two or more, a row comparing each agent's start with the first.
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


SCRIPTS: dict[str, Path] = {}  # agent label -> its console script (main)


def console_script(src: Path, bindir: Path) -> Path:
    """``bindir/machine-id-agent``: the console script an install of ``src`` gets (its pyproject's entry point),
    run by this interpreter. The agent's kubeconfig names it as the exec plugin (the program it was started as)."""
    import tomllib
    entry = tomllib.loads((src.parent / "pyproject.toml").read_text())["project"]["scripts"]["machine-id-agent"]
    module, func = entry.split(":")
    bindir.mkdir(parents=True)
    script = bindir / "machine-id-agent"
    script.write_text(f"#!{sys.executable}\nimport sys\n\nfrom {module} import {func}\n\nsys.exit({func}())\n")
    script.chmod(0o755)
    return script


def parse_agents(specs: list[str]) -> dict[str, Path]:
    """``LABEL=DIR`` pairs; DIR is an agent source tree (``DIR/src/machine_id_agent``)."""
    agents: dict[str, Path] = {}
    for spec in specs or [f"agent={REPO / 'agent'}"]:
        label, sep, d = spec.partition("=")
        src = Path(d).resolve() / "src"
        if not sep or not label or label == "tbot" or label in agents:
            raise SystemExit(f"--agent {spec!r}: expected a new LABEL=DIR (LABEL not 'tbot', each LABEL once)")
        if not (src / "machine_id_agent" / "__init__.py").is_file():
            raise SystemExit(f"--agent {spec!r}: {src}/machine_id_agent is not an agent source tree")
        agents[label] = src
    return agents


def compile_source(src: Path) -> None:
    """Byte-compile an agent source tree, as pip does when it installs the wheel: a host runs the agent from
    ``.pyc`` files, and an uncompiled tree would charge every start (and every exec-plugin call) the compile."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], check=True, capture_output=True)


def source_commit(src: Path) -> str:
    r = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       check=False)
    return r.stdout.strip() or "unknown"


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
    base = [str(bed.bins["tbot"])] if name == "tbot" else [str(SCRIPTS[name])]
    return base + ["start", "-c", str(cfg)] + (["--oneshot"] if oneshot else [])


def program_env(name: str, base: dict, agents: dict[str, Path]) -> dict:
    return dict(base) if name == "tbot" else dict(base, PYTHONPATH=str(agents[name]))


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


def measure_start(name: str, bed, mode: str, i: int, env: dict, work: Path) -> tuple[float, float]:
    """One ``start --oneshot`` of a fresh bot until ``kubectl get pods`` works through its kubeconfig: the whole
    time and the ``kubectl`` call's share (with an exec-plugin kubeconfig, kubectl runs the program again)."""
    tp = bed.teleport[mode]
    d = work / f"{name}-{mode}-start-{i}"
    token = tp.bot_add(f"bench-{name}-{mode}-{i}", ["bench-kube"])
    cfg = write_config(d, tp, token, tp.status_ca_pin(), "1h", "20m")
    t0 = time.monotonic()
    r = subprocess.run(program_argv(name, bed, cfg, True), capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    if r.returncode != 0:
        raise SystemExit(f"{name} oneshot failed in {mode}: {r.stderr[-2000:]}")
    t1 = time.monotonic()
    # the program's environment: an exec plugin (the agent's console script) must import the same source
    k = subprocess.run([str(bed.kube.bins["kubectl"]), f"--kubeconfig={d / 'out' / 'kubeconfig.yaml'}", "get", "pods",
                        "-n", "demo"], capture_output=True, text=True, env=env, timeout=60, check=False)
    t2 = time.monotonic()
    if k.returncode != 0:
        raise SystemExit(f"{name} kubeconfig does not work in {mode}: {k.stderr}")
    return t2 - t0, t2 - t1


def measure_daemon(name: str, bed, mode: str, renewals: int, interval: str, env: dict, work: Path) -> dict:
    """Long-running: count renewals by tlscert changes, then read RSS and CPU."""
    tp = bed.teleport[mode]
    d = work / f"{name}-{mode}-daemon"
    token = tp.bot_add(f"bench-{name}-{mode}-daemon", ["bench-kube"])
    cfg = write_config(d, tp, token, tp.status_ca_pin(), "1m", interval)
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
    return {"rss_kib": rss, "peak_tree_rss_kib": peak, "cpu_s_per_renewal": cpu / renewals, "renewals": renewals,
            "renewal_wall_s": wall}


def measure_mode(bed, mode: str, names: list[str], agents: dict[str, Path], args, work: Path) -> dict:
    tp = bed.teleport[mode]
    base = dict(tp.env, SSL_CERT_FILE=str(tp.web_ca_path))
    envs = {n: program_env(n, base, agents) for n in names}
    starts: dict[str, list[float]] = {n: [] for n in names}
    kubectl: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.runs):  # interleaved: every program once per round
        for n in names:
            whole, k = measure_start(n, bed, mode, i, envs[n], work)
            starts[n].append(whole)
            kubectl[n].append(k)
    out = {}
    for n in names:
        print(f"[bench] {n} in {mode}: renewals ...", file=sys.stderr, flush=True)
        out[n] = dict(measure_daemon(n, bed, mode, args.renewals, args.interval, envs[n], work),
                      start_median_s=statistics.median(starts[n]), start_runs_s=starts[n],
                      kubectl_median_s=statistics.median(kubectl[n]), kubectl_runs_s=kubectl[n])
        if n != "tbot":
            out[n]["source"] = str(agents[n].parent)
            out[n]["commit"] = source_commit(agents[n])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--renewals", type=int, default=10)
    ap.add_argument("--interval", default="3s")
    ap.add_argument("--modes", default=",".join(tb.MODES))
    ap.add_argument("--agent", action="append", default=[], metavar="LABEL=DIR",
                    help="an agent source tree to measure (repeatable); default: this tree's agent/")
    args = ap.parse_args(argv)
    agents = parse_agents(args.agent)
    work = Path(tempfile.mkdtemp(prefix="lanyard-bench-"))
    for label, src in agents.items():
        compile_source(src)
        SCRIPTS[label] = console_script(src, work / f"bin-{label}")
    names = ["tbot", *agents]
    modes = tuple(args.modes.split(","))
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
            print(f"[bench] {mode}: {args.runs} interleaved start runs of {', '.join(names)} ...", file=sys.stderr,
                  flush=True)
            results[mode] = measure_mode(bed, mode, names, agents, args, work)
    finally:
        bed.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(render(results, list(agents), args.renewals))
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "agent_vs_tbot.json").write_text(json.dumps(results, indent=2))
    return 0


def render(results: dict, labels: list[str], renewals: int) -> str:
    rows = [("start → usable kubeconfig (median s)", "start_median_s", "≤ 1.0"),
            ("of which the kubectl call (median s)", "kubectl_median_s", "-"),
            (f"RSS after {renewals} renewals (MiB)", "rss_kib", "≤ 0.6"),
            ("peak RSS incl. workers, sampled every 0.1 s (MiB)", "peak_tree_rss_kib", "-"),
            ("CPU per renewal (s)", "cpu_s_per_renewal", "-")]
    lines = ["| mode | metric | tbot | " + " | ".join(labels) + " | " +
             " | ".join(f"{lb} / tbot" for lb in labels) + " | target |",
             "|---" * (4 + 2 * len(labels)) + "|"]
    for mode, r in results.items():
        t = r["tbot"]
        for label, key, target in rows:
            scale = 1024 if key.endswith("rss_kib") else 1
            vals = " | ".join(f"{r[lb][key] / scale:.3f}" for lb in labels)
            ratios = " | ".join(f"{r[lb][key] / t[key]:.2f}" for lb in labels)
            lines.append(f"| {mode} | {label} | {t[key] / scale:.3f} | {vals} | {ratios} | {target} |")
    for mode, r in results.items():  # A/B: every agent's start runs against the first agent's
        first = labels[0]
        for lb in labels[1:]:
            a, b = r[first]["start_runs_s"], r[lb]["start_runs_s"]
            lines.append(f"\n{mode}: start of {lb} / {first} = {statistics.median(b) / statistics.median(a):.2f} "
                         f"(runs {first} {min(a):.2f}-{max(a):.2f} s, {lb} {min(b):.2f}-{max(b):.2f} s; "
                         f"tbot {min(r['tbot']['start_runs_s']):.2f}-{max(r['tbot']['start_runs_s']):.2f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
