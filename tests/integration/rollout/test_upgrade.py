# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Upgrading the collection over a running host, on the real bed and a real systemd host, at the role's defaults.

The host is first rolled out by the collection as it was at ``OLD`` (unpacked from ``git archive``, so its role,
modules and agent all come from then): the last commit whose agent has no ``status --check-acls``. The current
``agent_state`` then cannot have the destinations' ACLs judged by the agent's status run, and asks the installed
agent's ``init --check`` instead (the fallback for an agent older than the collection). A check-mode run of the
current collection reports the upgrade and changes nothing. Then, while two loops run as ``app`` on the host (one of
``kubectl get pods``, one of the agent's exec plugin back to back, which hits a window of milliseconds), the current
collection's rollout replaces the agent: from outside, no join token was minted and no bot call was made, the bot's
generation went on in the new agent's hands with no lock, the service was restarted onto the new release (its
process maps the release's files), every iteration of both loops succeeded, and the next run is on the no-change
path. Two more upgrades then show which installs stay: the release in use and the one just left (and their wheel
sets). Last, an agent left running an earlier release (a run cut before its handlers) is found by the no-change
path and restarted. A host of a collection older still, whose kubeconfigs held the credentials inline, is
upgraded to the exec-plugin kubeconfig with its reader never failing.
"""

from __future__ import annotations

import io
import shutil
import json
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.fleet import AGENT, Fleet, agent_python_argv, agent_status, changed_by_host, wait_for
from helpers.playbook import REPO
from helpers.reader_loop import cert_generation, failed, locks, server_generation, start_loop, stop_loop
from helpers.tbot_by_hand import sh as _sh

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

# the parent of 2c8aea8 ("status --check-acls ... init --check only for an older agent")
OLD = "8a2f283659b95db77992c92d5cc57071834ed44a"
# a collection from before the exec-plugin kubeconfig (a8e8882) and `init --check`: its kubeconfigs hold the
# credentials inline (the agent of issue 16's first figures)
INLINE = "b567b8e6b958e4acc74d3873eb7e5add29159fce"
HOST = "up-1"
DEST = "/opt/machine-id"
STORAGE = "/var/lib/teleport/bot"
REPORT_TASK = "Report what differs from this role's settings"
STATE_TASK = "Read the agent's install, identity and unit, and what differs from this role's settings"


def _collection_at(tmp_path_factory, commit: str):
    """The collection at ``commit``, laid out as an installed collection
    (``<root>/ansible_collections/lanyard/machine_id``)."""
    root = tmp_path_factory.mktemp("old-collection")
    dest = root / "ansible_collections" / "lanyard" / "machine_id"
    dest.mkdir(parents=True)
    r = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.fail(f"git archive {commit} failed ({r.stderr.decode(errors='replace').strip()}): this test needs the "
                    f"repository's history; in a shallow clone run `git -C {REPO} fetch --unshallow`", pytrace=False)
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return root


@pytest.fixture(scope="module")
def old_collection(tmp_path_factory):
    return _collection_at(tmp_path_factory, OLD)


@pytest.fixture(scope="module")
def fleet(bed, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("upgrade"), teleport=bed.teleport["multiplex"], kube=bed.kube)
    try:
        f.add_hosts([HOST])
        yield f
    finally:
        f.stop()


def _knows_check_acls(host) -> bool:
    """Whether the installed agent is one with ``status --check-acls`` (the current one), asked on the host."""
    r = _sh(host, f"{AGENT} status --help", check=False)
    assert r.returncode == 0, r.stderr
    return "--check-acls" in r.stdout


def _generation(host) -> int:
    stored = json.loads((host.root / STORAGE.lstrip("/") / "identity.json").read_text())
    return cert_generation(stored["tlscert"].encode())


def _main_pid(host) -> str:
    pid = _sh(host, "systemctl show -p MainPID --value machine-id").stdout.strip()
    assert pid not in ("", "0"), pid
    return pid


def _runs_from(host, pid: str) -> str:
    """The release directory whose files the process has mapped (its compiled extensions: cryptography's)."""
    out = _sh(host, f"grep -o '/opt/machine-id-agent/[^ ]*' /proc/{pid}/maps | sort -u", check=False).stdout
    dirs = sorted({"/".join(line.split("/")[:5]) for line in out.split() if "/releases/" in line}
                  | ({"(pre-release venv)"} if "/opt/machine-id-agent/lib/" in out else set()))
    return " ".join(dirs)


def _assert_the_identity_went_on(fleet, host, tokens: int, calls: int, gen0: int) -> None:
    """Through the upgrade: no token minted and no bot or token call, the agent's identity ok with one join in the
    journal (the old agent's first), its generation at least the old one's and counted by Teleport, no lock."""
    tp = fleet.teleport
    assert fleet.token_creations() == tokens
    new_calls = fleet._calls()[calls:]
    assert not [c for c in new_calls if c[:1] in (["bots"], ["tokens"])], new_calls
    status = agent_status(host)
    assert status["identity"]["state"] == "ok", status
    bot = status["identity"]["bot"]
    journal = _sh(host, "journalctl -u machine-id --no-pager -o cat", check=False).stdout
    assert journal.count("joining the cluster") == 1, journal[-3000:]
    assert _generation(host) >= gen0
    assert wait_for(lambda: server_generation(tp, bot) == _generation(host), timeout=30), \
        (server_generation(tp, bot), _generation(host))
    assert f"bot-{bot}" not in locks(tp)


@contextmanager
def _loops(host, label: str, plugin: bool = True):
    """kubectl as the reader, and (``plugin``) the exec plugin back to back, through whatever runs inside the block;
    asserts that every iteration of each loop succeeded and that each ran through the block."""
    names = ["up-kubectl-loop"] + (["up-plugin-loop"] if plugin else [])
    start_loop(host, names[0], DEST)
    if plugin:
        start_loop(host, names[1], DEST, plugin_only=True)
    t0 = time.time()
    try:
        yield
        t1 = time.time()
        time.sleep(3)  # a few more iterations after it
    finally:
        runs = [stop_loop(host, name) for name in names]
    bad = []
    for name, run in zip(names, runs):
        bad += failed(run, f"{'kubectl' if name == 'up-kubectl-loop' else 'exec plugin'} loop, {label}", span=(t0, t1))
    assert not bad, bad[:10]


def _own_build_dir(fleet) -> list:
    """An older collection builds its wheel sets apart: its build_wheels.py prunes the shared build directory by age
    alone, which could remove a set that a rollout of another test file is copying at the same time."""
    return ["-e", f"machine_id_agent_build_dir={fleet.workdir / 'old-collection-wheels'}"]


def test_1_the_current_collection_upgrades_a_host_rolled_out_by_an_older_one(fleet, old_collection):
    host = fleet.hosts[HOST]
    fleet.collections_path = old_collection
    run = fleet.rollout(extra_args=_own_build_dir(fleet))
    assert run.rc == 0, run.stdout[-8000:]
    assert not _knows_check_acls(host), "the old collection did not install its own (older) agent"
    assert fleet.reader_get_pods(HOST).returncode == 0
    gen0 = _generation(host)
    pid0 = _main_pid(host)
    assert _runs_from(host, pid0) == "(pre-release venv)", _runs_from(host, pid0)

    # the current collection from here on
    fleet.collections_path = None
    tokens, calls = fleet.token_creations(), fleet.tctl_calls()

    # check mode: the upgrade is reported, nothing on the host changes
    check = fleet.rollout(check=True, diff=True)
    assert check.rc == 0, check.stdout[-8000:]
    assert changed_by_host(check)[HOST] > 0, check.stdout[-4000:]
    assert not _knows_check_acls(host)
    assert not (host.root / "opt/machine-id-agent/releases").exists()

    with _loops(host, "upgrade from 8a2f283"):
        run = fleet.rollout()
        assert run.rc == 0, run.stdout[-8000:]

    # what differed: the agent's install, judged with the old agent's `init --check` for the ACLs, which found the
    # destination as the role wants it (a broken fallback names the destination, or fails the run)
    report = [r["result"].get("msg", "") for r in run.results if r["host"] == HOST and r["task"].endswith(REPORT_TASK)]
    print("[upgrade drift]", report)
    assert report and "agent wheels:" in report[0], report
    assert f"{DEST}:" not in report[0], report
    # ... and it was the fallback that judged them: the old agent's status has no ACL verdict of its own
    state = [r["result"] for r in run.results if r["host"] == HOST and r["task"].endswith(STATE_TASK)][0]
    outputs = state["status"]["outputs"]
    assert outputs and not [o for o in outputs if "acl_check" in o], outputs
    assert _knows_check_acls(host)
    # the new layout: the command is a symlink to this wheel set's release, the service restarted onto it; the old
    # single virtualenv stays until the next install (a call started a moment before the switch may still use it)
    link = _sh(host, f"readlink {AGENT}").stdout.strip()
    assert link.startswith("/opt/machine-id-agent/releases/") and link.endswith("/bin/machine-id-agent"), link
    release = "/".join(link.split("/")[:5])
    pid = _main_pid(host)
    assert pid != pid0 and _runs_from(host, pid) == release, (pid0, pid, _runs_from(host, pid), release)
    assert (host.root / "opt/machine-id-agent/pyvenv.cfg").exists()

    _assert_the_identity_went_on(fleet, host, tokens, calls, gen0)
    assert fleet.reader_get_pods(HOST).returncode == 0

    # and the next run is on the no-change path
    again = fleet.rollout()
    assert again.rc == 0, again.stdout[-6000:]
    changed = [r["task"] for r in again.results if r["status"] == "ok" and r["result"].get("changed")]
    assert changed_by_host(again)[HOST] == 0, changed


def _releases(host) -> list[str]:
    return sorted(_sh(host, "ls -A /opt/machine-id-agent/releases").stdout.split())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Where test_2 makes its agent sources (test_3 rolls out the last one again)."""
    return tmp_path_factory.mktemp("agent-sources")


def _wheel_sets(host) -> list[str]:
    return sorted(_sh(host, "ls -A /opt/machine-id-agent/wheels").stdout.split())


def test_2_a_later_upgrade_keeps_the_release_just_left_and_removes_older_ones(fleet, sources):
    """Two more wheel sets (an agent source with one added module each): after each, the installs are the release
    in use and the one just left (the first: the release and the pre-release venv); the loops never fail; no
    token; the service runs the new release."""
    host = fleet.hosts[HOST]
    first = _sh(host, f"readlink {AGENT}").stdout.strip().split("/")[4]
    assert _releases(host) == [first]
    # each wheel set in its own directory; the old layout's wheels (one shared directory) went with test_1's install
    assert _wheel_sets(host) == [first], _wheel_sets(host)
    tokens = fleet.token_creations()
    used = [first]
    # a file of the admin's in the agent's directory: not a virtualenv's name, so no install removes it
    _sh(host, "echo 'local notes' > /opt/machine-id-agent/README.local")
    # ... and one in the wheels' directory: not a name of the role's copies, so no pruning removes it
    _sh(host, "echo 'local notes' > /opt/machine-id-agent/wheels/NOTES.local")
    for n in (1, 2):
        src = sources / f"agent-{n}"
        shutil.copytree(REPO / "agent", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        (src / "src" / "machine_id_agent" / "_build_marker.py").write_text(f"MARKER = 'upgrade {n}'\n")
        pid0 = _main_pid(host)
        with _loops(host, f"upgrade {n}"):
            run = fleet.rollout(extra_args=["-e", f"machine_id_agent_source={src}"])
            assert run.rc == 0, run.stdout[-8000:]
        now = _sh(host, f"readlink {AGENT}").stdout.strip().split("/")[4]
        assert now not in used, (now, used)
        assert _releases(host) == sorted([used[-1], now]), (_releases(host), used, now)
        assert _wheel_sets(host) == sorted([used[-1], now, "NOTES.local"]), (_wheel_sets(host), used, now)
        used.append(now)
        # the pre-release venv went with this install (its own names only): the layout's names and the admin's file
        assert sorted(_sh(host, "ls -A /opt/machine-id-agent").stdout.split()) == \
            ["README.local", "bin", "lanyard-wheels.key", "releases", "wheels"]
        assert _sh(host, "ls -A /opt/machine-id-agent/bin").stdout.split() == ["machine-id-agent"]
        marker = host.run(agent_python_argv("import machine_id_agent._build_marker as m; print(m.MARKER)"),
                          check=False)
        assert marker.stdout.strip() == f"upgrade {n}", marker.stderr
        pid = _main_pid(host)
        assert pid != pid0 and _runs_from(host, pid) == f"/opt/machine-id-agent/releases/{now}", \
            (pid0, pid, _runs_from(host, pid), now)
        assert agent_status(host)["identity"]["state"] == "ok"
    assert fleet.token_creations() == tokens
    again = fleet.rollout(extra_args=["-e", f"machine_id_agent_source={sources / 'agent-2'}"])
    assert again.rc == 0 and changed_by_host(again)[HOST] == 0, again.stdout[-4000:]


def test_3_an_agent_left_running_an_earlier_release_is_found_and_restarted(fleet, sources):
    """A run cut after the command's switch, before its handlers, leaves the service running the release the command
    left while the command and the install record name the new one. Made by hand here: the service restarted from
    the other release kept, then the command switched back. The no-change path names the difference (the service's
    main process against the command), the run restarts the agent onto the release (without a token), the release
    the agent ran from is not removed under it, and the next run changes nothing."""
    host = fleet.hosts[HOST]
    extra = ["-e", f"machine_id_agent_source={sources / 'agent-2'}"]
    now = _sh(host, f"readlink {AGENT}").stdout.strip().split("/")[4]
    (other,) = [r for r in _releases(host) if r != now]
    rel = "/opt/machine-id-agent/releases"
    _sh(host, f"ln -sfn {rel}/{other}/bin/machine-id-agent {AGENT} && systemctl restart machine-id"
              f" && ln -sfn {rel}/{now}/bin/machine-id-agent {AGENT}")
    pid0 = _main_pid(host)
    assert _runs_from(host, pid0) == f"{rel}/{other}", _runs_from(host, pid0)
    tokens = fleet.token_creations()
    run = fleet.rollout(extra_args=extra)
    assert run.rc == 0, run.stdout[-8000:]
    report = [r["result"].get("msg", "") for r in run.results if r["host"] == HOST and r["task"].endswith(REPORT_TASK)]
    assert report and f"machine-id.service: runs the agent from {rel}/{other}, but {AGENT} is {rel}/{now}'s" \
        in report[0], report
    pid = _main_pid(host)
    assert pid != pid0 and _runs_from(host, pid) == f"{rel}/{now}", (pid0, pid, _runs_from(host, pid))
    assert _releases(host) == sorted([other, now])
    assert agent_status(host)["identity"]["state"] == "ok"
    assert fleet.token_creations() == tokens
    again = fleet.rollout(extra_args=extra)
    assert again.rc == 0 and changed_by_host(again)[HOST] == 0, again.stdout[-4000:]


def _build_wheels(source: Path, target: str) -> Path:
    """The wheel set of ``source`` for ``target``, made by the role's own controller-side builder (cached)."""
    build_dir = Path.home() / ".cache" / "lanyard" / "agent-wheels"
    r = subprocess.run([sys.executable, str(REPO / "roles/machine_id/files/build_wheels.py"), str(source),
                        str(build_dir), target], capture_output=True, text=True, check=False, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])["targets"][target]
    assert "dir" in got, got
    return Path(got["dir"])


def test_4_prebuilt_wheels_rebuilt_under_the_same_name_are_installed(fleet, sources, tmp_path):
    """machine_id_agent_wheels_dir: the set's key is made of each wheel's name and checksum, so an agent wheel
    rebuilt from changed source under the same name (same version) is installed as a new release; the loops never
    fail; the next run changes nothing."""
    host = fleet.hosts[HOST]
    run = fleet.rollout(extra_args=["-e", f"machine_id_agent_source={sources / 'agent-2'}"])
    assert run.rc == 0 and changed_by_host(run)[HOST] == 0, run.stdout[-4000:]
    target = [r["result"] for r in run.results if r["host"] == HOST and r["task"].endswith(STATE_TASK)][0][
        "wheel_target"]
    prebuilt = tmp_path / "prebuilt"
    shutil.copytree(_build_wheels(sources / "agent-2", target), prebuilt)
    extra = ["-e", f"machine_id_agent_wheels_dir={prebuilt}"]
    run = fleet.rollout(extra_args=extra)  # a new key (names and checksums): one more release, same agent
    assert run.rc == 0, run.stdout[-8000:]
    first = _sh(host, f"readlink {AGENT}").stdout.strip().split("/")[4]

    # the agent rebuilt from changed source, same version: the same file name
    src = sources / "agent-rebuilt"
    shutil.copytree(sources / "agent-2", src)
    (src / "src" / "machine_id_agent" / "_build_marker.py").write_text("MARKER = 'rebuilt'\n")
    rebuilt = [w for w in _build_wheels(src, target).iterdir() if w.name.startswith("machine_id_agent-")]
    assert len(rebuilt) == 1 and (prebuilt / rebuilt[0].name).exists(), (rebuilt, sorted(prebuilt.iterdir()))
    shutil.copy2(rebuilt[0], prebuilt / rebuilt[0].name)
    pid0 = _main_pid(host)
    with _loops(host, "rebuilt wheel"):
        run = fleet.rollout(extra_args=extra)
        assert run.rc == 0, run.stdout[-8000:]
    now = _sh(host, f"readlink {AGENT}").stdout.strip().split("/")[4]
    assert now != first and _releases(host) == sorted([first, now]), (first, now, _releases(host))
    marker = host.run(agent_python_argv("import machine_id_agent._build_marker as m; print(m.MARKER)"), check=False)
    assert marker.stdout.strip() == "rebuilt", marker.stderr
    pid = _main_pid(host)
    assert pid != pid0 and _runs_from(host, pid) == f"/opt/machine-id-agent/releases/{now}"
    again = fleet.rollout(extra_args=extra)
    assert again.rc == 0 and changed_by_host(again)[HOST] == 0, again.stdout[-4000:]


def test_5_a_host_of_a_collection_with_inline_kubeconfigs_is_upgraded_to_the_exec_plugin(bed, tmp_path_factory):
    """A host rolled out by a collection whose kubeconfig held the credentials inline (and whose agent had no
    ``init --check``): the current collection turns it into the exec-plugin kubeconfig and a release, while a
    kubectl loop as the reader never fails; the identity goes on (no token, no bot call, one join, no lock), the
    difference report names the agent's ACLs as not judged rather than with its usage error, and the next run changes
    nothing."""
    fleet = Fleet(tmp_path_factory.mktemp("upgrade-inline"), teleport=bed.teleport["multiplex"], kube=bed.kube)
    name = "up-inline"
    try:
        fleet.add_hosts([name])
        host = fleet.hosts[name]
        fleet.collections_path = _collection_at(tmp_path_factory, INLINE)
        run = fleet.rollout(extra_args=_own_build_dir(fleet))
        assert run.rc == 0, run.stdout[-8000:]
        kubeconfig = host.root / DEST.lstrip("/") / "kubeconfig.yaml"
        assert "client-key-data" in kubeconfig.read_text() and "exec:" not in kubeconfig.read_text()
        gen0 = _generation(host)
        fleet.collections_path = None
        tokens, calls = fleet.token_creations(), fleet.tctl_calls()
        with _loops(host, "upgrade from inline kubeconfigs", plugin=False):
            run = fleet.rollout()
            assert run.rc == 0, run.stdout[-8000:]
        report = [r["result"].get("msg", "") for r in run.results
                  if r["host"] == name and r["task"].endswith(REPORT_TASK)]
        print("[inline upgrade drift]", report)
        assert report and f"{DEST}: ACLs not judged: the installed agent is older than init --check" in report[0] \
            and "unrecognized arguments" not in report[0], report
        text = kubeconfig.read_text()
        assert "exec:" in text and "client-key-data" not in text, text[:500]
        assert fleet.reader_get_pods(name).returncode == 0
        _assert_the_identity_went_on(fleet, host, tokens, calls, gen0)
        again = fleet.rollout()
        assert again.rc == 0 and changed_by_host(again)[name] == 0, again.stdout[-4000:]
    finally:
        fleet.stop()
