# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""agent_state, the one module run behind the role's no-change path: its decisions (what differs from the wanted
state) on their own, and the module itself run by real Ansible on this machine against files it made, with a
stand-in agent (the real agent and the real host are in tests/integration/rollout/test_rollout.py)."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
import sys
import textwrap

import pytest
import yaml

from ansible_collections.lanyard.machine_id.plugins.module_utils import _host_drift as drift
from ansible_collections.lanyard.machine_id.plugins.module_utils import _host_state as host
from helpers.playbook import run_playbook


def test_path_drift_names_each_difference_and_never_the_content(tmp_path):
    f = tmp_path / "tbot.yaml"
    f.write_text("secret-looking: value\n")
    os.chmod(f, 0o644)
    seen = host.path_state(str(f), checksum=True)
    assert seen["sha256"] == hashlib.sha256(b"secret-looking: value\n").hexdigest()
    want = {"path": str(f), "type": "file", "owner": "root", "mode": "0600", "sha256": "0" * 64}
    out = drift.path_drift(want, seen)
    assert out == ["%s: mode 0644, expected 0600" % f, "%s: content differs" % f]
    assert not any("secret-looking" in line for line in out)
    assert drift.path_drift(dict(want, mode="0644", sha256=seen["sha256"]), seen) == []
    assert drift.path_drift({"path": str(tmp_path / "nope")}, host.path_state(str(tmp_path / "nope"))) == \
        ["%s: missing" % (tmp_path / "nope")]
    assert drift.path_drift({"path": str(f), "type": "directory"}, seen) == \
        ["%s: type file, expected directory" % f]
    assert drift.path_drift({"path": str(f), "owner": "teleport"}, seen) == ["%s: owner root, expected teleport" % f]


@pytest.mark.parametrize("props, enabled, active, expect", [
    ({"LoadState": "loaded", "ActiveState": "active", "UnitFileState": "enabled", "NeedDaemonReload": "no"},
     True, True, []),
    ({"LoadState": "loaded", "ActiveState": "inactive", "UnitFileState": "enabled", "NeedDaemonReload": "no"},
     True, True, ["machine-id.service: inactive, expected active"]),
    ({"LoadState": "loaded", "ActiveState": "failed", "UnitFileState": "disabled", "NeedDaemonReload": "yes"},
     True, True, ["machine-id.service: changed on disk, systemd not reloaded",
                  "machine-id.service: disabled, expected enabled", "machine-id.service: failed, expected active"]),
    ({"LoadState": "not-found"}, True, True, ["machine-id.service: not loaded (not-found)"]),
    ({"LoadState": "loaded", "ActiveState": "inactive", "UnitFileState": "disabled"}, False, False, []),
    ({}, None, None, []),
])
def test_service_drift(props, enabled, active, expect):
    assert drift.service_drift("machine-id.service", props, enabled, active) == expect


def test_stray_drift_names_what_is_left_over():
    assert drift.stray_drift(["/etc/systemd/system/machine-id-reload-a.path", "/etc/systemd/system/x"],
                             ["/etc/systemd/system/x"]) == [
        "/etc/systemd/system/machine-id-reload-a.path: not in the role's settings any more (left over)"]


def test_install_drift_wheels_and_version():
    assert drift.install_drift("abc", "abc", {"agent_version": "0.3.0"}, "0.3.0") == []
    assert drift.install_drift(None, "abc", {}, None) == ["agent wheels: no record of the installed set, expected abc"]
    assert drift.install_drift("abc", "abc", {"agent_version": "0.2.0"}, "0.3.0") == \
        ["agent version: 0.2.0, expected 0.3.0"]


