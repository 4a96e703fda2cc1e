#!/usr/bin/env python
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Find or build the real binaries of the test bed.

Lookup order (first hit wins, per binary):
  1. ``$LANYARD_TESTBED_BIN`` -- a directory that holds the binaries;
  2. the cache ``$LANYARD_CACHE/testbed/<key>/bin`` (default ``~/.cache/lanyard``), where <key> is
     derived from ``versions.env`` so a version bump never reuses stale binaries;
  3. a build with the ordinary ``go`` client from the Go module proxy (nothing is committed: the
     sources live under the cache directory).

Usage:
  python3 tests/testbed/build.py            # ensure every binary, build what is missing
  python3 tests/testbed/build.py --check    # only report; exit 1 and print the fix if missing
  python3 tests/testbed/build.py --print-bin-dir
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSIONS_FILE = HERE / "versions.env"

TELEPORT_BINARIES = ("teleport", "tctl", "tbot")
KUBERNETES_BINARIES = ("kube-apiserver", "kubectl")
ALL_BINARIES = TELEPORT_BINARIES + KUBERNETES_BINARIES + ("etcd",)

FIX_COMMAND = "make testbed-build   # or: python3 tests/testbed/build.py"


class BuildError(Exception):
    """A binary could not be found or built; the message says what to do."""


def load_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _sep, value = line.partition("=")
        versions[key.strip()] = value.strip()
    return versions


def cache_root() -> Path:
    return Path(os.environ.get("LANYARD_CACHE", Path.home() / ".cache" / "lanyard"))


def cache_key(versions: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:10]
    return f"teleport-{versions['TELEPORT_VERSION']}_k8s-{versions['KUBERNETES_VERSION']}_{digest}"


def cached_bin_dir(versions: dict[str, str] | None = None) -> Path:
    versions = versions or load_versions()
    return cache_root() / "testbed" / cache_key(versions) / "bin"


def _log(msg: str) -> None:
    print(f"[testbed-build] {msg}", file=sys.stderr, flush=True)


def _go_env(toolchain: str) -> dict[str, str]:
    root = cache_root() / "go"
    env = dict(os.environ)
    env.update(
        GOMODCACHE=str(root / "mod"),
        GOCACHE=str(root / "build"),
        GOPATH=str(root / "path"),
        GOTOOLCHAIN=toolchain,
        GOFLAGS="-mod=mod -buildvcs=false",
        GOWORK="off",  # k8s.io/kubernetes ships a go.work naming staging dirs the zip lacks
        # The teleport modules are fetched under v0.0.0- pseudo-versions that the checksum
        # database does not list; their hash is pinned in versions.env and checked below.
        GONOSUMDB="github.com/gravitational/teleport",
        GOPROXY=os.environ.get("GOPROXY", "https://proxy.golang.org"),
    )
    return env


def _run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    _log("$ " + " ".join(argv))
    proc = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(argv)}")
    return proc.stdout


def _module(path: str, version: str, env: dict[str, str]) -> dict:
    out = _run(["go", "mod", "download", "-json", f"{path}@{version}"], env)
    info = json.loads(out)
    if info.get("Error"):
        raise BuildError(f"go mod download {path}@{version}: {info['Error']}")
    return info


def _fresh_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(dst):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o200)
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o200)


def build_teleport(versions: dict[str, str], bin_dir: Path) -> None:
    env = _go_env(versions["TELEPORT_GO_TOOLCHAIN"])
    env["CGO_ENABLED"] = "1"  # sqlite backend (mattn/go-sqlite3)
    mv = versions["TELEPORT_MODULE_VERSION"]
    main = _module("github.com/gravitational/teleport", mv, env)
    if main["Sum"] != versions["TELEPORT_MODULE_SUM"]:
        raise BuildError(
            f"teleport module hash {main['Sum']} != pinned {versions['TELEPORT_MODULE_SUM']}"
        )
    _module("github.com/gravitational/teleport/api", mv, env)
    src = bin_dir.parent / "src" / "teleport"
    _fresh_copy(Path(main["Dir"]), src)
    # The api module is not in the main module's zip: point the local replace at the same commit.
    _run(["go", "mod", "edit", "-replace",
          f"github.com/gravitational/teleport/api=github.com/gravitational/teleport/api@{mv}"], env, src)
    # The web UI is not in the zip either; the proxy refuses to start without an index.html,
    # so embed the bare page (the UI is blank, /webapi/* works).
    (src / "webassets" / "teleport" / "app").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "web" / "packages" / "teleport" / "index.html", src / "webassets" / "teleport" / "index.html")
    _run(["go", "mod", "download"], env, src)
    bin_dir.mkdir(parents=True, exist_ok=True)
    _run(["go", "build", "-trimpath", "-ldflags=-s -w", "-tags", "webassets_embed",
          "-o", str(bin_dir) + "/", "./tool/teleport", "./tool/tctl", "./tool/tbot"], env, src)


