# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The per-output loop of a cycle and the reload hook, against the fake backend of test_service.py:
outputs are independent (one failing destination does not stop the others, the cycle reports it by name,
retrying does not renew the bot identity again) and a reader removed from ``readers:`` loses access at the
reload, before any new credentials."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest
import yaml

from machine_id_agent import acl, fsutil
from machine_id_agent.errors import OutputError, RenewError
from machine_id_agent.service import Agent

import test_service
from test_service import FakeBackend, FakeClient, make_cfg

logbuf = test_service.logbuf  # a fixture

NOBODY, DAEMON = 65534, 1
FILES = ("key", "tlscert", "teleport-host-ca.crt", "identity", "identity.validity.json", "kubeconfig.yaml")


def two_outputs(tmp_path, **extra):
    return make_cfg(tmp_path, destinations=[
        {"directory": str(tmp_path / "a"), "kubernetes_cluster": "ka"},
        {"directory": str(tmp_path / "b"), "kubernetes_cluster": "kb"}], **extra)


def renewals(be):
    return [c for c in be.calls if c[0] in ("renew", "join")]


def test_one_failing_destination_does_not_stop_the_other(tmp_path, logbuf):
    be = FakeBackend()
    (tmp_path / "b").write_text("not a directory")  # destination b cannot be written
    agent = Agent(two_outputs(tmp_path), backend=be, log=logbuf[0])
    err = agent.attempt()
    assert isinstance(err, OutputError)
    assert str(err).startswith("1 of 2 outputs failed (%s: " % (tmp_path / "b")), str(err)
    assert "is not a directory" in str(err) and "written: %s" % (tmp_path / "a") in str(err)
    assert err.details == {"failed": [str(tmp_path / "b")], "written": [str(tmp_path / "a")]}
    assert sorted(os.listdir(tmp_path / "a")) == sorted(FILES)
    snap = agent.snapshot()
    by = {o["destination"]: o for o in snap["outputs"]}
    assert by[str(tmp_path / "a")]["valid"] and by[str(tmp_path / "a")]["error"] is None
    assert "is not a directory" in by[str(tmp_path / "b")]["error"] and not snap["ready"]
    assert "output %s (kb) failed" % (tmp_path / "b") in logbuf[1].getvalue()
    first = renewals(be)
    assert len(first) == 1  # one join, then both outputs
    # the retry writes the outputs again without renewing the fresh identity
    be.calls.clear()
    assert isinstance(agent.attempt(), OutputError)
    assert renewals(be) == [] and [c[2] for c in be.calls if c[0] == "kube"] == ["ka", "kb"]
    # fixed: both written, still no renewal
    (tmp_path / "b").unlink()
    be.calls.clear()
    assert agent.attempt() is None
    assert renewals(be) == [] and sorted(os.listdir(tmp_path / "b")) == sorted(FILES)
    assert agent.snapshot()["ready"]


def test_a_server_error_for_one_output_is_retryable_and_names_it(tmp_path, logbuf, monkeypatch):
    be = FakeBackend()
    orig = FakeClient.kube_credentials

    def kube(self, cluster, roles, ttl):
        if cluster == "ka":
            raise RenewError("kubernetes cluster 'ka' is not registered; check tsh kube ls")
        return orig(self, cluster, roles, ttl)

    monkeypatch.setattr(FakeClient, "kube_credentials", kube)
    agent = Agent(two_outputs(tmp_path), backend=be, log=logbuf[0])
    err = agent.attempt()
    assert isinstance(err, RenewError) and err.retryable
    assert "1 of 2 outputs failed (%s: kubernetes cluster 'ka' is not registered" % (tmp_path / "a") in str(err)
    assert sorted(os.listdir(tmp_path / "b")) == sorted(FILES)


def test_single_output_error_names_it(tmp_path, logbuf):
    be = FakeBackend()
    (tmp_path / "out").write_text("x")
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    err = agent.attempt()
    assert isinstance(err, OutputError) and str(err).startswith("output %s: " % (tmp_path / "out")), str(err)


