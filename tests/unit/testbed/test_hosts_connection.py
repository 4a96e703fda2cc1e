# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The test hosts' connection plugin finds the run state where the harness writes it, also under a
LANYARD_CACHE that is not the default (a cold-cache CI run had every host task fail: the plugin looked
in ~/.cache/lanyard while the hosts ran from $LANYARD_CACHE)."""

from __future__ import annotations

import importlib.util

import pytest

import hosts


def _plugin():
    path = hosts.CONNECTION_PLUGINS / "lanyard_nspawn.py"
    spec = importlib.util.spec_from_file_location("lanyard_nspawn_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("cache", [None, "/tmp/lanyard-cold-cache-example"])
def test_the_plugin_and_the_harness_agree_on_the_runs_dir(monkeypatch, cache):
    if cache is None:
        monkeypatch.delenv("LANYARD_CACHE", raising=False)
    else:
        monkeypatch.setenv("LANYARD_CACHE", cache)
    assert _plugin()._default_runs_dir() == str(hosts.runs_dir())