def build_kubernetes(versions: dict[str, str], bin_dir: Path) -> None:
    env = _go_env(versions["KUBERNETES_GO_TOOLCHAIN"])
    env["CGO_ENABLED"] = "0"
    kv, sv = versions["KUBERNETES_VERSION"], versions["KUBERNETES_STAGING_VERSION"]
    main = _module("k8s.io/kubernetes", kv, env)
    src = bin_dir.parent / "src" / "kubernetes"
    _fresh_copy(Path(main["Dir"]), src)
    mod = json.loads(_run(["go", "mod", "edit", "-json"], env, src))
    edits = [
        f"-replace={r['Old']['Path']}={r['Old']['Path']}@{sv}"
        for r in mod.get("Replace") or []
        if r["New"]["Path"].startswith("./staging/")
    ]
    _run(["go", "mod", "edit", *edits], env, src)
    _run(["go", "mod", "download"], env, src)
    major, minor = kv.lstrip("v").split(".")[:2]
    ld = (f"-s -w -X k8s.io/component-base/version.gitVersion={kv}"
          f" -X k8s.io/component-base/version.gitMajor={major}"
          f" -X k8s.io/component-base/version.gitMinor={minor}"
          f" -X k8s.io/client-go/pkg/version.gitVersion={kv}")
    bin_dir.mkdir(parents=True, exist_ok=True)
    _run(["go", "build", "-trimpath", f"-ldflags={ld}", "-o", str(bin_dir) + "/",
          "./cmd/kube-apiserver", "./cmd/kubectl"], env, src)


def ensure_etcd(bin_dir: Path) -> None:
    target = bin_dir / "etcd"
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if not found:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise BuildError("etcd is missing: apt-get install etcd-server (as root)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "etcd-server"], env)
        found = "/usr/bin/etcd"
    bin_dir.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(found)


def find_binaries() -> dict[str, Path | None]:
    """Resolve each binary by the documented lookup order, without building."""
    explicit = os.environ.get("LANYARD_TESTBED_BIN")
    cached = cached_bin_dir()
    found: dict[str, Path | None] = {}
    for name in ALL_BINARIES:
        found[name] = None
        for d in ([Path(explicit)] if explicit else []) + [cached]:
            p = d / name
            if p.exists() and os.access(p, os.X_OK):
                found[name] = p
                break
    return found


def missing_message(missing: list[str]) -> str:
    return (f"test bed binaries missing: {', '.join(missing)} (looked in $LANYARD_TESTBED_BIN and "
            f"{cached_bin_dir()}).\nFix: {FIX_COMMAND}")


def ensure_all(force: bool = False, only: str | None = None) -> dict[str, Path]:
    """Find every binary; build what is missing. Teleport and Kubernetes build at the same time:
    their module downloads and compiles overlap, which is measurably faster on 2 cores than in turn."""
    versions = load_versions()
    bin_dir = cached_bin_dir(versions)
    # One build at a time per cache (the CI lanes, several checkouts): a second builder waits, then finds the
    # binaries the first one made. A build in the same tree at the same time would delete the other's sources.
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(bin_dir.parent / "build.lock", "w") as lock:
        if not force and any(v is None for v in find_binaries().values()):
            _log(f"waiting for any other build of {bin_dir.parent.name} to finish")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_all_locked(versions, bin_dir, force, only)


def _ensure_all_locked(versions: dict[str, str], bin_dir: Path, force: bool, only: str | None) -> dict[str, Path]:
    found = {} if force else find_binaries()
    t0 = time.monotonic()
    jobs = {}
    if only in (None, "teleport") and (force or any(found.get(b) is None for b in TELEPORT_BINARIES)):
        _log(f"building Teleport {versions['TELEPORT_VERSION']} into {bin_dir} (cold: ~11 min on 2 cores)")
        jobs["teleport"] = build_teleport
    if only in (None, "kubernetes") and (force or any(found.get(b) is None for b in KUBERNETES_BINARIES)):
        _log(f"building Kubernetes {versions['KUBERNETES_VERSION']} into {bin_dir} (cold: ~8 min on 2 cores)")
        jobs["kubernetes"] = build_kubernetes
    if only in (None, "etcd") and (force or found.get("etcd") is None):
        ensure_etcd(bin_dir)
    if jobs:
        import concurrent.futures

        built, errors = [], []
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            started = {name: time.monotonic() for name in jobs}
            futures = {pool.submit(fn, versions, bin_dir): name for name, fn in jobs.items()}
            for fut in concurrent.futures.as_completed(futures):
                name = futures[fut]
                try:
                    fut.result()
                    built.append(f"{name} {time.monotonic() - started[name]:.0f}s")
                    _log(f"{name} built in {time.monotonic() - started[name]:.0f}s")
                except BuildError as exc:
                    errors.append(f"{name}: {exc}")
        if errors:
            raise BuildError("; ".join(errors) + f"\nFix: look at the output above, then {FIX_COMMAND}")
        _log(f"build finished in {time.monotonic() - t0:.0f}s ({', '.join(built)})")
    result = find_binaries()
    if only:
        return {k: v for k, v in result.items() if v is not None}
    missing = [k for k, v in result.items() if v is None]
    if missing:
        raise BuildError(missing_message(missing))
    return {k: v for k, v in result.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="report only; exit 1 if anything is missing")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--print-bin-dir", action="store_true")
    ap.add_argument("--only", choices=("teleport", "kubernetes", "etcd"), help="ensure one component")
    args = ap.parse_args(argv)
    if args.print_bin_dir:
        print(cached_bin_dir())
        return 0
    try:
        if args.check:
            found = find_binaries()
            missing = [k for k, v in found.items() if v is None]
            for k, v in found.items():
                print(f"{k:15} {v or 'MISSING'}")
            if missing:
                print(missing_message(missing), file=sys.stderr)
                return 1
            return 0
        for k, v in ensure_all(force=args.force, only=args.only).items():
            print(f"{k:15} {v}")
        return 0
    except BuildError as exc:
        print(f"[testbed-build] ERROR: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
