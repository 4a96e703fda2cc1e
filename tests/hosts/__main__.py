# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""CLI for the test hosts (used by molecule's create.yml/destroy.yml)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import Host, HostError, build, stop_all
from .image import DEFAULT_RELEASE, RELEASES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hosts")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the cached Debian image of a release (no-op when cached)")
    b.add_argument("--force", action="store_true")
    b.add_argument("--release", default=DEFAULT_RELEASE, choices=sorted(RELEASES))
    s = sub.add_parser("start", help="boot a fresh host")
    s.add_argument("name")
    s.add_argument("--forward", type=int, action="append", default=[], help="controller loopback port to forward")
    s.add_argument("--timeout", type=float, default=90)
    s.add_argument("--release", default=DEFAULT_RELEASE, choices=sorted(RELEASES),
                   help="Debian release of the host (bookworm = 12, trixie = 13)")
    t = sub.add_parser("stop", help="power a host off and delete its copy")
    t.add_argument("name")
    sub.add_parser("stop-all", help="stop every host of this harness")
    r = sub.add_parser("run", help="run a command inside a host")
    r.add_argument("name")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    try:
        if a.cmd == "build":
            t0 = time.monotonic()
            path = build(force=a.force, release=a.release)
            print(json.dumps({"rootfs": str(path), "seconds": round(time.monotonic() - t0, 1)}))
        elif a.cmd == "start":
            h = Host.start(a.name, a.forward, timeout=a.timeout, release=a.release)
            print(json.dumps({"name": h.name, "release": h.release, "leader_pid": h.leader_pid, "timings": h.timings}))
        elif a.cmd == "stop":
            try:
                h = Host.load(a.name)
            except HostError:
                print(json.dumps({"name": a.name, "stopped": False}))
                return 0
            h.stop()
            print(json.dumps({"name": a.name, "stopped": True}))
        elif a.cmd == "stop-all":
            print(json.dumps({"stopped": stop_all()}))
        elif a.cmd == "run":
            cmd = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
            proc = Host.load(a.name).run(cmd, check=False)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            return proc.returncode
    except HostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