def test_running_drift_names_a_service_left_on_an_earlier_install():
    cmd = "/opt/machine-id/bin/machine-id-agent"
    new = "/opt/machine-id/releases/bbbb/bin/machine-id-agent"
    assert drift.running_drift("m.service", cmd, new,
                               ["/opt/machine-id/releases/bbbb/bin/python3", cmd, "start"]) == []
    assert drift.running_drift("m.service", cmd, new, ["/opt/machine-id/releases/aaaa/bin/python3", cmd]) == [
        "m.service: runs the agent from /opt/machine-id/releases/aaaa, but %s is /opt/machine-id/releases/bbbb's "
        "(not restarted after an upgrade)" % cmd]
    # the layout before releases (the command a regular file of the venv it runs from), and a venv left behind
    assert drift.running_drift("m.service", cmd, cmd, ["/opt/machine-id/bin/python3", cmd]) == []
    assert drift.running_drift("m.service", cmd, new, ["/opt/machine-id/bin/python3", cmd]) != []
    # the same paths spelt with doubled or trailing slashes (a venv setting ending in "/"; systemd and the kernel
    # give them with single slashes)
    assert drift.running_drift("m.service", "/opt/machine-id//bin/machine-id-agent", "/opt/machine-id//bin/x",
                               ["/opt/machine-id/bin/python3", cmd]) == []
    assert drift.running_drift("m.service", cmd, "/opt/machine-id/releases//bbbb/bin/machine-id-agent",
                               ["/opt/machine-id/releases/bbbb/bin/python3", cmd]) == []
    # started another way (not the command as its script), or no process: not judged
    assert drift.running_drift("m.service", cmd, new, ["/usr/bin/python3", "-m", "machine_id_agent"]) == []
    assert drift.running_drift("m.service", cmd, new, []) == []


def test_process_argv_and_link_target(tmp_path):
    assert host.process_argv(os.getpid())[0:1] and host.process_argv("0") == [] and host.process_argv("") == []
    assert host.process_argv(None) == [] and host.process_argv(2 ** 22 + 12345) == []
    (tmp_path / "rel" / "bin").mkdir(parents=True)
    (tmp_path / "rel" / "bin" / "agent").write_text("")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "agent").symlink_to("../rel/bin/agent")
    assert host.link_target(str(tmp_path / "bin" / "agent")) == str(tmp_path / "rel" / "bin" / "agent")
    assert host.link_target(str(tmp_path / "rel" / "bin" / "agent")) == str(tmp_path / "rel" / "bin" / "agent")


def test_user_drift_compares_group_home_and_shell_only_when_asked():
    seen = {"teleport": {"group": "teleport", "home": "/home/teleport", "shell": "/bin/bash"}, "app": None}
    assert drift.user_drift([{"name": "teleport"}], seen) == []
    assert drift.user_drift([{"name": "teleport", "group": "teleport", "home": "/var/lib/teleport",
                              "shell": "/usr/sbin/nologin"}, {"name": "app"}], seen) == [
        "user teleport: home /home/teleport, expected /var/lib/teleport",
        "user teleport: shell /bin/bash, expected /usr/sbin/nologin",
        "user app: missing"]
    assert host.users(["root", "no-such-user-xyz"]) == {
        "root": {"group": "root", "home": pwd.getpwnam("root").pw_dir, "shell": pwd.getpwnam("root").pw_shell},
        "no-such-user-xyz": None}


def test_the_role_filters_judge_the_install_with_the_modules_code():
    from ansible.errors import AnsibleFilterError
    from ansible_collections.lanyard.machine_id.plugins.filter.agent_install import (agent_install_drift,
                                                                                     agent_wheel_version)
    state = {"installed": True, "wheels_installed": "k1", "status": {"agent_version": "0.3.0"}}
    assert agent_install_drift(state, "k1", "0.3.0") == []
    assert agent_install_drift(state, "k2", "0.4.0") == ["agent wheels: k1, expected k2",
                                                         "agent version: 0.3.0, expected 0.4.0"]
    # a host without the agent: the version is not compared (the missing agent is reported on its own)
    assert agent_install_drift({"installed": False, "wheels_installed": None, "status": {}}, "k1", "0.3.0") == [
        "agent wheels: no record of the installed set, expected k1"]
    # several agent wheels in machine_id_agent_wheels_dir: the one pip installs, the highest version
    names = ["/w/machine_id_agent-0.9.0-py3-none-any.whl", "/w/machine_id_agent-0.10.0-py3-none-any.whl",
             "/w/requests-9.0.0-py3-none-any.whl"]
    assert agent_wheel_version(names) == "0.10.0"
    assert agent_wheel_version(["machine_id_agent-0.3.0-py3-none-any.whl"]) == "0.3.0"
    with pytest.raises(AnsibleFilterError, match="no machine_id_agent"):
        agent_wheel_version(["/w/requests-9.0.0-py3-none-any.whl"])


