# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Static checks of roles/machine_id: argument specs against defaults, tags, the wheel-set key."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import yaml

ROLE = Path(__file__).resolve().parents[3] / "roles" / "machine_id"


def _load(rel: str):
    return yaml.safe_load((ROLE / rel).read_text())


def test_argument_specs_match_defaults_key_for_key():
    defaults = _load("defaults/main.yml")
    options = _load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    assert sorted(options) == sorted(defaults), (
        f"only in defaults: {sorted(set(defaults) - set(options))}; only in specs: {sorted(set(options) - set(defaults))}")
    for name, spec in options.items():
        assert spec.get("default") == defaults[name], f"{name}: spec default {spec.get('default')!r} != {defaults[name]!r}"
        assert spec.get("description"), f"{name} has no description"
        assert name.startswith("machine_id_")


def test_secret_options_are_no_log():
    options = _load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    assert options["machine_id_token"].get("no_log") is True
    configure = (ROLE / "tasks" / "configure.yml").read_text()
    token_task = [t for t in yaml.safe_load(configure) if "machine_id_token" in str(t.get("ansible.builtin.copy", ""))]
    assert token_task and all(t.get("no_log") is True and t.get("diff") is False for t in token_task)


def test_status_entry_point_options_exist_in_defaults():
    defaults = _load("defaults/main.yml")
    status = _load("meta/argument_specs.yml")["argument_specs"]["status"]["options"]
    assert status and set(status) <= set(defaults)


def test_every_phase_has_its_tag():
    # main.yml imports preflight, install and verify; the phases skipped on the no-change path are in the file it
    # includes (converge.yml), each with its own tags
    tasks = _load("tasks/main.yml") + _load("tasks/converge.yml")
    tags = {tag for task in tasks for tag in task.get("tags", [])}
    for phase in ("preflight", "install", "configure", "service", "verify"):
        assert f"machine_id_{phase}" in tags
        assert (ROLE / "tasks" / f"{phase}.yml").is_file()


def test_handlers_listen_to_what_tasks_notify():
    listens = set()
    for h in _load("handlers/main.yml"):
        listens.update([h["listen"]] if isinstance(h["listen"], str) else h["listen"])
    notified = set()
    for f in (ROLE / "tasks").glob("*.yml"):
        for task in yaml.safe_load(f.read_text()) or []:
            n = task.get("notify")
            notified.update([n] if isinstance(n, str) else (n or []))
    assert notified and notified <= listens, notified - listens
    assert listens == {"machine_id restart", "machine_id reload"}


def _build_wheels_module():
    spec = importlib.util.spec_from_file_location("build_wheels", ROLE / "files" / "build_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wheel_set_key_follows_sources_only(tmp_path):
    bw = _build_wheels_module()
    src = tmp_path / "agent"
    (src / "src" / "pkg").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname='x'\n")
    (src / "src" / "pkg" / "a.py").write_text("A = 1\n")
    k1 = bw.source_key(str(src))
    # build droppings and caches do not change the key ...
    for junk in ("build/lib/pkg/a.py", "src/pkg.egg-info/PKG-INFO", "src/pkg/__pycache__/a.cpython-311.pyc"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_text("junk")
    assert bw.source_key(str(src)) == k1
    # ... a changed source file does (a new agent version restarts the service).
    (src / "src" / "pkg" / "a.py").write_text("A = 2\n")
    assert bw.source_key(str(src)) != k1


def test_old_wheel_sets_are_pruned(tmp_path):
    bw = _build_wheels_module()
    for i in range(8):
        d = tmp_path / f"set{i}"
        d.mkdir()
        (d / ".complete").write_text("x")
        os.utime(d, (1000 + i, 1000 + i))
    (tmp_path / "not-a-set").mkdir()
    bw.KEEP_SETS = 5
    bw.prune(str(tmp_path), keep=[str(tmp_path / "set0"), str(tmp_path / "set1")])
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))  # not the sets' lock files
    assert left == ["not-a-set", "set0", "set1", "set3", "set4", "set5", "set6", "set7"], left


