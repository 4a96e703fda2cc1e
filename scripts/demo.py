#!/usr/bin/env python
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`make demo`: the guide, end to end, on this machine.

  up    -- start the real test bed (Teleport with TLS routing + kube-apiserver) in the background, boot
           N real systemd hosts (systemd-nspawn), run playbooks/rollout.yml against them, then, on every
           host, list the pods of namespace `demo` as the application user `app` through Teleport.
  down  -- stop the hosts and the test bed.

Everything stays up after `up` so you can look around: the inventory, the playbook log and the
commands to enter a host are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.fleet import Fleet  # noqa: E402
from hosts import Host, HostError  # noqa: E402

CACHE = Path(os.environ.get("LANYARD_CACHE", Path.home() / ".cache" / "lanyard"))
STATE = CACHE / "run" / "testbed" / "state.json"
WORK = CACHE / "run" / "demo"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _bed_views():
    state = json.loads(STATE.read_text())
    t = state["teleport"]["multiplex"]
    bins = {k: Path(v) for k, v in state["bins"].items()}
    teleport = SimpleNamespace(
        bins=bins, web_port=t["web_port"], proxy_addr=t["proxy_addr"], auth_addr=t["auth_addr"],
        web_ca_path=Path(t["web_ca_path"]), admin_identity=Path(t["admin_identity"]),
        process=SimpleNamespace(log_path=Path(t["log_path"])))
    kube = SimpleNamespace(bins=bins, admin_kubeconfig=Path(state["kube"]["admin_kubeconfig"]))
    return teleport, kube


def cmd_up(args) -> int:
    t0 = time.monotonic()
    if STATE.exists():
        _say("a test bed is already up; reusing it (make demo-down to start over)")
    else:
        _say("starting the real test bed (Teleport v13 with TLS routing, kube-apiserver, etcd)")
        r = subprocess.run([sys.executable, "-m", "testbed", "up", "--modes", "multiplex"],
                           cwd=REPO / "tests", env=dict(os.environ, PYTHONPATH=str(REPO / "tests")), check=False)
        if r.returncode != 0:
            return r.returncode
    teleport, kube = _bed_views()
    names = [f"demo-{i}" for i in range(1, args.hosts + 1)]
    fleet = Fleet(WORK, teleport=teleport, kube=kube, serial=args.serial)
    _say(f"booting {len(names)} systemd hosts: {', '.join(names)}")
    fleet.add_hosts(names)
    _say("ansible-playbook playbooks/rollout.yml (first run)")
    run = fleet.rollout(verbosity=args.verbose)
    (WORK / "rollout.log").write_text(run.stdout)
    print("\n".join(run.stdout.rstrip().splitlines()[-(len(names) + 3):]))
    if run.rc != 0:
        _say(f"rollout failed (rc {run.rc}); full log: {WORK / 'rollout.log'}")
        return 1
    ok = True
    for name in names:
        r = fleet.reader_get_pods(name)
        status = "OK" if r.returncode == 0 and "pod/demo-app" in r.stdout else "FAILED"
        ok &= status == "OK"
        _say(f"{name}: runuser -u app -- kubectl --kubeconfig /opt/machine-id/kubeconfig.yaml get pods -n demo"
             f" -> {status}: {(r.stdout or r.stderr).strip()}")
    _say(f"done in {time.monotonic() - t0:.0f}s. Inventory {WORK / 'inventory.yml'}; log {WORK / 'rollout.log'}.")
    _say("enter a host: PYTHONPATH=tests python3 -m hosts run demo-1 -- systemctl status machine-id")
    _say("stop everything: make demo-down")
    return 0 if ok else 1


def cmd_down(args) -> int:
    for state in sorted((CACHE / "hosts" / "runs").glob("demo-*/state.json")):
        try:
            Host.load(state.parent.name).stop()
            _say(f"stopped host {state.parent.name}")
        except HostError as exc:
            _say(str(exc))
    return subprocess.run([sys.executable, "-m", "testbed", "down"], cwd=REPO / "tests",
                          env=dict(os.environ, PYTHONPATH=str(REPO / "tests")), check=False).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--serial", default="1")
    up.add_argument("-v", "--verbose", action="count", default=0)
    sub.add_parser("down")
    args = ap.parse_args(argv)
    return cmd_up(args) if args.cmd == "up" else cmd_down(args)


if __name__ == "__main__":
    sys.exit(main())