def test_wheels_digest_names_and_checksums_each_wheel_a_symlink_too(tmp_path):
    """machine_id_agent_wheels_dir's part of the wheel set's key, from the wheels fileglob found there: a wheel
    rebuilt under the same name changes it, a wheel reached through a symlink counts, the order found does not
    matter, and an unreadable file is an error naming it."""
    from ansible.errors import AnsibleFilterError
    from ansible_collections.lanyard.machine_id.plugins.filter.agent_install import wheels_digest
    store, wheels = tmp_path / "store", tmp_path / "wheels"
    store.mkdir()
    wheels.mkdir()
    agent, req = wheels / "machine_id_agent-0.1.0-py3-none-any.whl", wheels / "requests-2.0.0-py3-none-any.whl"
    agent.write_bytes(b"agent v1")
    (store / req.name).write_bytes(b"requests")
    req.symlink_to(store / req.name)
    first = wheels_digest([str(req), str(agent)])
    assert first == "machine_id_agent-0.1.0-py3-none-any.whl:%s requests-2.0.0-py3-none-any.whl:%s" % (
        hashlib.sha256(b"agent v1").hexdigest(), hashlib.sha256(b"requests").hexdigest())
    assert wheels_digest([str(agent), str(req)]) == first
    agent.write_bytes(b"agent v1, rebuilt")
    assert wheels_digest([str(agent), str(req)]) != first
    with pytest.raises(AnsibleFilterError, match="cannot read %s on the controller" % (tmp_path / "none.whl")):
        wheels_digest([str(tmp_path / "none.whl")])


def _fake_agent(path, status, init_out="unchanged: /x"):
    path.write_text(textwrap.dedent("""\
        #!/bin/sh
        case "$1" in
          status) echo '%s' ;;
          init) echo '%s' ;;
        esac
        """ % (status, init_out)))
    path.chmod(0o755)


def _module_play(tmp_path, env=None, **params):
    task = {"lanyard.machine_id.agent_state": params, "register": "state"}
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": [task]}]
    return run_playbook(tmp_path, yaml.safe_dump(play, sort_keys=False), env=env)


def _fake_systemd(bindir):
    """A systemctl that answers like systemd with every unit loaded, enabled and active (this machine runs none)."""
    bindir.mkdir(exist_ok=True)
    (bindir / "systemctl").write_text(textwrap.dedent("""\
        #!/bin/sh
        case "$1" in
          --version) echo 'systemd 252 (252.30-1~deb12u2)' ;;
          show) printf 'LoadState=loaded\\nActiveState=active\\nUnitFileState=enabled\\nNeedDaemonReload=no\\n'
                printf 'MainPID=%s\\n' "${FAKE_MAIN_PID:-0}" ;;
        esac
        """))
    (bindir / "systemctl").chmod(0o755)
    return {"PATH": "%s:%s" % (bindir, os.environ["PATH"])}


