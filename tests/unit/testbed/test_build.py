# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Binary lookup order of the test bed: $LANYARD_TESTBED_BIN, then the versioned cache."""

from __future__ import annotations

import os
from pathlib import Path

from testbed import build


def _fake_bins(d: Path, names) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        p = d / n
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)


def test_versions_file_pins_everything():
    v = build.load_versions()
    for key in ("TELEPORT_VERSION", "TELEPORT_MODULE_VERSION", "TELEPORT_MODULE_SUM", "KUBERNETES_VERSION",
                "KUBERNETES_STAGING_VERSION"):
        assert v.get(key), key
    assert v["TELEPORT_MODULE_VERSION"].endswith(v["TELEPORT_MODULE_VERSION"].rsplit("-", 1)[1])


def test_cache_key_changes_with_any_version():
    v = build.load_versions()
    bumped = dict(v, KUBERNETES_VERSION="v1.99.0")
    assert build.cache_key(v) != build.cache_key(bumped)
    assert build.cache_key(v) == build.cache_key(dict(v))


def test_explicit_dir_wins_over_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LANYARD_CACHE", str(tmp_path / "cache"))
    cached = build.cached_bin_dir()
    _fake_bins(cached, build.ALL_BINARIES)
    explicit = tmp_path / "mine"
    _fake_bins(explicit, ["tctl"])
    monkeypatch.setenv("LANYARD_TESTBED_BIN", str(explicit))
    found = build.find_binaries()
    assert found["tctl"] == explicit / "tctl"
    assert found["teleport"] == cached / "teleport"


def test_missing_binaries_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LANYARD_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("LANYARD_TESTBED_BIN", raising=False)
    found = build.find_binaries()
    assert all(v is None for v in found.values())
    msg = build.missing_message(list(found))
    assert "make testbed-build" in msg and str(tmp_path / "empty") in msg


def test_check_exits_nonzero_and_prints_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LANYARD_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("LANYARD_TESTBED_BIN", raising=False)
    assert build.main(["--check"]) == 1
    assert "Fix: make testbed-build" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "empty" / "testbed")