def _getfacl(path):
    r = subprocess.run(["getfacl", "-n", "-p", "--omit-header", str(path)], capture_output=True, text=True,
                       check=True)
    return [x for x in r.stdout.splitlines() if x]


def _write_cfg(tmp_path, readers):
    p = tmp_path / "tbot.yaml"
    doc = yaml.safe_load(p.read_text())
    doc["destinations"][0]["readers"] = readers
    p.write_text(yaml.safe_dump(doc))


def test_reader_removed_at_reload_loses_access_before_any_renewal(tmp_path, logbuf):
    if acl.probe(tmp_path) is not None:
        pytest.fail("%s has no ACL support; run the unit tests on a filesystem with ACLs" % tmp_path, pytrace=False)
    be = FakeBackend()
    cfg = make_cfg(tmp_path, acls="try", destinations=[
        {"directory": str(tmp_path / "out"), "kubernetes_cluster": "k", "readers": ["nobody", "daemon"]}])
    agent = Agent(cfg, backend=be, log=logbuf[0])
    assert agent.attempt() is None
    out = tmp_path / "out"
    for p in [out] + [out / n for n in FILES]:
        assert any(e.startswith("user:%d:r" % NOBODY) for e in _getfacl(p)), p
    _write_cfg(tmp_path, ["daemon"])
    be.calls.clear()
    be.fail = RenewError("auth is down")  # the revocation must not wait for new credentials
    agent.reload_config()
    assert be.calls == []
    for p in [out] + [out / n for n in FILES]:
        facl = _getfacl(p)
        assert not any(str(NOBODY) in e for e in facl), (p, facl)
        assert any(e.startswith("user:%d:r" % DAEMON) for e in facl), (p, facl)
    assert "reload: applied the readers of %s (daemon); removed nobody" % out in logbuf[1].getvalue()
    # the next successful write keeps it that way
    be.fail = None
    assert agent.attempt() is None
    assert not any(str(NOBODY) in e for e in _getfacl(out / "key"))
    # removing the readers: key altogether still revokes the users it listed
    p = tmp_path / "tbot.yaml"
    doc = yaml.safe_load(p.read_text())
    del doc["destinations"][0]["readers"]
    p.write_text(yaml.safe_dump(doc))
    agent.reload_config()
    assert not any(str(DAEMON) in e for e in _getfacl(out)), _getfacl(out)


def _fail_writes_under(monkeypatch, directory, err):
    """os.write raises ``err`` (an errno) for every file under ``directory`` while ``state["on"]``; the real
    fsutil.Dir.write turns it into the agent's error (a full destination filesystem, seen from the agent)."""
    real = os.write
    state = {"on": True, "hits": 0}
    prefix = str(directory) + os.sep

    def write(fd, data):
        if state["on"] and os.readlink("/proc/self/fd/%d" % fd).startswith(prefix):
            state["hits"] += 1
            raise OSError(err, os.strerror(err))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return state