def test_module_on_a_converged_tree_reports_no_drift_and_one_for_each_change(tmp_path):
    conf = tmp_path / "tbot.yaml"
    conf.write_text("storage: {}\n")
    conf.chmod(0o600)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "kubeconfig.yaml").write_text("apiVersion: v1\n")
    agent = tmp_path / "machine-id-agent"
    _fake_agent(agent, '{"identity": {"valid": true}, "agent_version": "9.9.9"}')
    (tmp_path / "marker").write_text("key1\n")
    params = {"agent_bin": str(agent), "agent_python": "python3", "config_path": str(conf), "bot_user": "root",
              "bot_group": "root", "reader_user": "root", "destinations": [str(dest)], "service_name": "nothere",
              "files": [{"path": str(conf), "type": "file", "owner": "root", "mode": "0600",
                         "sha256": hashlib.sha256(b"storage: {}\n").hexdigest()}],
              "users": [{"name": "root", "group": "root"}], "groups": ["root"], "wheels_marker": str(tmp_path / "marker"),
              "wheels_key": "key1", "agent_version": "9.9.9"}
    run = _module_play(tmp_path, **params)
    assert run.rc == 0, run.stdout[-3000:]
    res = run.result("lanyard.machine_id.agent_state")
    assert res["drift"] == [], res["drift"]
    assert res["installed"] is True and res["status"]["agent_version"] == "9.9.9"
    assert res["wheels_installed"] == "key1"
    assert '"python"' in res["agent_python"]["stdout"]
    assert res["changed"] is False

    # every kind of difference is named, each by its object
    conf.write_text("storage: {changed: 1}\n")
    conf.chmod(0o640)
    _fake_agent(agent, '{"identity": {"valid": true}, "agent_version": "9.9.8"}', init_out="would set ACL on /x")
    params.update(wheels_key="key2", users=[{"name": "root", "group": "root", "shell": "/usr/sbin/nologin"},
                                            {"name": "no-such-user-xyz"}])
    run = _module_play(tmp_path, **params)
    res = run.result("lanyard.machine_id.agent_state")
    assert res["drift"] == [
        "%s: mode 0640, expected 0600" % conf, "%s: content differs" % conf,
        "user root: shell %s, expected /usr/sbin/nologin" % pwd.getpwnam("root").pw_shell,
        "user no-such-user-xyz: missing",
        "agent wheels: key1, expected key2", "agent version: 9.9.8, expected 9.9.9",
        "%s: would set ACL on /x" % dest], res["drift"]


def test_module_on_a_fresh_host_reports_the_agent_missing_and_runs_no_agent_command(tmp_path):
    # a Python that is not there is an answer for preflight's assert to explain, not a module failure
    run = _module_play(tmp_path, agent_bin=str(tmp_path / "nope" / "machine-id-agent"),
                       agent_python=str(tmp_path / "nope" / "python3"),
                       config_path=str(tmp_path / "tbot.yaml"), bot_user="root", bot_group="root",
                       destinations=[str(tmp_path / "out")], service_name="nothere")
    assert run.rc == 0, run.stdout[-3000:]
    res = run.result("lanyard.machine_id.agent_state")
    assert res["installed"] is False and res["agent_found"] is False and res["status"] == {}
    assert res["drift"] == ["%s: missing" % (tmp_path / "nope" / "machine-id-agent")]
    assert res["agent_python"]["rc"] == 127 and "not found" in res["agent_python"]["stderr"]


def test_module_names_outputs_without_valid_credentials_and_an_agent_whose_python_is_gone(tmp_path):
    conf = tmp_path / "tbot.yaml"
    conf.write_text("x: 1\n")
    agent = tmp_path / "machine-id-agent"
    _fake_agent(agent, '{"identity": {"valid": true}, "outputs": [{"destination": "/d", "valid": false, '
                       '"problem": "expired"}]}')
    base = {"agent_bin": str(agent), "agent_python": "python3", "config_path": str(conf), "bot_user": "root",
            "bot_group": "root", "service_name": "nothere", "service_active": True}
    res = _module_play(tmp_path, **base).result("lanyard.machine_id.agent_state")
    assert "/d: no valid credentials (expired)" in res["drift"], res["drift"]
    # the console script's interpreter removed (a venv whose Python went): an answer, not a module failure
    agent.write_text("#!%s/gone/python3\n" % tmp_path)
    run = _module_play(tmp_path, **dict(base, destinations=[str(tmp_path)]))
    assert run.rc == 0, run.stdout[-2000:]
    res = run.result("lanyard.machine_id.agent_state")
    assert res["status"] == {} and res["status_error"]
    assert any("interpreter" in line for line in res["drift"]), res["drift"]
    # the status error is named as what differs (the role then takes the full path and mints no token for it)
    assert any(line.startswith(str(agent) + " status: ") for line in res["drift"]), res["drift"]


