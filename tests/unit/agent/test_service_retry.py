# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Retries after outputs failed, against the fake backend of test_service.py, with the agent's real loop: a
retry writes only the outputs that failed, yet the others are still renewed on their schedule; a full
destination's filesystem is not asked for certificates while nothing was freed there (frees add up, a destination
not created yet counts, a full storage beside it too); a cycle that re-established trust writes every output."""

from __future__ import annotations

import errno
import os
import time

import test_service
from machine_id_agent import fsutil
from machine_id_agent.identity import StorageError
from machine_id_agent.service import Agent
from test_service import FakeBackend, FakeClient
from test_service_outputs import _fail_writes_under, two_outputs

logbuf = test_service.logbuf  # a fixture


def kube(be, cluster):
    return len([c for c in be.calls if c[0] == "kube" and c[2] == cluster])


def test_the_other_outputs_are_renewed_on_schedule_while_one_stays_full(tmp_path, logbuf, monkeypatch):
    """b full for 9 s at renewal_interval 2s: the retries write b only, but a is renewed every interval."""
    be = FakeBackend()
    cfg = two_outputs(tmp_path, watch_ca_rotations=False, renewal_interval="2s", certificate_ttl="10s")
    agent = Agent(cfg, backend=be, log=logbuf[0], rnd=lambda: 0.0)
    _fail_writes_under(monkeypatch, tmp_path / "b", errno.ENOSPC)
    monkeypatch.setattr(fsutil, "free_space", lambda path: (0, 1000))

    def steps(seen):
        time.sleep(9)
        seen["ka"], seen["failures"] = kube(be, "ka"), agent.failures

    rc, seen = test_service._run_beside(agent, steps)
    assert "error" not in seen, seen.get("error")
    assert rc == 0 and seen["failures"] >= 4, seen
    assert seen["ka"] >= 3, "a renewed at every interval (about 4 in 9 s), not only by the first cycle: %r" % seen


def test_the_other_outputs_next_renewal_is_not_pushed_back_by_a_retry(tmp_path, logbuf, monkeypatch):
    """renewal_interval 8s, b full for 7.5 s: a, written by the failed cycle at t0, is next written by the cycle
    due at t0 + 8 s. Neither a retry's backoff (retries at 1, 3 and 7 s; the next would be 15 s) nor a retry that
    succeeds may push that cycle back (before: t0 + 15 s or later)."""
    be = FakeBackend()
    cfg = two_outputs(tmp_path, watch_ca_rotations=False, renewal_interval="8s", certificate_ttl="40s")
    agent = Agent(cfg, backend=be, log=logbuf[0], rnd=lambda: 1.0)
    full = _fail_writes_under(monkeypatch, tmp_path / "b", errno.ENOSPC)
    monkeypatch.setattr(fsutil, "free_space", lambda path: None)
    times = {}
    orig = FakeClient.kube_credentials

    def kube_credentials(self, cluster, roles, ttl):
        times.setdefault(cluster, []).append(time.monotonic())
        return orig(self, cluster, roles, ttl)

    monkeypatch.setattr(FakeClient, "kube_credentials", kube_credentials)

    def steps(seen):
        test_service._wait_for(lambda: agent.failures >= 1, "the first failure")
        time.sleep(7.5)
        full["on"] = False
        test_service._wait_for(lambda: len(times.get("ka", [])) >= 2, "a written again", t=30)

    rc, seen = test_service._run_beside(agent, steps)
    assert "error" not in seen, seen.get("error")
    gap = times["ka"][1] - times["ka"][0]
    assert 7 < gap < 11, "a rewritten %.1f s after the failed cycle (interval 8 s)" % gap


def test_a_raised_quota_is_written_by_the_next_scheduled_cycle(tmp_path, logbuf, monkeypatch):
    """EDQUOT, then the quota is raised: statvfs shows nothing freed, so the retries skip b; the next scheduled
    cycle writes it."""
    be = FakeBackend()
    cfg = two_outputs(tmp_path, watch_ca_rotations=False, renewal_interval="2s", certificate_ttl="10s")
    agent = Agent(cfg, backend=be, log=logbuf[0], rnd=lambda: 0.0)
    quota = _fail_writes_under(monkeypatch, tmp_path / "b", errno.EDQUOT)
    monkeypatch.setattr(fsutil, "free_space", lambda path: (10 << 30, 1000))

    def steps(seen):
        test_service._wait_for(lambda: agent.failures >= 1, "the first failure")
        quota["on"] = False  # quota raised
        test_service._wait_for(lambda: agent.snapshot()["ready"], "b written", t=15)

    rc, seen = test_service._run_beside(agent, steps)
    assert "error" not in seen, seen.get("error")


def test_small_frees_add_up_against_the_failed_write(tmp_path, logbuf, monkeypatch):
    """At the default interval (20m) only a retry can write b: 40 KiB freed between two looks each time; the
    second look sees 80 KiB more than at the failed write (over ROOM_MARGIN), so that retry writes b."""
    be = FakeBackend()
    agent = Agent(two_outputs(tmp_path, watch_ca_rotations=False), backend=be, log=logbuf[0], rnd=lambda: 0.0)
    full = _fail_writes_under(monkeypatch, tmp_path / "b", errno.ENOSPC)
    looks = {"n": 0}

    def free_space(path):
        looks["n"] += 1
        return looks["n"] * 40 * 1024, 1000

    monkeypatch.setattr(fsutil, "free_space", free_space)

    def steps(seen):
        test_service._wait_for(lambda: agent.failures >= 1, "the first failure")
        full["on"] = False
        test_service._wait_for(lambda: agent.snapshot()["ready"], "b written once 80 KiB were freed", t=15)
        seen["kb"] = kube(be, "kb")

    rc, seen = test_service._run_beside(agent, steps)
    assert "error" not in seen, seen.get("error")
    assert seen["kb"] == 2, "the first attempt, then the retry after 80 KiB (not the one after 40 KiB): %r" % seen


def test_a_destination_not_created_on_a_full_filesystem_asks_for_no_certificate_again(tmp_path, logbuf,
                                                                                      monkeypatch):
    be = FakeBackend()
    agent = Agent(two_outputs(tmp_path, watch_ca_rotations=False), backend=be, log=logbuf[0], rnd=lambda: 0.0)
    real = os.mkdir
    target = str(tmp_path / "b")

    def mkdir(path, *args, **kwargs):
        if str(path) == target or (kwargs.get("dir_fd") is not None and path == "b"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    real_statvfs = os.statvfs

    def statvfs(path):  # the real call (FileNotFoundError for b), constant figures (/tmp changes under load)
        real_statvfs(path)
        return os.statvfs_result((4096, 4096, 1000, 0, 0, 1000, 500, 500, 0, 255))

    monkeypatch.setattr(os, "statvfs", statvfs)

    def steps(seen):
        test_service._wait_for(lambda: agent.failures >= 4, "four attempts")
        seen["kb"], seen["error"] = kube(be, "kb"), agent.outputs[target].last_error

    rc, seen = test_service._run_beside(agent, steps)
    assert seen["kb"] == 1, seen
    assert "no space left on the filesystem of %s" % target in seen["error"], seen


def test_a_full_storage_beside_a_full_destination_asks_for_no_certificate_again(tmp_path, logbuf, monkeypatch):
    """Storage and destination b on one full filesystem (the storage problem is the cycle's error): the retries
    ask for b's certificate no more while nothing is freed, and leave a (written) alone."""
    be = FakeBackend()
    agent = Agent(two_outputs(tmp_path, watch_ca_rotations=False), backend=be, log=logbuf[0], rnd=lambda: 0.0)
    assert agent.attempt() is None
    agent._force_renew = True  # the identity is due
    be.storage_error = StorageError("storage full")
    _fail_writes_under(monkeypatch, tmp_path / "b", errno.ENOSPC)
    monkeypatch.setattr(fsutil, "free_space", lambda path: (0, 1000))

    def steps(seen):
        test_service._wait_for(lambda: agent.failures >= 4, "four attempts")
        seen["ka"], seen["kb"] = kube(be, "ka"), kube(be, "kb")

    rc, seen = test_service._run_beside(agent, steps)
    assert "error" not in seen, seen.get("error")
    assert seen["kb"] == 2 and seen["ka"] == 2, "the first cycle and the one that met the full disk: %r" % seen


def test_trust_re_established_in_a_retry_writes_every_output(tmp_path, logbuf, monkeypatch):
    be = FakeBackend()
    agent = Agent(two_outputs(tmp_path, watch_ca_rotations=False), backend=be, log=logbuf[0])
    full = _fail_writes_under(monkeypatch, tmp_path / "b", errno.ENOSPC)
    monkeypatch.setattr(fsutil, "free_space", lambda path: None)
    err = agent.attempt()
    assert err.details["failed"] == [str(tmp_path / "b")]
    full["on"] = False
    monkeypatch.setattr(FakeClient, "ensure_trust", lambda self: "host CA re-read after a missed rotation",
                        raising=False)
    be.calls.clear()
    agent._retry_outputs = set(err.details["failed"])  # what _loop sets for the retry
    assert agent.attempt() is None
    assert kube(be, "ka") == 1 and kube(be, "kb") == 1, "a gets the current host CA too: %r" % be.calls
