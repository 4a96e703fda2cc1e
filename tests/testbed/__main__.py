# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Command line for people: bring the test bed up in the background, print what to export, take it down.

  python3 -m testbed up [--modes multiplex,separate] [--state-dir DIR]
  python3 -m testbed env [--mode multiplex]       # the export lines again
  python3 -m testbed down
  python3 -m testbed build | check                 # see build.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from . import build as build_mod

DEFAULT_STATE = Path(os.environ.get("LANYARD_CACHE", Path.home() / ".cache" / "lanyard")) / "run" / "testbed"


def _print_env(state: dict, mode: str) -> None:
    for k, v in state["exports"][mode].items():
        print(f"export {k}={v!s}")


def _supervise(modes: tuple[str, ...], state_dir: Path) -> None:
    from . import Testbed

    state_file = state_dir / "state.json"
    try:
        bed = Testbed.start(modes=modes, workdir=state_dir / "bed")
    except Exception as exc:  # noqa: BLE001 - report any start failure to the waiting parent
        state_file.write_text(json.dumps({"error": str(exc)}))
        return
    stop = {"now": False}

    def _handler(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    state = {
        "pid": os.getpid(), "modes": list(modes), "workdir": str(bed.workdir), "timings": bed.timings,
        "exports": {m: bed.exports(m) for m in modes},
        "teleport": {m: {"web_port": t.web_port, "proxy_addr": t.proxy_addr, "auth_addr": t.auth_addr,
                         "web_ca_path": str(t.web_ca_path), "admin_identity": str(t.admin_identity),
                         "config_path": str(t.config_path), "log_path": str(t.process.log_path)}
                     for m, t in bed.teleport.items()},
        "kube": {"admin_kubeconfig": str(bed.kube.admin_kubeconfig), "server": bed.kube.server},
        "bins": {k: str(v) for k, v in bed.bins.items()},
    }
    state_file.write_text(json.dumps(state, indent=2))
    while not stop["now"]:
        time.sleep(0.5)
    bed.stop(keep_workdir=True)
    state_file.unlink(missing_ok=True)


def cmd_up(args) -> int:
    state_dir = Path(args.state_dir)
    state_file = state_dir / "state.json"
    if state_file.exists():
        print(f"test bed already up (state {state_file}); run: make testbed-down", file=sys.stderr)
        return 1
    try:
        build_mod.ensure_all()
    except build_mod.BuildError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    modes = tuple(m for m in args.modes.split(",") if m)
    if state_dir.joinpath("bed").exists():
        import shutil
        shutil.rmtree(state_dir / "bed")
    state_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # supervisor: detach from the terminal, keep the bed alive until `down`
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        try:
            _supervise(modes, state_dir)
        finally:
            os._exit(0)
    while not state_file.exists():
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            print("ERROR: test bed supervisor exited during start", file=sys.stderr)
            return 1
        time.sleep(0.3)
    state = json.loads(state_file.read_text())
    if "error" in state:
        state_file.unlink()
        print(f"ERROR: test bed failed to start: {state['error']}", file=sys.stderr)
        return 1
    print(f"# test bed up in {time.monotonic() - t0:.1f}s (supervisor pid {state['pid']}, state {state_dir})")
    for mode in modes:
        print(f"# --- Teleport listener mode {mode}: paste these lines to use it ---")
        _print_env(state, mode)
    print("# stop it with: make testbed-down")
    return 0


def cmd_env(args) -> int:
    state_file = Path(args.state_dir) / "state.json"
    if not state_file.exists():
        print("test bed is not up; run: make testbed-up", file=sys.stderr)
        return 1
    state = json.loads(state_file.read_text())
    _print_env(state, args.mode or state["modes"][0])
    return 0


def cmd_down(args) -> int:
    state_file = Path(args.state_dir) / "state.json"
    if not state_file.exists():
        print("test bed is not up")
        return 0
    pid = json.loads(state_file.read_text()).get("pid")
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, TypeError):
        state_file.unlink(missing_ok=True)
        print("test bed supervisor was already gone")
        return 0
    for _attempt in range(100):
        if not state_file.exists():
            break
        time.sleep(0.2)
    print("test bed stopped")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m testbed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", default=str(DEFAULT_STATE))
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--modes", default="multiplex,separate")
    env = sub.add_parser("env")
    env.add_argument("--mode")
    sub.add_parser("down")
    sub.add_parser("build")
    sub.add_parser("check")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        return build_mod.main([])
    if args.cmd == "check":
        return build_mod.main(["--check"])
    return {"up": cmd_up, "env": cmd_env, "down": cmd_down}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