def test_wheel_target_and_host_facts_read_without_fact_gathering():
    assert host.wheel_target({"rc": 0, "stdout": '{"python": "3.11", "machine": "x86_64", "libc": ["glibc", "2.36"]}'}) \
        == "3.11:x86_64:2.36"
    assert host.wheel_target({"rc": 127, "stdout": ""}) is None
    assert host.wheel_target({"rc": 0, "stdout": "not json"}) is None
    info = host.host_info((3, 12, 1))
    assert info["python"] == "3.12"
    assert set(info) == {"service_mgr", "distribution", "distribution_version", "distribution_major_version",
                         "python"}
    assert info["distribution_major_version"] == info["distribution_version"].split(".")[0]


class _Runs:
    """A module double for host.run: records each argv and answers with ``answer(argv)``."""

    def __init__(self, answer):
        self.argvs, self.answer = [], answer

    def get_bin_path(self, prog):
        return "/usr/bin/" + prog

    def run_command(self, argv):
        self.argvs.append(argv)
        return self.answer(argv)


def test_agent_python_probe_runs_no_process_for_the_modules_own_python(tmp_path, monkeypatch):
    """The role's default agent Python is the one Ansible runs the module with: answered in-process, the same
    answer the probe gives in a process of its own; another Python is still probed in a process."""
    probe = subprocess.run([os.path.realpath(sys.executable), "-c", host.PYTHON_PROBE], capture_output=True,
                           text=True, check=True)
    assert json.loads(probe.stdout) == json.loads(json.dumps(host.python_facts()))
    mod = _Runs(lambda argv: (0, probe.stdout, ""))
    res = host.agent_python(mod, sys.executable)
    assert res["rc"] == 0 and json.loads(res["stdout"]) == json.loads(probe.stdout) and mod.argvs == []
    other = tmp_path / "python3"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setattr(host, "_shebang", lambda path: None)
    res = host.agent_python(mod, str(other))
    assert mod.argvs == [[str(other), "-c", host.PYTHON_PROBE]] and res["stdout"] == probe.stdout.strip()


def test_units_state_asks_systemctl_once_and_falls_back_unit_by_unit():
    blocks = {"a.service": "LoadState=loaded\nActiveState=active\nMainPID=12",
              "b.service": "LoadState=not-found\nActiveState=inactive\nMainPID=0",
              "c.path": "LoadState=loaded\nActiveState=active\nUnitFileState=enabled"}

    def systemctl(argv):
        names = [a for a in argv[2:] if not a.startswith("-") and a not in host.UNIT_PROPERTIES]
        if "bad name" in names and len(names) > 1:
            return 1, "", "Unit name bad name is not valid."
        return 0, "\n\n".join(blocks.get(n, "LoadState=bad-setting") for n in names) + "\n", ""

    mod = _Runs(systemctl)
    got = host.units_state(mod, ["a.service", "b.service", "a.service", "c.path"])
    want = ["/usr/bin/systemctl", "show", "a.service", "b.service", "c.path"]
    assert len(mod.argvs) == 1 and mod.argvs[0][:5] == want
    assert got["a.service"] == {"LoadState": "loaded", "ActiveState": "active", "MainPID": "12"}
    assert got["b.service"]["LoadState"] == "not-found" and got["c.path"]["UnitFileState"] == "enabled"
    # one name systemctl refuses fails the whole call: each unit is asked on its own
    mod = _Runs(systemctl)
    got = host.units_state(mod, ["a.service", "bad name"])
    assert len(mod.argvs) == 3 and got["a.service"]["MainPID"] == "12" and got["bad name"]["LoadState"] == "bad-setting"
    # an answer that does not match the names (fewer blocks) is not guessed at
    mod = _Runs(lambda argv: (0, blocks["a.service"] + "\n", ""))
    got = host.units_state(mod, ["a.service", "b.service"])
    assert len(mod.argvs) == 3 and got["b.service"] == got["a.service"]


