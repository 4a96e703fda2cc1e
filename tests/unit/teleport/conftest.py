# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit-test helpers for the teleport_* modules: a scripted tctl and a module runner.

``FakeTctl`` answers tctl calls from a table of (argument prefix -> answer) and records every call
(argv after the connection flags, stdin). Answers come from files in ``recorded/``: outputs of the
real tctl v13.3.8 of the test bed, captured by ``recorded/record.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ansible.module_utils.common import warnings as _warnings
from helpers.ansible_compat import patch_module_args

from ansible_collections.lanyard.machine_id.plugins.module_utils import _tctl, _teleport_wait

RECORDED = Path(__file__).resolve().parent / "recorded"


def recorded(name: str) -> str:
    return (RECORDED / name).read_text()


class FakeTctl:
    """A stand-in for module.run_command(tctl ...). ``on(prefix, out=..., rc=..., err=...)`` scripts answers."""

    def __init__(self, version_text: str = "Teleport v13.3.8 git:v13.3.8-0-gc95e235 go1.21.13\n"):
        self.version_text = version_text
        self.rules: list[tuple[tuple[str, ...], object]] = []
        self.calls: list[tuple[list[str], str | None]] = []
        self.argvs: list[list[str]] = []

    def on(self, *prefix, out="", rc=0, err="", fn=None, times=None):
        self.rules.insert(0, (tuple(prefix), fn or (rc, out, err), times))
        return self

    def __call__(self, argv, data):
        self.argvs.append(list(argv))
        args = list(argv[1:]) if not argv[0].endswith("timeout") else list(argv[4:])
        # strip connection flags
        clean, skip = [], False
        for a in args:
            if skip:
                skip = False
                continue
            if a in ("-c", "-i"):
                skip = True
                continue
            if a.startswith("--auth-server=") or a == "--insecure":
                continue
            clean.append(a)
        self.calls.append((clean, data))
        if clean == ["version"]:
            return 0, self.version_text, ""
        for i, (prefix, answer, times) in enumerate(self.rules):
            if tuple(clean[:len(prefix)]) == prefix:
                if times is not None:
                    if times <= 0:
                        continue
                    self.rules[i] = (prefix, answer, times - 1)
                if callable(answer):
                    return answer(clean, data)
                return answer
        raise AssertionError(f"unexpected tctl call: {clean}")

    def client(self, **kw):
        kw = dict((k, v) for k, v in kw.items() if v is not None)
        if not kw:
            kw["auth_server"] = "127.0.0.1:3025"
        return _tctl.Tctl(self, "/usr/local/bin/tctl", **kw)

    def commands(self):
        return [call[0] for call in self.calls if call[0] != ["version"]]

    def writes(self):
        writers = (["bots", "add"], ["bots", "rm"], ["bots", "update"])
        return [c for c in self.commands() if c[0] in ("create", "rm") or c[:2] in writers]


@pytest.fixture(autouse=True)
def no_cache_wait(monkeypatch):
    """Scripted servers have no cache lag: do not wait for reads to catch up with writes."""
    monkeypatch.setattr(_teleport_wait, "DEFAULT_TIMEOUT", 0.0)


@pytest.fixture
def fake_tctl():
    return FakeTctl()


NOT_FOUND = (1, "", 'ERROR: role "x" is not found\n')


@pytest.fixture
def run_module(monkeypatch, capsys):
    """run_module(main, args, fake, check=False, diff=False) -> the module's JSON result (exit or fail)."""

    def _run(main, args, fake, check=False, diff=False):
        monkeypatch.setitem(main.__globals__, "tctl_from_module",
                            lambda module: fake.client(auth_server=module.params.get("auth_server"),
                                                       identity_file=module.params.get("identity_file"),
                                                       config_file=module.params.get("config_file")))
        full = dict(args)
        full["_ansible_check_mode"] = check
        full["_ansible_diff"] = diff
        capsys.readouterr()
        _warnings._global_warnings.clear()  # module warnings are process-global; one module run per test call
        with patch_module_args(full):
            with pytest.raises(SystemExit):
                main()
        result = json.loads(capsys.readouterr().out)
        # ansible-core 2.19 returns warnings as structured events; tests look at the text
        result["warnings"] = [w["event"]["msg"] if isinstance(w, dict) and "event" in w else w
                              for w in result.get("warnings", [])]
        return result

    return _run


def dump(obj) -> str:
    return json.dumps(obj, indent=2)
