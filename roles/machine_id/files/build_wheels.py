# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Controller side of the role's install phase: turn the agent's source into wheel sets, one per host target.

    build_wheels.py SOURCE_DIR BUILD_DIR [TARGET ...]

TARGET is ``PYTHON:MACHINE:GLIBC`` as the role's preflight reads it on a host, e.g. ``3.13:x86_64:2.41``
(Debian 13) or ``3.11:x86_64:2.36`` (Debian 12); without one, the controller's own is used.

1. The agent itself is pure Python: ``pip wheel --no-deps`` builds it once per source (key = hash of
   the source files) into BUILD_DIR/agent-<key>/, reproducibly (SOURCE_DATE_EPOCH) and in a copy of
   the source, so the tree gets no build/ or egg-info droppings.
2. Per target, ``pip download --only-binary=:all: --python-version X.Y --implementation cp --abi ...
   --platform manylinux_2_N_<machine> ...`` fetches the agent's dependencies as released wheels for
   that Python and platform, whatever the controller runs, into BUILD_DIR/<key>/ with the agent's
   wheel (key = hash of the source key and the target). Nothing is compiled, so any controller can
   serve any glibc host; a dependency with no wheel for the target is an error for that target.

A cached set is reused (fast, and the same bytes every time, so the host sees no change). Dependencies
come from the controller's pip (its index, cache or find-links); the hosts never need a package index.
Prints one JSON line: {"agent_wheel": ..., "python": <controller's>, "targets": {TARGET: {"dir", "key",
"wheels", "built"} or {"error": ...}}}. Exit status 1 only when the agent itself cannot be built.
"""

from __future__ import print_function

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

SKIP_DIRS = {"build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache"}
# After a build, the wheel sets in BUILD_DIR beyond the KEEP_SETS most recently used are removed (several targets
# per source), except those used in the last PRUNE_MIN_AGE seconds: each use marks the set (its directory's mtime),
# and another run on the same controller may still be copying it to its hosts (the copy follows the build within a
# batch, so the age only has to outlast one batch). KEEP_SETS is thus a floor: a day of source changes keeps every
# set it made until a build the next day.
KEEP_SETS = 10
PRUNE_MIN_AGE = 24 * 3600
TARGET_RE = re.compile(r"^(3)\.([0-9]{1,2}):([A-Za-z0-9_]+):2\.([0-9]{1,3})$")
# the oldest glibc a manylinux wheel can ask for (manylinux1 = glibc 2.5)
MANYLINUX_MIN_GLIBC_MINOR = 5
LEGACY_MANYLINUX = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
LEGACY_ARCHES = {"x86_64", "i686", "aarch64", "ppc64le", "s390x", "armv7l", "ppc64"}


def _files(src):
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info") and not d.startswith("."))
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")):
                continue
            yield os.path.join(root, name)


def source_key(src):
    """Hash of the agent's source files (not the controller's Python: the agent's wheel is pure)."""
    h = hashlib.sha256()
    for path in _files(src):
        rel = os.path.relpath(path, src)
        h.update(rel.encode() + b"\0")
        with open(path, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:16]


def set_key(src_key, target):
    return hashlib.sha256(("%s\0%s" % (src_key, target)).encode()).hexdigest()[:16]


def controller_target():
    machine = sysconfig.get_platform().split("-", 1)[-1].replace("-", "_").replace(".", "_")
    libc, version = platform.libc_ver()
    return "%d.%d:%s:%s" % (sys.version_info[0], sys.version_info[1], machine, version if libc == "glibc" else "?")


def parse_target(target):
    """``3.13:x86_64:2.41`` -> ("3.13", "x86_64", 41); ValueError with a readable reason otherwise."""
    m = TARGET_RE.match(target)
    if not m:
        raise ValueError("target %r is not PYTHON:MACHINE:GLIBC like 3.13:x86_64:2.41 (only glibc hosts have "
                         "manylinux wheels)" % target)
    return "%s.%s" % (m.group(1), m.group(2)), m.group(3), int(m.group(4))


def pip_download_args(target):
    """The pip options that select wheels for ``target`` (never the controller's own tags)."""
    py, machine, glibc_minor = parse_target(target)
    nodot = py.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", py, "--implementation", "cp",
            "--abi", "cp" + nodot, "--abi", "abi3", "--abi", "none"]
    # pip does not widen a manylinux_2_N platform to older glibc levels itself: list them all, newest first.
    for minor in range(glibc_minor, MANYLINUX_MIN_GLIBC_MINOR - 1, -1):
        args += ["--platform", "manylinux_2_%d_%s" % (minor, machine)]
        for legacy, level in LEGACY_MANYLINUX.items():
            if level == minor and machine in LEGACY_ARCHES:
                args += ["--platform", "%s_%s" % (legacy, machine)]
    return args


def prune(build_dir, keep, now=None):
    """Drop all but the KEEP_SETS most recently used complete wheel sets, never those in ``keep`` and never one
    used in the last PRUNE_MIN_AGE seconds. Each removal holds the set's lock and looks at its last use again,
    so a run that takes the set meanwhile (under the same lock, see _use) keeps it."""
    keep = {os.path.realpath(k) for k in ([keep] if isinstance(keep, str) else keep)}
    sets = []
    for d in os.listdir(build_dir):
        path = os.path.join(build_dir, d)
        try:
            if os.path.isfile(os.path.join(path, ".complete")):
                sets.append((os.path.getmtime(path), path))
        except OSError:
            continue  # removed meanwhile by another run's prune
    sets.sort(reverse=True)
    for _mtime, old in sets[KEEP_SETS:]:
        if os.path.realpath(old) in keep:
            continue
        try:
            with _Lock(build_dir, os.path.basename(old), wait=False) as lock:
                if not lock.held:
                    continue  # being built or taken right now
                if (time.time() if now is None else now) - os.path.getmtime(old) >= PRUNE_MIN_AGE:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue  # gone meanwhile, or a lock file this user may not open: leave it (a prune is only tidying)