def _fake_kubectl(path, log, answer):
    path.write_text('#!/bin/sh\necho "$@" >> %s\necho %s\n' % (log, answer))
    path.chmod(0o755)


def test_module_asks_the_cluster_only_for_a_host_where_nothing_differs(tmp_path):
    """The no-change path's cluster question: asked (as the reader, through each destination's kubeconfig) when
    nothing differs; not asked when something does (the role fixes it first and verify asks afterwards)."""
    conf = tmp_path / "tbot.yaml"
    conf.write_text("x: 1\n")
    agent, agent_log = tmp_path / "machine-id-agent", tmp_path / "agent.log"
    _fake_agent(agent, '{"identity": {"valid": true}, "outputs": [{"destination": "/d", "valid": true}]}')
    agent.write_text(agent.read_text().replace("#!/bin/sh\n", '#!/bin/sh\necho "$1" >> %s\n' % agent_log))
    kubectl, log = tmp_path / "kubectl", tmp_path / "kubectl.log"
    _fake_kubectl(kubectl, log, "yes")
    dests = [str(tmp_path / "a"), str(tmp_path / "b")]
    base = {"agent_bin": str(agent), "agent_python": "python3", "config_path": str(conf), "bot_user": "root",
            "bot_group": "root", "reader_user": "root", "service_name": "nothere", "service_active": True,
            "destinations": dests,
            "kubectl": str(kubectl), "cluster_check_namespace": "demo"}
    env = _fake_systemd(tmp_path / "bin")
    res = _module_play(tmp_path, env=env, **base).result("lanyard.machine_id.agent_state")
    assert res["drift"] == [], res["drift"]
    assert res["systemd_version"] == 252 and res["unit"]["ActiveState"] == "active"
    assert [(c["directory"], c["stdout"], c["rc"]) for c in res["cluster_check"]] == [(d, "yes", 0) for d in dests]
    assert log.read_text().splitlines() == [
        "--kubeconfig %s/kubeconfig.yaml --request-timeout 30s auth can-i list pods -n demo" % d for d in dests]
    assert res["host"]["python"] and res["wheel_target"]
    # the cluster's "yes" as the reader proved the reader reads there: no `wait` of the agent's
    assert "wait" not in agent_log.read_text().split(), agent_log.read_text()

    # a "no" (the reader may not list pods, or could not read at all): the reader's read is checked with `wait`
    _fake_kubectl(kubectl, log, "no")
    agent_log.unlink()
    res = _module_play(tmp_path, env=env, **base).result("lanyard.machine_id.agent_state")
    assert [c["stdout"] for c in res["cluster_check"]] == ["no", "no"]
    assert agent_log.read_text().split().count("wait") == 2 and res["drift"] == [], res
    _fake_kubectl(kubectl, log, "yes")

    # something differs: no question to the cluster
    log.unlink()
    res = _module_play(tmp_path, env=env, **dict(base, files=[{"path": str(conf), "mode": "0600"}])).result(
        "lanyard.machine_id.agent_state")
    assert res["drift"] and "cluster_check" not in res and not log.exists()
    # not asked for either without the namespace (verify off) or when the service is not to run
    for extra in ({"cluster_check_namespace": None}, {"service_active": False}):
        res = _module_play(tmp_path, env=env, **dict(base, **extra)).result("lanyard.machine_id.agent_state")
        assert "cluster_check" not in res and not log.exists(), extra