def test_a_full_destination_is_named_retryable_and_leaves_no_temp_file(tmp_path, logbuf, monkeypatch):
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path), backend=be, log=logbuf[0])
    assert agent.attempt() is None
    out = tmp_path / "out"
    before = {n: (out / n).read_bytes() for n in FILES}
    monkeypatch.setattr(fsutil, "free_space", lambda path: None)  # unknown: every attempt writes (see below)
    _fail_writes_under(monkeypatch, out, errno.ENOSPC)
    err = agent.attempt()
    assert isinstance(err, OutputError) and err.retryable, err
    assert str(err).startswith("output %s: %s: no space left on the filesystem of %s (No space left on device)"
                               % (out, out / "key", out)), str(err)
    assert str(err).endswith("(No space left on device); free space there: the agent retries with backoff (at most "
                             "a minute apart) and writes it once there is room"), str(err)
    assert sorted(os.listdir(out)) == sorted(FILES), "no temp file stays"
    assert {n: (out / n).read_bytes() for n in FILES} == before, "the last good outputs stay whole"
    # a quota reached is the same; a cause that needs a fix on the host is not retryable
    monkeypatch.undo()
    monkeypatch.setattr(fsutil, "free_space", lambda path: None)
    _fail_writes_under(monkeypatch, out, errno.EDQUOT)
    err = agent.attempt()
    assert err.retryable and "the agent's user reached its disk quota on the filesystem of %s (Disk quota exceeded); " \
        "free some of its space there or raise the quota: the agent writes it at its next renewal" % out in str(err), \
        str(err)
    monkeypatch.undo()
    monkeypatch.setattr(fsutil, "free_space", lambda path: None)
    _fail_writes_under(monkeypatch, out, errno.EIO)
    err = agent.attempt()
    assert isinstance(err, OutputError) and not err.retryable and "no space" not in str(err), str(err)


def test_a_full_destination_is_retried_within_seconds_at_the_default_interval(tmp_path, logbuf, monkeypatch):
    """Default renewal_interval (20m): a full destination is retried with backoff (0.5, 1, 2 s ... here, with
    rnd 0) and written as soon as space is back, without renewing the bot identity again; while nothing is freed
    on its filesystem a retry asks for no certificate; a destination that is a file (a fix on the host) waits for
    the interval."""
    be = FakeBackend()
    agent = Agent(make_cfg(tmp_path, watch_ca_rotations=False), backend=be, log=logbuf[0], rnd=lambda: 0.0)
    out = tmp_path / "out"
    full = _fail_writes_under(monkeypatch, out, errno.ENOSPC)
    room = {"free": (4096, 10)}  # what statvfs says of the destination's filesystem
    monkeypatch.setattr(fsutil, "free_space", lambda path: room["free"])

    def kube_calls():
        return len([c for c in be.calls if c[0] == "kube"])

    def steps(seen):
        test_service._wait_for(lambda: agent.failures >= 3, "three attempts at the full destination", t=20)
        seen["failures"], seen["kube_while_full"] = agent.failures, kube_calls()
        room["free"] = (4096, 11)  # an inode freed: worth a try (the write still fails)
        test_service._wait_for(lambda: kube_calls() > seen["kube_while_full"], "a try once an inode is free", t=20)
        full["on"] = False  # space is back
        room["free"] = (1 << 20, 11)
        test_service._wait_for(lambda: agent.snapshot()["ready"], "the outputs once space is back", t=20)
        seen["files"] = sorted(os.listdir(out))

    rc, seen = test_service._run_beside(agent, steps)
    assert "error" not in seen, seen.get("error")
    assert rc == 0 and seen["failures"] >= 3 and seen["files"] == sorted(FILES)
    assert seen["kube_while_full"] == 1, "only the first attempt asked for a certificate while nothing was freed"
    assert len(renewals(be)) == 1, "the retries did not renew the bot identity again"
    log = logbuf[1].getvalue()
    assert "retrying in 0s" in log or "retrying in 1s" in log
    assert "(No space left on device; nothing freed since); free space there: the agent retries" in log
    assert agent.outputs[str(out)].full is None, "forgotten once written"

    monkeypatch.undo()
    tmp2 = tmp_path / "second"
    tmp2.mkdir()
    (tmp2 / "out").write_text("not a directory")
    agent = Agent(make_cfg(tmp2, watch_ca_rotations=False), backend=FakeBackend(), log=logbuf[0], rnd=lambda: 0.0)

    def wait(seen):
        test_service._wait_for(lambda: agent.failures >= 1, "the first failure")
        time.sleep(3)
        seen["failures"] = agent.failures

    rc, seen = test_service._run_beside(agent, wait)
    assert rc == 0 and seen["failures"] == 1, seen


