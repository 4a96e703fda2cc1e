# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Controller side of the role's install phase: turn the agent's source into a set of wheels.

    build_wheels.py SOURCE_DIR BUILD_DIR

Prints one JSON line: {"dir": ..., "agent_wheel": ..., "wheels": [...], "key": ..., "built": bool}.
The wheel set lives in BUILD_DIR/<key>/, where key hashes the source files and the Python version;
an unchanged source reuses the cached set (fast, and the same bytes every time, so the host sees
no change). Builds are reproducible (SOURCE_DATE_EPOCH) and happen in a copy of the source, so the
source tree gets no build/ or egg-info droppings. Dependencies come from the controller's pip
(its cache or its index); the host itself never needs a package index.
"""

from __future__ import print_function

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

SKIP_DIRS = {"build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache"}
KEEP_SETS = 5  # older wheel sets in BUILD_DIR are removed after a build


def _files(src):
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info") and not d.startswith("."))
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")):
                continue
            yield os.path.join(root, name)


def source_key(src):
    h = hashlib.sha256()
    h.update(("%d.%d" % sys.version_info[:2]).encode())
    for path in _files(src):
        rel = os.path.relpath(path, src)
        h.update(rel.encode() + b"\0")
        with open(path, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:16]


def prune(build_dir, keep):
    """Drop all but the KEEP_SETS newest complete wheel sets (never ``keep``)."""
    sets = [os.path.join(build_dir, d) for d in os.listdir(build_dir)
            if os.path.isfile(os.path.join(build_dir, d, ".complete"))]
    sets.sort(key=os.path.getmtime, reverse=True)
    for old in sets[KEEP_SETS:]:
        if os.path.realpath(old) != os.path.realpath(keep):
            shutil.rmtree(old, ignore_errors=True)


def fail(msg):
    print(json.dumps({"failed": True, "msg": msg}))
    sys.exit(1)


def main(argv):
    if len(argv) != 2:
        fail("usage: build_wheels.py SOURCE_DIR BUILD_DIR")
    src, build_dir = os.path.realpath(argv[0]), os.path.realpath(os.path.expanduser(argv[1]))
    if not os.path.isfile(os.path.join(src, "pyproject.toml")):
        fail("agent source %s has no pyproject.toml; set machine_id_agent_source to the collection's agent/ "
             "directory or machine_id_agent_wheels_dir to a directory of prebuilt wheels" % src)
    key = source_key(src)
    out = os.path.join(build_dir, key)
    built = False
    if not os.path.isfile(os.path.join(out, ".complete")):
        os.makedirs(build_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="agent-wheels-", dir=build_dir)
        try:
            copy = os.path.join(work, "src")
            for path in _files(src):
                dst = os.path.join(copy, os.path.relpath(path, src))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(path, dst)
            wheels = os.path.join(work, "wheels")
            env = dict(os.environ, SOURCE_DATE_EPOCH="315532800", PIP_DISABLE_PIP_VERSION_CHECK="1")
            proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", wheels, copy],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                  universal_newlines=True, check=False)
            if proc.returncode != 0:
                fail("building the agent's wheels failed (pip wheel %s): %s; fix the agent source or give "
                     "machine_id_agent_wheels_dir" % (src, " | ".join(proc.stdout.strip().splitlines()[-5:])))
            with open(os.path.join(wheels, ".complete"), "w") as fh:
                fh.write(key + "\n")
            if os.path.isdir(out):
                shutil.rmtree(out)
            os.rename(wheels, out)
            built = True
        finally:
            shutil.rmtree(work, ignore_errors=True)
        prune(build_dir, keep=out)
    names = sorted(n for n in os.listdir(out) if n.endswith(".whl"))
    agent = [n for n in names if n.startswith("machine_id_agent-")]
    if len(agent) != 1:
        fail("wheel set %s holds %d machine_id_agent wheels, expected 1; delete the directory and rerun" % (out, len(agent)))
    print(json.dumps({"dir": out, "agent_wheel": agent[0], "wheels": names, "key": key, "built": built,
                      "python": "%d.%d" % sys.version_info[:2]}))


if __name__ == "__main__":
    main(sys.argv[1:])