def test_a_wheel_set_another_run_may_be_using_is_never_pruned(tmp_path):
    """Two runs on one controller share the build directory: one run's prune must not remove the set the other
    is copying to its hosts (seen when CI ran rollouts side by side: "could not find src=.../<set>/urllib3-...whl").
    A set used in the last PRUNE_MIN_AGE seconds stays, as does one whose lock another run holds."""
    bw = _build_wheels_module()
    bw.KEEP_SETS = 1
    now = 10 * bw.PRUNE_MIN_AGE
    for name, age in (("newest", 0), ("in-use", bw.PRUNE_MIN_AGE - 60), ("locked", 2 * bw.PRUNE_MIN_AGE),
                      ("stale", 2 * bw.PRUNE_MIN_AGE + 1)):
        d = tmp_path / name
        d.mkdir()
        (d / ".complete").write_text("x")
        os.utime(d, (now - age, now - age))
    other_run = bw._Lock(str(tmp_path), "locked")
    with other_run:
        bw.prune(str(tmp_path), keep=[], now=now)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["in-use", "locked", "newest"]
    # the lock is free again: the set nobody used for a day goes
    bw.prune(str(tmp_path), keep=[], now=now)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["in-use", "newest"]


def test_a_prune_goes_on_when_another_run_removed_a_set_meanwhile(tmp_path, monkeypatch):
    """Two runs pruning at once: a set the other run removed between the listing and the look at its age is
    skipped (the build's answer still comes out) instead of ending the script with a traceback."""
    bw = _build_wheels_module()
    bw.KEEP_SETS = 0
    for name in ("gone", "old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".complete").write_text("x")
        os.utime(tmp_path / name, (1000, 1000))
    real = os.path.getmtime

    def getmtime(path):
        if os.path.basename(path) == "gone":
            raise FileNotFoundError(path)
        return real(path)
    monkeypatch.setattr(bw.os.path, "getmtime", getmtime)
    bw.prune(str(tmp_path), keep=[])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["gone"]


def test_taking_a_cached_wheel_set_marks_it_used(tmp_path):
    """A reused set (nothing built) is marked as used, so its age for the prune counts from this run."""
    bw = _build_wheels_module()
    out = tmp_path / "abc"
    out.mkdir()
    (out / ".complete").write_text("abc\n")
    os.utime(out, (1000, 1000))
    with bw._Lock(str(tmp_path), "abc"):
        bw._use(str(out))
    assert os.path.getmtime(out) > 1000 + bw.PRUNE_MIN_AGE


def test_wheel_targets_are_keyed_and_parsed(tmp_path):
    bw = _build_wheels_module()
    assert bw.parse_target("3.13:x86_64:2.41") == ("3.13", "x86_64", 41)
    for bad in ("3.13:x86_64", "3.13:x86_64:musl", "2.7:x86_64:2.36", "3.13:x86 64:2.41"):
        try:
            bw.parse_target(bad)
        except ValueError as exc:
            assert "PYTHON:MACHINE:GLIBC" in str(exc)
        else:
            raise AssertionError(bad)
    # one set per (agent source, target): Debian 12 and 13 hosts never share one
    assert bw.set_key("k", "3.11:x86_64:2.36") != bw.set_key("k", "3.13:x86_64:2.41")
    assert bw.set_key("k", "3.13:x86_64:2.41") != bw.set_key("k2", "3.13:x86_64:2.41")
    assert bw.set_key("k", "3.13:x86_64:2.41") == bw.set_key("k", "3.13:x86_64:2.41")


def test_wheel_download_asks_for_the_hosts_tags_not_the_controllers():
    bw = _build_wheels_module()
    args = bw.pip_download_args("3.13:aarch64:2.36")
    pairs = list(zip(args, args[1:]))
    assert "--only-binary=:all:" in args
    assert ("--python-version", "3.13") in pairs and ("--implementation", "cp") in pairs
    assert {a for o, a in pairs if o == "--abi"} == {"cp313", "abi3", "none"}
    platforms = [a for o, a in pairs if o == "--platform"]
    # every glibc level the host can load, newest first, with the legacy manylinux aliases
    assert platforms[0] == "manylinux_2_36_aarch64"
    assert "manylinux_2_28_aarch64" in platforms and "manylinux_2_5_aarch64" in platforms
    assert "manylinux2014_aarch64" in platforms
    assert "manylinux_2_37_aarch64" not in platforms
    assert all(p.endswith("_aarch64") for p in platforms)


def test_agent_version_is_one_number():
    """The no-change path compares the version the installed agent reports (``__version__``) with the version in
    the agent wheel's name (pyproject): they must be the same number, or every run would reinstall."""
    import re
    agent = ROLE.parents[1] / "agent"
    pyproject = re.search(r'^version = "([^"]+)"', (agent / "pyproject.toml").read_text(), re.M).group(1)
    init = re.search(r'^__version__ = "([^"]+)"', (agent / "src" / "machine_id_agent" / "__init__.py").read_text(),
                     re.M).group(1)
    assert pyproject == init


def test_each_entry_point_validates_its_defaults_with_real_ansible(tmp_path):
    # validate_argument_spec templates the spec itself: Jinja braces in a description broke every role run once
    # (a Go-template example in a description). Run what the role runs first, for each entry point, on its defaults.
    from helpers.playbook import run_playbook

    defaults = _load("defaults/main.yml")
    specs = _load("meta/argument_specs.yml")["argument_specs"]
    tasks = [{"name": "validate %s" % entry, "ansible.builtin.validate_argument_spec": {
        "argument_spec": spec.get("options") or {}, "provided_arguments": {
            k: v for k, v in defaults.items() if k in (spec.get("options") or {})}}} for entry, spec in specs.items()]
    play = [{"hosts": "localhost", "gather_facts": False, "vars": {"role_path": str(ROLE)}, "tasks": tasks}]
    pb = tmp_path / "play.yml"
    pb.write_text(yaml.safe_dump(play))
    run = run_playbook(tmp_path / "run", pb)
    assert run.rc == 0, run.stdout[-3000:]
    assert len([r for r in run.results if r["status"] == "ok"]) == len(specs)


def _release_check_code() -> str:
    task = [t for t in _load("tasks/install_agent.yml") if t["name"].startswith("Ask this wheel set's agent")][0]
    argv = task["ansible.builtin.command"]["argv"]
    assert argv[1:3] == ["-I", "-c"], argv  # isolated: nothing from the working directory or the environment
    return argv[3]


def test_release_check_imports_every_agent_module_and_fails_on_a_broken_compiled_dependency(tmp_path):
    """The check the role runs in a release before switching the agent's command to it (here against this tree's
    agent source, so without -I): it prints the version only after importing each of the agent's modules and
    cryptography's Rust bindings, and fails when those do not load or the console script is missing (the version
    flag alone loads neither)."""
    import subprocess
    import sys

    agent_src = ROLE.parents[1] / "agent" / "src"
    code = _release_check_code() + "; print(sorted(k for k in sys.modules if k.startswith('machine_id_agent.')))"
    script = tmp_path / "machine-id-agent"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(agent_src))
    ok = subprocess.run([sys.executable, "-c", code, str(script)], env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    version, modules = ok.stdout.splitlines()
    assert version.startswith("machine-id-agent ")
    wanted = sorted("machine_id_agent." + p.stem for p in (agent_src / "machine_id_agent").glob("*.py")
                    if not p.stem.startswith("_"))
    assert [m for m in wanted if m not in modules] == [], modules
    missing = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none")], env=env, capture_output=True,
                             text=True, check=False)
    assert missing.returncode == 1 and missing.stderr.strip() == f"{tmp_path / 'none'}: missing"
    # a cryptography whose compiled part does not load (shadowing the real one)
    broken = tmp_path / "broken" / "cryptography"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "x509.py").write_text("raise ImportError('undefined symbol: a broken Rust binding')\n")
    bad = subprocess.run([sys.executable, "-c", code, str(script)], capture_output=True, text=True, check=False,
                         env=dict(env, PYTHONPATH=f"{broken.parent}:{agent_src}"))
    assert bad.returncode != 0 and "broken Rust binding" in bad.stderr and not bad.stdout, bad
