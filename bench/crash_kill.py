#!/usr/bin/env python
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Whole-service SIGKILL at random moments after a forced renewal (issue 11 point 3): loss and lock rates.

    python3 bench/crash_kill.py [--kills 200] [--max-delay 1.0] [--agent-source DIR] [--label NAME]

One fresh bed (TLS routing) and one real systemd host rolled out by playbooks/rollout.yml with the role's
defaults; ``--agent-source`` installs another agent source through the role (e.g. a ``git worktree`` of an
older commit: ``git worktree add /tmp/base 648c7e0`` then ``--agent-source /tmp/base/agent``). Each round:
``systemctl kill -s USR1 machine-id``, a delay U(0, max-delay), ``systemctl kill -s KILL machine-id``, restart;
then Teleport's generation label (tctl) is compared with the identity on the host's disk (a counted renewal
that never reached the disk is a loss) and locks are looked up; a lost or locked host is re-enrolled and the
run goes on. The agent's own log gives the renewal timings (this version logs round trip, answer to disk and
answer to fsync). Result: one JSON line on stdout and bench/results/crash_kill-<label>.json.
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
from helpers.crash import CrashFleet, CrashRig  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--max-delay", type=float, default=1.0)
    ap.add_argument("--agent-source", default="")
    ap.add_argument("--label", default="current")
    ap.add_argument("--host", default="h3-bench-crash")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lanyard-bench-crash-"))
    bed = tb.Testbed.start(modes=("multiplex",))
    fleet = CrashFleet(work, teleport=bed.teleport["multiplex"], kube=bed.kube, bot_name="h3bench")
    if args.agent_source:
        fleet.extra_vars = {"machine_id_agent_source": str(Path(args.agent_source).resolve())}
    try:
        fleet.add_hosts([args.host])
        run = fleet.rollout()
        if run.rc != 0:
            raise SystemExit(f"rollout failed:\n{run.stdout[-4000:]}")
        rig = CrashRig(fleet, args.host)
        t0 = time.monotonic()
        partial = REPO / "bench" / "results" / f"crash_kill-{args.label}.partial.json"
        partial.parent.mkdir(parents=True, exist_ok=True)
        stats = rig.kill_run(args.kills, args.max_delay, seed=args.seed,
                             log=lambda m: print(m, file=sys.stderr, flush=True), progress=str(partial))
        doc = {"label": args.label, "agent_source": args.agent_source or "agent/", "max_delay_s": args.max_delay,
               "wall_s": round(time.monotonic() - t0, 1), **stats.summary(), "events": stats.events}
        out = REPO / "bench" / "results" / f"crash_kill-{args.label}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps({k: v for k, v in doc.items() if k != "events"}))
        return 0
    finally:
        fleet.stop()
        bed.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