def test_module_names_a_service_still_running_an_earlier_install(tmp_path):
    """The command switched to a new release but the service was never restarted (a run cut before its handlers):
    the service's main process runs the earlier install's interpreter with the command as its script."""
    conf = tmp_path / "tbot.yaml"
    conf.write_text("x: 1\n")
    for rel in ("aaaa", "bbbb"):
        (tmp_path / "releases" / rel / "bin").mkdir(parents=True)
        _fake_agent(tmp_path / "releases" / rel / "bin" / "machine-id-agent", '{"identity": {"valid": true}}')
        (tmp_path / "releases" / rel / "bin" / "machine-id-agent").write_text(
            (tmp_path / "releases" / rel / "bin" / "machine-id-agent").read_text().replace(
                "esac", "  serve) sleep 60 ;;\nesac"))
    (tmp_path / "bin").mkdir()
    agent = tmp_path / "bin" / "machine-id-agent"
    agent.symlink_to("../releases/bbbb/bin/machine-id-agent")
    base = {"agent_bin": str(agent), "agent_python": "python3", "config_path": str(conf), "bot_user": "root",
            "bot_group": "root", "service_name": "nothere", "service_active": True}
    env = _fake_systemd(tmp_path / "sbin")
    for rel, expect in (("bbbb", []), ("aaaa", [
            "nothere.service: runs the agent from %s/releases/aaaa, but %s is %s/releases/bbbb's (not restarted "
            "after an upgrade)" % (tmp_path, agent, tmp_path)])):
        # [that release's python, the command, ...] as the kernel starts a console script (sh stands in for python)
        proc = subprocess.Popen([str(tmp_path / "releases" / rel / "bin" / "python3"), str(agent), "serve"],
                                executable="/bin/sh")
        try:
            res = _module_play(tmp_path, env=dict(env, FAKE_MAIN_PID=str(proc.pid)), **base).result(
                "lanyard.machine_id.agent_state")
        finally:
            proc.kill()
            proc.wait()
        assert res["drift"] == expect, res["drift"]
        assert res["unit"]["MainPID"] == str(proc.pid)


def test_module_takes_the_acl_judgement_from_status_and_asks_an_older_agent_again(tmp_path):
    """One agent process for status and the destinations' ACLs (``status --check-acls`` as the agent's user);
    ``init --check`` only for an agent that does not know the flag (an upgrade in progress)."""
    conf = tmp_path / "tbot.yaml"
    conf.write_text("x: 1\n")
    dest = str(tmp_path / "out")
    agent, agent_log = tmp_path / "machine-id-agent", tmp_path / "agent.log"
    base = {"agent_bin": str(agent), "agent_python": "python3", "config_path": str(conf), "bot_user": "root",
            "bot_group": "root", "service_name": "nothere", "destinations": [dest]}

    def agent_says(check, knows_flag=True):
        doc = json.dumps({"identity": {"valid": True}, "outputs": [
            dict({"destination": dest, "valid": True}, **({"acl_check": check} if check else {}))]})
        agent.write_text(textwrap.dedent("""\
            #!/bin/sh
            echo "$@" >> %s
            case "$1" in
              status) %s echo '%s' ;;
              init) echo 'would change: would set the acl of %s' ;;
            esac
            """ % (agent_log, "" if knows_flag else
                   'case "$*" in *--check-acls*) echo "error: unrecognized arguments: --check-acls" >&2; exit 2;; esac;',
                   doc, dest)))
        agent.chmod(0o755)
        if agent_log.exists():
            agent_log.unlink()
        res = _module_play(tmp_path, **base).result("lanyard.machine_id.agent_state")
        return res, agent_log.read_text().splitlines()

    res, calls = agent_says({"changed": False, "actions": [], "warnings": []})
    assert res["drift"] == [] and [c.split()[0] for c in calls] == ["status"] and "--check-acls" in calls[0]
    res, calls = agent_says({"changed": True, "actions": ["would set the acl of %s" % dest]})
    assert res["drift"] == ["%s: would change: would set the acl of %s" % (dest, dest)]
    assert [c.split()[0] for c in calls] == ["status"]
    res, calls = agent_says({"error": "%s: Permission denied" % dest})
    assert res["drift"] == ["%s: cannot check it as the agent's user (%s: Permission denied)" % (dest, dest)]
    # an agent from before the flag: status again without it, then init --check as before
    res, calls = agent_says(None, knows_flag=False)
    assert [c.split()[0] for c in calls] == ["status", "status", "init"] and "--check-acls" not in calls[1]
    assert res["status"]["identity"] == {"valid": True} and "status_error" not in res
    assert res["drift"] == ["%s: would change: would set the acl of %s" % (dest, dest)]
    # an agent from before `init --check` too (a collection older still): named as such, not by argparse's usage
    agent.write_text(agent.read_text().replace(
        "  init) echo", '  init) echo "machine-id-agent: error: unrecognized arguments: --check" >&2; exit 2; echo'))
    res = _module_play(tmp_path, **base).result("lanyard.machine_id.agent_state")
    assert res["drift"] == ["%s: ACLs not judged: the installed agent is older than init --check" % dest], res["drift"]