def test_a_retry_writes_only_the_failed_outputs_and_a_forced_cycle_tries_the_full_one(tmp_path, logbuf, monkeypatch):
    """Two outputs, b on a full filesystem: the retries ask for b's certificate only (a is not rewritten, its
    reload command not run again, no failed iteration recorded for it); nothing freed on b's filesystem, so the
    retries ask for none; SIGUSR1 (a forced cycle) tries every output however full it looks."""
    be = FakeBackend()
    marker = tmp_path / "reloads"
    cfg = make_cfg(tmp_path, watch_ca_rotations=False, destinations=[
        {"directory": str(tmp_path / "a"), "kubernetes_cluster": "ka",
         "reload_command": ["/bin/sh", "-c", "echo x >> %s" % marker]},
        {"directory": str(tmp_path / "b"), "kubernetes_cluster": "kb"}])
    agent = Agent(cfg, backend=be, log=logbuf[0], rnd=lambda: 0.0)
    _fail_writes_under(monkeypatch, tmp_path / "b", errno.ENOSPC)
    monkeypatch.setattr(fsutil, "free_space", lambda path: (0, 1000))

    def kube(cluster):
        return len([c for c in be.calls if c[0] == "kube" and c[2] == cluster])

    def steps(seen):
        test_service._wait_for(lambda: agent.failures >= 3, "three attempts", t=20)
        seen["ka"], seen["kb"], seen["reloads"] = kube("ka"), kube("kb"), len(marker.read_text().split())
        task = agent.output_tasks[str(tmp_path / "a")]
        seen["a_task"] = (task.iterations, task.failed)
        os.kill(os.getpid(), signal.SIGUSR1)
        test_service._wait_for(lambda: kube("kb") > seen["kb"], "a forced cycle asks for b's certificate", t=20)
        seen["ka_after"] = kube("ka")

    rc, seen = test_service._run_beside(agent, steps)
    assert "error" not in seen, seen.get("error")
    assert rc == 0
    assert seen["ka"] == 1 and seen["reloads"] == 1, "the retries left output a alone: %r" % seen
    assert seen["a_task"] == (1, 0), "one iteration for a (the first cycle), none failed: %r" % (seen["a_task"],)
    assert seen["kb"] == 1, "nothing freed: the retries asked for no certificate for b"
    assert seen["ka_after"] == 2, "the forced cycle wrote every output"
    assert "1 of 2 outputs failed (%s: " % (tmp_path / "b") in logbuf[1].getvalue()


def test_a_failed_output_retries_fast_when_any_failure_may_pass(tmp_path, logbuf, monkeypatch):
    """A server refusal that retrying cannot fix on output a and a full filesystem on output b: the cycle is still
    retried with backoff (b may pass soon); a host-side error alone is not."""
    be = FakeBackend()
    orig = FakeClient.kube_credentials

    def kube(self, cluster, roles, ttl):
        if cluster == "ka":
            raise RenewError("kubernetes cluster 'ka' is not registered", retryable=False)
        return orig(self, cluster, roles, ttl)

    monkeypatch.setattr(FakeClient, "kube_credentials", kube)
    _fail_writes_under(monkeypatch, tmp_path / "b", errno.ENOSPC)
    err = Agent(two_outputs(tmp_path), backend=be, log=logbuf[0]).attempt()
    assert isinstance(err, RenewError) and err.retryable, err
    assert err.details["failed"] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_a_destination_that_cannot_be_created_on_a_full_filesystem_says_so(tmp_path, monkeypatch):
    def mkdir(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "mkdir", mkdir)
    for symlinks in ("secure", "insecure"):
        with pytest.raises(OutputError) as e:
            fsutil.open_dir(str(tmp_path / "new" / "out"), symlinks, create=0o750)
        assert e.value.retryable and "no space left on the filesystem of" in str(e.value), str(e.value)
        assert str(e.value).startswith("%s: " % (tmp_path / "new" / "out")), str(e.value)
