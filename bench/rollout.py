#!/usr/bin/env python
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""playbooks/rollout.yml: wall time of the first rollout and of the no-change rerun, and control-plane
calls (tctl invocations, counted by a wrapper) per run, for fleets of 1, 3 and 6 real systemd hosts.

    python3 bench/rollout.py [--sizes 1,3,6] [--serial 100%]

Each size gets a fresh bed (TLS routing) and fresh hosts. The table goes to stdout (markdown) and
bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import testbed as tb  # noqa: E402
from helpers.fleet import Fleet, changed_by_host  # noqa: E402


def one_size(n: int, serial: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"lanyard-bench-rollout-{n}-"))
    bed = tb.Testbed.start(modes=("multiplex",))
    fleet = Fleet(work, teleport=bed.teleport["multiplex"], kube=bed.kube, serial=serial)
    try:
        fleet.add_hosts([f"bench-{i}" for i in range(1, n + 1)])
        row = {"hosts": n}
        for label in ("first", "rerun"):
            calls0, tokens0 = fleet.tctl_calls(), fleet.token_creations()
            t0 = time.monotonic()
            run = fleet.rollout()
            row[f"{label}_s"] = round(time.monotonic() - t0, 1)
            if run.rc != 0:
                raise SystemExit(f"rollout ({label}, {n} hosts) failed:\n{run.stdout[-4000:]}")
            row[f"{label}_tctl_calls"] = fleet.tctl_calls() - calls0
            row[f"{label}_tokens"] = fleet.token_creations() - tokens0
            row[f"{label}_changed"] = sum(changed_by_host(run).values())
        return row
    finally:
        fleet.stop()
        bed.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,3,6")
    ap.add_argument("--serial", default="100%")
    args = ap.parse_args(argv)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"[bench] rollout to {n} host(s) ...", file=sys.stderr, flush=True)
        rows.append(one_size(n, args.serial))
    print("| hosts | first rollout (s) | tctl calls | tokens | no-change rerun (s) | tctl calls | tokens | changed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hosts']} | {r['first_s']} | {r['first_tctl_calls']} | {r['first_tokens']} | {r['rerun_s']} | "
              f"{r['rerun_tctl_calls']} | {r['rerun_tokens']} | {r['rerun_changed']} |")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "rollout.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