def test_cluster_check_asks_each_context_of_a_kubeconfig_of_several_clusters(tmp_path):
    """module cluster_check (verify's full path) and agent_state (the no-change path) ask the same questions: the
    current context of a one-cluster kubeconfig, each context (listed as the reader) of a kubernetes/v2 one."""
    kubectl, log = tmp_path / "kubectl", tmp_path / "kubectl.log"
    kubectl.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "$@" >> %s
        case "$*" in
          *get-contexts*) case "$*" in *empty*) ;; *) printf 'a@bed\\nb@bed\\n' ;; esac ;;
          *"--context b@bed"*) echo 'an error on the server' >&2; exit 1 ;;
          *) echo yes ;;
        esac
        """ % log))
    kubectl.chmod(0o755)
    one, multi, empty = str(tmp_path / "one"), str(tmp_path / "multi"), str(tmp_path / "empty")
    task = {"lanyard.machine_id.cluster_check": {
        "kubectl": str(kubectl), "namespace": "demo",
        "destinations": [{"directory": one}, {"directory": multi, "every_context": True},
                         {"directory": empty, "every_context": True}]}}
    run = run_playbook(tmp_path, yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": [task]}]))
    assert run.rc == 0, run.stdout[-3000:]
    checks = run.result("lanyard.machine_id.cluster_check")["checks"]
    assert [(c["directory"], c["context"], c["stdout"], c["stderr"]) for c in checks] == [
        (one, None, "yes", ""), (multi, "a@bed", "yes", ""), (multi, "b@bed", "", "an error on the server"),
        (empty, None, "", "")]
    assert checks[-1]["no_context"] is True
    assert "--context a@bed --request-timeout 30s auth can-i list pods -n demo" in log.read_text()


def test_cluster_check_asks_the_verb_and_resource_given_and_refuses_a_flag(tmp_path):
    kubectl, log = tmp_path / "kubectl", tmp_path / "kubectl.log"
    _fake_kubectl(kubectl, log, "yes")
    one = str(tmp_path / "one")
    tasks = [{"name": "asked", "lanyard.machine_id.cluster_check": {
        "kubectl": str(kubectl), "namespace": "demo", "verb": "get", "resource": "configmaps/app-settings",
        "destinations": [{"directory": one}]}},
        {"name": "refused", "lanyard.machine_id.cluster_check": {
            "kubectl": str(kubectl), "namespace": "demo", "verb": "get", "resource": "--as=system:admin",
            "destinations": [{"directory": one}]}, "ignore_errors": True}]
    run = run_playbook(tmp_path, yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]))
    assert run.rc == 0, run.stdout[-3000:]
    assert log.read_text().splitlines() == [
        "--kubeconfig %s/kubeconfig.yaml --request-timeout 30s auth can-i get configmaps/app-settings -n demo" % one]
    bad = run.result("refused")
    assert bad["_status"] == "failed", bad
    assert "machine_id_verify_resource" in bad["msg"] and "--as=system:admin" in bad["msg"]
    assert "Traceback" not in json.dumps(bad)