def _use(out):
    """Mark a finished set as used now (under its lock), so that no other run's prune removes it meanwhile."""
    os.utime(out, None)


def fail(msg):
    print(json.dumps({"failed": True, "msg": msg}))
    sys.exit(1)


def _pip(args, env):
    proc = subprocess.run([sys.executable, "-m", "pip"] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=env, universal_newlines=True, check=False)
    lines = proc.stdout.strip().splitlines()
    errors = [ln.strip() for ln in lines if ln.startswith("ERROR")] or [ln.strip() for ln in lines[-3:]]
    return proc.returncode, " | ".join(errors[-3:])


class _Lock(object):
    """Serialise builds of one key between concurrent runs (each waits, then reuses the finished set).
    With ``wait=False`` the lock is only taken when free (``held`` says whether it was)."""

    def __init__(self, build_dir, key, wait=True):
        self.path = os.path.join(build_dir, ".%s.lock" % key)
        self.wait = wait
        self.held = False
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "w")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held = True
        except (IOError, OSError):
            if self.wait:
                self.fh.close()
                raise
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _publish(tmp_dir, out, key):
    with open(os.path.join(tmp_dir, ".complete"), "w") as fh:
        fh.write(key + "\n")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.rename(tmp_dir, out)


def build_agent(src, build_dir, env):
    """Return the path of the agent's pure wheel, building it when its source changed."""
    key = source_key(src)
    out = os.path.join(build_dir, "agent-" + key)
    with _Lock(build_dir, "agent-" + key):
        if not os.path.isfile(os.path.join(out, ".complete")):
            work = tempfile.mkdtemp(prefix="agent-wheel-", dir=build_dir)
            try:
                copy = os.path.join(work, "src")
                for path in _files(src):
                    dst = os.path.join(copy, os.path.relpath(path, src))
                    if not os.path.isdir(os.path.dirname(dst)):
                        os.makedirs(os.path.dirname(dst))
                    shutil.copy2(path, dst)
                wheels = os.path.join(work, "wheels")
                rc, err = _pip(["wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, copy], env)
                if rc != 0:
                    fail("building the agent's wheel failed (pip wheel %s): %s; fix the agent source or give "
                         "machine_id_agent_wheels_dir" % (src, err))
                _publish(wheels, out, key)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        _use(out)
    names = [n for n in os.listdir(out) if n.startswith("machine_id_agent-") and n.endswith(".whl")]
    if len(names) != 1 or not names[0].endswith("-py3-none-any.whl"):
        fail("agent wheel set %s holds %s, expected one pure machine_id_agent wheel; delete the directory and "
             "rerun" % (out, names or "nothing"))
    return key, os.path.join(out, names[0])


def build_target(src_key, agent_wheel, target, build_dir, env):
    """Return {"dir", "key", "wheels", "built"} for ``target``, or {"error"} when it has no wheels."""
    try:
        download = pip_download_args(target)
    except ValueError as exc:
        return {"error": str(exc)}
    key = set_key(src_key, target)
    out = os.path.join(build_dir, key)
    built = False
    with _Lock(build_dir, key):
        if not os.path.isfile(os.path.join(out, ".complete")):
            work = tempfile.mkdtemp(prefix="agent-wheels-", dir=build_dir)
            try:
                wheels = os.path.join(work, "wheels")
                rc, err = _pip(["download", "--quiet", "--dest", wheels] + download + [agent_wheel], env)
                if rc != 0:
                    return {"error": "no complete set of wheels for Python %s on %s with glibc 2.%d "
                                     "(pip download: %s)" % (parse_target(target) + (err,))}
                _publish(wheels, out, key)
                built = True
            finally:
                shutil.rmtree(work, ignore_errors=True)
        _use(out)
    names = sorted(n for n in os.listdir(out) if n.endswith(".whl"))
    if os.path.basename(agent_wheel) not in names:
        return {"error": "wheel set %s lacks %s; delete the directory and rerun" % (out, os.path.basename(agent_wheel))}
    return {"dir": out, "key": key, "wheels": names, "built": built}


def main(argv):
    if len(argv) < 2:
        fail("usage: build_wheels.py SOURCE_DIR BUILD_DIR [PYTHON:MACHINE:GLIBC ...]")
    src, build_dir = os.path.realpath(argv[0]), os.path.realpath(os.path.expanduser(argv[1]))
    targets = sorted(set(argv[2:])) or [controller_target()]
    if not os.path.isfile(os.path.join(src, "pyproject.toml")):
        fail("agent source %s has no pyproject.toml; set machine_id_agent_source to the collection's agent/ "
             "directory or machine_id_agent_wheels_dir to a directory of prebuilt wheels" % src)
    if not os.path.isdir(build_dir):
        os.makedirs(build_dir)
    env = dict(os.environ, SOURCE_DATE_EPOCH="315532800", PIP_DISABLE_PIP_VERSION_CHECK="1")
    src_key, agent_wheel = build_agent(src, build_dir, env)
    results = {t: build_target(src_key, agent_wheel, t, build_dir, env) for t in targets}
    if any(r.get("built") for r in results.values()):
        prune(build_dir, keep=[os.path.dirname(agent_wheel)] + [r["dir"] for r in results.values() if "dir" in r])
    print(json.dumps({"agent_wheel": os.path.basename(agent_wheel), "source_key": src_key, "targets": results,
                      "python": "%d.%d" % sys.version_info[:2]}))


if __name__ == "__main__":
    main(sys.argv[1:])
