# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 11, points 4, 5, 6 and 8 on the real bed (Teleport v13 + kube-apiserver, both listener modes), with
the agent running as the unprivileged bot user and a real attacker process running as another local user:

- a symlink swapped into a parent directory of the destination / of the storage during renewals: nothing is
  written through it, and the agent reports the error;
- ``acls: required`` on a filesystem without ACLs (ramfs) fails with one clear line; ``acls: off`` sets no ACL;
- a reader removed from ``readers:`` + SIGHUP: the removed user is denied, the kept one still reads;
- two destinations, one made unwritable: the other keeps renewing, and the bot generation rises once per
  interval (a failed output is not retried by renewing the identity again).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time

import pytest

import testbed as tb
from machine_id_agent import identity as identmod

from test_agent_e2e import free_port, getfacl, http_get, kubeconfig_pair, metric, wait_for  # noqa: E402

BOT_USER, APP_USER, OTHER_USER = "lanyardtest-bot", "lanyardtest-app", "lanyardtest-other"  # see conftest.py
FILES = ("key", "tlscert", "teleport-host-ca.crt", "identity", "identity.validity.json", "kubeconfig.yaml")

pytestmark = [pytest.mark.testbed]


@pytest.fixture(scope="module")
def teleport(teleport_multiplex):
    """One listener mode: symlink swaps, ownership, ACLs and unwritable directories are on the host's file system,
    the same in both modes (the transports are tested in both elsewhere)."""
    return teleport_multiplex


def _mkdir(path, uid, gid, mode):
    path.mkdir(mode=mode)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _renewals(diag):
    return int(metric(diag, "renewals_total")), int(metric(diag, "renewal_failures_total"))


def _cycle_after(p, diag, before, what):
    """SIGHUP (a reload runs a cycle that writes the outputs; it renews the identity only when due), then wait
    until one more cycle (good or failed) has finished."""
    p.send_signal(signal.SIGHUP)
    return wait_for(lambda: sum(_renewals(diag)) > sum(before) and _renewals(diag), 60, what, interval=0.1)


def _good_cycle_after(h, p, diag, before, what):
    """SIGHUP, then wait for a successful cycle (one still running from before may fail first)."""
    p.send_signal(signal.SIGHUP)
    try:
        return wait_for(lambda: _renewals(diag)[0] > before[0] and _renewals(diag), 60, what, interval=0.1)
    except AssertionError as e:
        raise AssertionError("%s\n--- agent log (end):\n%s" % (e, h.log()[-3000:])) from None


