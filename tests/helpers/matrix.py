# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller matrix: one venv per ansible-core minor that ``meta/runtime.yml`` allows, besides the project venv.

Each venv lives in ``$LANYARD_CACHE/matrix/core-<version>-<python>-<hash>`` and is built on first use (about 30 s
each with pip's cache warm) from the machine's pyenv Python of that minor. The project venv (requirements-test.txt)
is the 2.19 entry. The pins below are what CI runs; README's tested-versions table names the same.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

# ansible-core minor -> (exact version, Python minor). 2.20 and later need Python >= 3.12.
MATRIX = {
    "2.16": ("2.16.19", "3.11"),
    "2.17": ("2.17.14", "3.11"),
    "2.18": ("2.18.19", "3.11"),
    "2.20": ("2.20.10", "3.12"),
    "2.21": ("2.21.5", "3.13"),
}
MAIN = "2.19"  # the project venv (requirements-test.txt pins ansible-core 2.19.14)
OLDEST, NEWEST = "2.16", "2.21"

REPO = Path(__file__).resolve().parents[2]
# What the unit tests and the controller side of the rollout import, at the project's pins (requirements-test.txt).
NAMES = ("pytest", "pytest-timeout", "requests", "cryptography", "PyYAML", "Jinja2", "h2", "protobuf", "grpcio")


def _pins() -> list:
    pins = {}
    for line in (REPO / "requirements-test.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            pins[line.split("==", 1)[0].strip()] = line
    missing = [n for n in NAMES if n not in pins]
    if missing:
        raise MatrixError(f"requirements-test.txt pins no {', '.join(missing)}; the controller matrix needs them")
    return [pins[n] for n in NAMES]


class MatrixError(Exception):
    pass


PACKAGES = _pins()


def cache() -> Path:
    return Path(os.environ.get("LANYARD_CACHE", Path.home() / ".cache" / "lanyard")) / "matrix"


def pyenv_python(minor: str) -> Path:
    """The newest ``~/.pyenv/versions/<minor>.*/bin/python<minor>``."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted((p for p in root.glob(f"{minor}.*") if (p / "bin" / f"python{minor}").exists()),
                   key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()))
    if not found:
        raise MatrixError(f"no Python {minor} under {root} for the controller matrix. Fix: `pyenv install {minor}` "
                          f"(or set PYENV_ROOT to where it is)")
    return found[-1] / "bin" / f"python{minor}"


def venv(minor: str) -> Path:
    """The bin directory of the venv for ansible-core ``minor``, built when missing."""
    version, py_minor = MATRIX[minor]
    key = hashlib.sha256("\n".join([version, py_minor] + PACKAGES).encode()).hexdigest()[:10]
    path = cache() / f"core-{version}-py{py_minor}-{key}"
    done = path / ".complete"
    if done.exists():
        return path / "bin"
    python = pyenv_python(py_minor)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One builder per venv (several test workers may ask at once); the others wait and take its venv.
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _build(path, python, version)
    return path / "bin"


def _build(path: Path, python: Path, version: str) -> None:
    done = path / ".complete"
    shutil.rmtree(path, ignore_errors=True)
    for argv in ([str(python), "-m", "venv", str(path)],
                 [str(path / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                  f"ansible-core=={version}"] + PACKAGES):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            raise MatrixError(f"building the ansible-core {version} venv failed: {' '.join(argv[:4])}...: "
                              f"{(proc.stdout + proc.stderr)[-2000:]}")
    done.write_text(version + "\n")


def venv_or_fail(minor: str) -> Path:
    """:func:`venv` for a test: a venv that cannot be built fails the test with the reason and the fix."""
    import pytest
    try:
        return venv(minor)
    except MatrixError as exc:
        pytest.fail(str(exc), pytrace=False)