class Attacker:
    """A process running as OTHER_USER that swaps ``victim`` (a directory in a directory the attacker owns) for
    a symlink to ``lure`` and back, as fast as it can (``hold`` > 0: keeps each state that many seconds)."""

    SCRIPT = r"""
import os, sys, time
victim, lure, stop, hold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
aside = victim + ".real"
n = 0
while not os.path.exists(stop):
    os.rename(victim, aside)
    os.symlink(lure, victim)
    time.sleep(hold)
    os.unlink(victim)
    os.rename(aside, victim)
    n += 1
    time.sleep(hold)
print(n)
"""

    def __init__(self, host, victim, lure, hold):
        self.stop_file = host.root / ("stop-%s" % os.path.basename(str(victim)))
        script = host.root / "attacker.py"
        script.write_text(self.SCRIPT)
        os.chmod(script, 0o644)
        self.p = subprocess.Popen(["runuser", "-u", OTHER_USER, "--", "/usr/bin/python3", str(script), str(victim),
                                   str(lure), str(self.stop_file), str(hold)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")

    def finish(self) -> int:
        self.stop_file.write_text("")
        out, err = self.p.communicate(timeout=30)
        assert self.p.returncode == 0, err
        return int(out.strip())


def _swap_and_hold(victim, lure, uid):
    """The attacker's swap, held: ``victim`` becomes a symlink (owned by the attacker) to ``lure``."""
    os.rename(victim, str(victim) + ".real")
    os.symlink(str(lure), str(victim))
    os.lchown(str(victim), uid, uid)


def _swap_back(victim):
    os.unlink(victim)
    os.rename(str(victim) + ".real", victim)


# --- 4: symlinks swapped into a parent directory during renewals --------------------------------------------
def test_symlink_swapped_into_the_destination_parent_writes_nothing_through_it(teleport, make_host):
    diag = "127.0.0.1:%d" % free_port()
    extra = dict(certificate_ttl="1m", renewal_interval="5s", diag_addr=diag)
    h = make_host(teleport, **extra)
    other = h.users[OTHER_USER]
    attic = h.root / "attic"  # owned by the attacker: the destination's grandparent
    _mkdir(attic, other, other, 0o755)
    _mkdir(attic / "parent", other, other, 0o755)
    lure = attic / "lure"  # where the attacker wants the credentials: a directory the bot could write
    _mkdir(lure, other, other, 0o755)
    _mkdir(lure / "machine-id", other, other, 0o777)
    h.dest = attic / "parent" / "machine-id"
    h.write_config(destinations=[{"directory": str(h.dest), "kubernetes_cluster": tb.KUBE_CLUSTER_NAME}], **extra)
    r = h.init()
    assert r.returncode == 0, r.stderr
    p = h.start()
    wait_for(lambda: http_get("http://%s/readyz" % diag)[0] == 200, 60, "first outputs (/readyz 200)")
    assert h.pods_as(APP_USER).returncode == 0

    # held swap: the cycle fails, names the symlink, writes nothing in the lure
    _swap_and_hold(attic / "parent", lure, other)
    before = _renewals(diag)
    after = _cycle_after(p, diag, before, "a cycle with the parent swapped for a symlink")
    assert after[1] == before[1] + 1, (before, after, h.log()[-2000:])
    assert "%s is a symlink that the agent will not follow" % (attic / "parent") in h.log()
    assert os.listdir(lure / "machine-id") == []
    _swap_back(attic / "parent")
    good = _cycle_after(p, diag, after, "recovery after the swap is undone")
    assert good[0] == after[0] + 1, h.log()[-2000:]

    # racing swaps during renewals (every 5 s) and extra output cycles (SIGHUP every 0.3 s): never a byte in
    # the lure
    gen0 = identmod.load(h.storage).generation
    atk = Attacker(h, attic / "parent", lure, 0.01)
    end = time.monotonic() + 40
    while time.monotonic() < end:
        p.send_signal(signal.SIGHUP)
        time.sleep(0.3)
    swaps = atk.finish()
    renewed = identmod.load(h.storage).generation - gen0
    final = _renewals(diag)
    assert os.listdir(lure / "machine-id") == []
    assert p.poll() is None
    ok, failed = final[0] - good[0], final[1] - good[1]
    print("[paths] mode=%s swaps=%d cycles ok=%d refused=%d, bot renewals during the attack %d"
          % (teleport.mode, swaps, ok, failed, renewed))
    assert swaps > 100 and failed >= 1 and ok >= 1 and renewed >= 4, (swaps, ok, failed, renewed)
    # after the attack the outputs are renewed again and readable
    _good_cycle_after(h, p, diag, final, "a good cycle after the attack")
    assert h.pods_as(APP_USER).returncode == 0
    assert "Traceback" not in h.log()


def test_symlink_swapped_into_the_storage_parent_writes_nothing_through_it(teleport, make_host):
    diag = "127.0.0.1:%d" % free_port()
    extra = dict(certificate_ttl="1m", renewal_interval="5s", diag_addr=diag)
    h = make_host(teleport, **extra)
    bot, other = h.users[BOT_USER], h.users[OTHER_USER]
    attic = h.root / "attic"
    _mkdir(attic, other, other, 0o755)
    _mkdir(attic / "parent", other, other, 0o755)
    lure = attic / "lure"
    _mkdir(lure, other, other, 0o755)
    _mkdir(lure / "bot", other, other, 0o777)
    shutil.rmtree(h.storage)
    h.storage = attic / "parent" / "bot"
    _mkdir(h.storage, bot, bot, 0o700)
    h.write_config(storage={"directory": str(h.storage)}, **extra)
    assert h.init().returncode == 0
    p = h.start()
    wait_for(lambda: http_get("http://%s/readyz" % diag)[0] == 200, 60, "first outputs (/readyz 200)")
    gen0 = identmod.load(h.storage).generation

    _swap_and_hold(attic / "parent", lure, other)
    before = _renewals(diag)
    after = _cycle_after(p, diag, before, "a cycle with the storage parent swapped for a symlink")
    assert after[1] == before[1] + 1, (before, after, h.log()[-2000:])
    assert "%s is a symlink that the agent will not follow" % (attic / "parent") in h.log(), h.log()[-2000:]
    assert os.listdir(lure / "bot") == []
    _swap_back(attic / "parent")
    good = _cycle_after(p, diag, after, "recovery after the swap is undone")
    assert good[0] == after[0] + 1, h.log()[-2000:]

    atk = Attacker(h, attic / "parent", lure, 0.01)
    end = time.monotonic() + 40
    while time.monotonic() < end:
        p.send_signal(signal.SIGHUP)
        time.sleep(0.3)
    swaps = atk.finish()
    final = _renewals(diag)
    assert os.listdir(lure / "bot") == []
    ok, failed = final[0] - good[0], final[1] - good[1]
    print("[paths] storage mode=%s swaps=%d cycles ok=%d refused=%d, generation %d -> %d"
          % (teleport.mode, swaps, ok, failed, gen0, identmod.load(h.storage).generation))
    assert swaps > 100 and failed >= 1 and ok >= 1, (swaps, ok, failed)
    # every identity renewed during the attack kept the join token's hash (CI, stop 24: a renewal that read the
    # hash while the directory was swapped away stored none, and the agent then re-joined with the spent token
    # every cycle until the identity expired)
    assert identmod.stored_token_hash(h.storage) == identmod.token_hash(h.token)
    assert "the configured token changed" not in h.log(), h.log()[-3000:]
    # the bot is not locked and the identity on disk is the one the server expects: one more renewal works
    _good_cycle_after(h, p, diag, final, "a good cycle after the attack")
    assert identmod.load(h.storage).generation > gen0
    assert "Traceback" not in h.log()


def test_storage_owned_by_another_user_or_group_writable_is_refused(teleport, make_host):
    h = make_host(teleport)
    assert h.init().returncode == 0
    os.chown(h.storage, h.users[OTHER_USER], h.users[OTHER_USER])
    os.chmod(h.storage, 0o777)
    r = h.oneshot()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "owned by %s, not by the agent's user %s" % (OTHER_USER, BOT_USER) in r.stderr, r.stderr
    assert "chown %s: %s && chmod 0700 %s" % (BOT_USER, h.storage, h.storage) in r.stderr, r.stderr
    assert "identity.json" not in os.listdir(h.storage) and not h.dest.joinpath("kubeconfig.yaml").exists()
    os.chown(h.storage, h.users[BOT_USER], h.users[BOT_USER])
    os.chmod(h.storage, 0o770)
    r = h.oneshot()
    assert r.returncode != 0 and "writable by its group (mode 0770" in r.stderr, r.stderr
    os.chmod(h.storage, 0o700)
    r = h.oneshot()
    assert r.returncode == 0, r.stderr


# --- 5: acls required / off ---------------------------------------------------------------------------------
@pytest.fixture
def ramfs(public_root):
    """A filesystem without POSIX ACLs (ramfs has no xattrs at all)."""
    d = public_root / ("noacl-%d" % os.getpid())
    d.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0755", "ramfs", str(d)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        pytest.fail("cannot mount a ramfs at %s (%s); the test needs root and mount" % (d, r.stderr.strip()),
                    pytrace=False)
    try:
        with pytest.raises(OSError) as ei:
            os.getxattr(str(d), "system.posix_acl_access")
        assert ei.value.errno == errno.EOPNOTSUPP
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_acls_required_on_a_filesystem_without_acls_fails_clearly(teleport, make_host, ramfs):
    h = make_host(teleport)
    h.dest = ramfs / ("machine-id-%s" % teleport.mode)
    h.write_config(destinations=[{"directory": {"path": str(h.dest), "acls": "required"},
                                  "kubernetes_cluster": tb.KUBE_CLUSTER_NAME}])
    # init refuses (the destination's acls: required)
    r = h.init()
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "%s: the filesystem does not support POSIX ACLs" % h.dest in lines[0], lines
    assert "acls is 'required'; mount it with ACL support or set acls: try" in lines[0], lines
    # with acls: try, init works and warns; then the agent itself refuses under required
    r = h.run("init", "-c", str(h.config_path), "--init-dir", str(h.dest), "--bot-user", BOT_USER,
              "--owner", "%s:%s" % (BOT_USER, BOT_USER), "--reader-user", APP_USER, "--acls", "try", as_bot=False)
    assert r.returncode == 0 and "does not support POSIX ACLs; falling back" in r.stderr, r.stderr
    r = h.oneshot()
    assert r.returncode == 6, (r.returncode, r.stderr)
    assert "does not support POSIX ACLs" in r.stderr and "acls is 'required'" in r.stderr and \
        "Traceback" not in r.stderr, r.stderr
    assert os.listdir(h.dest) == []
    # acls: try on the same filesystem writes 0600 files and warns
    h.write_config(destinations=[{"directory": {"path": str(h.dest), "acls": "try"},
                                  "kubernetes_cluster": tb.KUBE_CLUSTER_NAME}])
    r = h.oneshot()
    assert r.returncode == 0 and "does not support POSIX ACLs" in r.stderr, r.stderr
    assert sorted(os.listdir(h.dest)) == sorted(FILES)
    assert all((h.dest / f).stat().st_mode & 0o777 == 0o600 for f in FILES)


def test_acls_off_sets_no_acl(teleport, make_host):
    h = make_host(teleport)
    h.write_config(destinations=[{"directory": {"path": str(h.dest), "acls": "off"}, "readers": [APP_USER],
                                  "kubernetes_cluster": tb.KUBE_CLUSTER_NAME}])
    r = h.init()
    assert r.returncode == 0 and "acls is 'off', so the readers" in r.stderr, r.stderr
    r = h.oneshot()
    assert r.returncode == 0, r.stderr
    for p in [h.dest] + [h.dest / f for f in FILES]:
        with pytest.raises(OSError) as ei:
            os.getxattr(str(p), "system.posix_acl_access")
        assert ei.value.errno == errno.ENODATA, p
        owner = "user::rwx" if p == h.dest else "user::rw-"
        want = [owner, "group::---", "other::---"]
        assert getfacl(p) == want, (p, getfacl(p))
    denied = h.as_user(APP_USER, "cat", str(h.dest / "key"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


# --- 6: revocation at reload --------------------------------------------------------------------------------
def test_reader_removed_and_sighup_denies_the_removed_user(teleport, make_host):
    diag = "127.0.0.1:%d" % free_port()
    h = make_host(teleport, diag_addr=diag)  # default TTL and renewal interval
    dest = [{"directory": str(h.dest), "kubernetes_cluster": tb.KUBE_CLUSTER_NAME, "readers": [APP_USER, OTHER_USER]}]
    h.write_config(destinations=dest, diag_addr=diag)
    assert h.init(APP_USER, OTHER_USER).returncode == 0
    p = h.start()
    wait_for(lambda: http_get("http://%s/readyz" % diag)[0] == 200, 60, "first outputs (/readyz 200)")
    for user in (APP_USER, OTHER_USER):
        assert h.pods_as(user).returncode == 0, user
        for f in FILES:
            assert h.as_user(user, "cat", str(h.dest / f)).returncode == 0, (user, f)
    # stop Teleport from mattering: the revocation is applied by the reload itself, not by the next renewal
    dest[0]["readers"] = [APP_USER]
    h.write_config(destinations=dest, diag_addr=diag)
    t0 = time.monotonic()
    p.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: applied the readers of %s (%s); removed %s" % (h.dest, APP_USER, OTHER_USER)
             in h.log(), 30, "the reload to re-apply the readers", interval=0.05)
    revoked_after = time.monotonic() - t0
    for f in FILES:
        denied = h.as_user(OTHER_USER, "cat", str(h.dest / f))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, (f, denied.stdout[:40])
        assert h.as_user(APP_USER, "cat", str(h.dest / f)).returncode == 0, f
        assert not any(OTHER_USER in e for e in getfacl(h.dest / f)), getfacl(h.dest / f)
    assert not any(OTHER_USER in e for e in getfacl(h.dest))
    other = h.pods_as(OTHER_USER)
    assert other.returncode != 0 and "permission denied" in other.stderr.lower(), other.stderr
    assert h.pods_as(APP_USER).returncode == 0
    # and after the renewal the reload triggers, still denied
    wait_for(lambda: metric(diag, "renewals_total") >= 2, 60, "the renewal after the reload")
    assert h.as_user(OTHER_USER, "cat", str(h.dest / "key")).returncode != 0
    assert h.pods_as(APP_USER).returncode == 0
    print("[paths] mode=%s reader revoked %.2fs after SIGHUP" % (teleport.mode, revoked_after))


# --- 8: independent outputs ---------------------------------------------------------------------------------
def test_one_unwritable_destination_the_other_keeps_renewing(teleport, make_host):
    diag = "127.0.0.1:%d" % free_port()
    interval = 4.0
    h = make_host(teleport, certificate_ttl="1m", renewal_interval="4s", diag_addr=diag)
    a, b = h.root / "dest-a", h.root / "dest-b"
    h.write_config(certificate_ttl="1m", renewal_interval="4s", diag_addr=diag, destinations=[
        {"directory": str(a), "kubernetes_cluster": tb.KUBE_CLUSTER_NAME},
        {"directory": str(b), "kubernetes_cluster": tb.KUBE_CLUSTER_NAME}])
    for d in (a, b):
        h.dest = d
        assert h.init().returncode == 0
    p = h.start()
    wait_for(lambda: http_get("http://%s/readyz" % diag)[0] == 200, 60, "first outputs (/readyz 200)")
    # b becomes unwritable for the bot: root-owned 0755
    os.chown(b, 0, 0)
    os.chmod(b, 0o755)
    b_before = (b / "identity").read_bytes()  # the kubeconfig itself (exec plugin) does not change
    wait_for(lambda: "output %s" % b in h.log(), 30, "the first failure of b")
    gen0 = identmod.load(h.storage).generation
    renewed0 = h.log().count("renewed the bot identity")
    t0 = time.monotonic()
    serials = set()
    while time.monotonic() - t0 < 10 * interval:
        cert, _doc = kubeconfig_pair(a / "kubeconfig.yaml")
        serials.add(cert.serial_number)
        time.sleep(0.5)
    window = time.monotonic() - t0
    renewed_a = h.log().count("renewed the bot identity") - renewed0
    gen1 = identmod.load(h.storage).generation
    renewed_b = h.log().count("renewed the bot identity") - renewed0
    rises = gen1 - gen0
    print("[paths] mode=%s window=%.1fs interval=%.0fs generation +%d, dest-a certificates %d"
          % (teleport.mode, window, interval, rises, len(serials)))
    # at most once per interval (jitter 0.9..1.0, counted from the end of a cycle): never a renewal per retry of
    # the failed output; and it keeps renewing
    assert window / (2 * interval) <= rises <= window / (0.9 * interval) + 1, (rises, window)
    assert renewed_a <= rises <= renewed_b + 1, (rises, renewed_a, renewed_b)  # stored before it is logged
    assert len(serials) >= rises - 1, "dest-a gets new credentials every cycle"
    assert (b / "identity").read_bytes() == b_before
    kc = subprocess.run(["runuser", "-u", APP_USER, "--", str(h.kubectl_bin),
                         "--kubeconfig=%s" % (a / "kubeconfig.yaml"), "--request-timeout=20s", "get", "pods", "-n", tb.DEMO_NAMESPACE, "-o", "name"],
                        capture_output=True, text=True, cwd="/", check=False)
    assert kc.returncode == 0, kc.stderr
    status = {o["destination"]: o for o in h.status()["outputs"]}
    assert status[str(a)]["valid"]
    code, body = http_get("http://%s/readyz" % diag)
    assert code != 200 and str(b) in body, (code, body)
    # b writable again: it is written by the next cycle
    os.chown(b, h.users[BOT_USER], h.users[BOT_USER])
    os.chmod(b, 0o700)
    wait_for(lambda: (b / "identity").read_bytes() != b_before, 3 * interval, "dest-b written again")
    wait_for(lambda: http_get("http://%s/readyz" % diag)[0] == 200, 3 * interval, "ready again")
    assert p.poll() is None and "Traceback" not in h.log()
