# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""fsutil: opening storage and destination paths without following symlinks an attacker could plant
(symlinks: secure / try-secure / insecure), the storage directory's owner and mode checks, and writes through
an open directory descriptor. Runs as root (chown to other users, root-owned directories under /run)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from machine_id_agent import acl, fsutil
from machine_id_agent.errors import OutputError

NOBODY = 65534


@pytest.fixture(autouse=True)
def _root():
    """These tests chown to other users and make directories under /run: they need root (CI and `make test` run
    as root). Without it they fail with the fix; they never skip."""
    if os.geteuid() != 0:
        pytest.fail("tests/unit/agent/test_paths.py needs root (chown to other users, directories under /run); run "
                    "`make test` as root", pytrace=False)


@pytest.fixture
def rootdir():
    """A directory only root can change, reached from / through directories only root can change (under
    /run), so symlinks in it count as root's."""
    for st in (os.stat("/"), os.stat("/run")):
        assert fsutil.root_only(st), "/ and /run must be root-owned and not writable by others here"
    d = Path(tempfile.mkdtemp(prefix="h4-paths-", dir="/run"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_plain_path_is_opened_and_created(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    with fsutil.open_dir(target, "secure", create=0o700) as d:
        d.write("f", b"x")
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (target / "f").read_bytes() == b"x"
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o755
    with pytest.raises(OutputError, match="does not exist"):
        fsutil.open_dir(tmp_path / "missing", "try-secure")


@pytest.mark.parametrize("mode", ["secure", "try-secure"])
def test_symlink_in_a_user_writable_directory_is_refused(tmp_path, mode):
    (tmp_path / "real").mkdir()
    os.symlink(str(tmp_path / "real"), str(tmp_path / "link"))
    with pytest.raises(fsutil.PathError) as ei:
        fsutil.open_dir(tmp_path / "link" / "dest", mode, create=0o700)
    msg = str(ei.value)
    assert "%s is a symlink that the agent will not follow" % (tmp_path / "link") in msg
    assert str((tmp_path / "real").resolve()) in msg  # the fix names the real directory
    assert not (tmp_path / "real" / "dest").exists()
    # the final component too
    with pytest.raises(fsutil.PathError):
        fsutil.open_dir(tmp_path / "link", mode)


def test_insecure_follows_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("real", str(tmp_path / "link"))
    with fsutil.open_dir(tmp_path / "link" / "dest", "insecure", create=0o700) as d:
        d.write("f", b"y")
    assert (tmp_path / "real" / "dest" / "f").read_bytes() == b"y"


def test_root_owned_symlink_in_root_only_directories(rootdir, tmp_path):
    (rootdir / "real").mkdir(mode=0o755)
    os.symlink("real", str(rootdir / "link"))
    # try-secure follows a link only root could have placed
    with fsutil.open_dir(rootdir / "link" / "dest", "try-secure", create=0o700) as d:
        d.write("f", b"z")
    assert (rootdir / "real" / "dest" / "f").read_bytes() == b"z"
    # secure follows no symlink at all (tbot's RESOLVE_NO_SYMLINKS)
    with pytest.raises(fsutil.PathError, match="symlinks is 'secure'.*try-secure"):
        fsutil.open_dir(rootdir / "link" / "dest", "secure")
    # a link owned by another user, even in a root-only directory, is refused
    os.symlink("real", str(rootdir / "ulink"))
    os.lchown(str(rootdir / "ulink"), NOBODY, NOBODY)
    with pytest.raises(fsutil.PathError, match="owned by nobody, not root"):
        fsutil.open_dir(rootdir / "ulink", "try-secure")
    # a root link in a directory others can write is refused
    (rootdir / "open").mkdir()
    os.chmod(rootdir / "open", 0o777)
    os.symlink(str(rootdir / "real"), str(rootdir / "open" / "l"))
    with pytest.raises(fsutil.PathError, match="writable by others"):
        fsutil.open_dir(rootdir / "open" / "l", "try-secure")


def test_target_of_a_trusted_link_is_walked_with_the_same_rules(rootdir, tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(str(tmp_path / "real"), str(tmp_path / "ulink"))  # in /tmp: anyone could have put it there
    os.symlink(str(tmp_path / "ulink"), str(rootdir / "link"))  # root's link, pointing at the user link
    with pytest.raises(fsutil.PathError, match="%s is a symlink" % (tmp_path / "ulink")):
        fsutil.open_dir(rootdir / "link", "try-secure")
    # relative targets with ".." resolve against the real parent
    (rootdir / "x").mkdir(mode=0o755)
    (rootdir / "y").mkdir(mode=0o755)
    os.symlink("../y", str(rootdir / "x" / "up"))
    with fsutil.open_dir(rootdir / "x" / "up", "try-secure") as d:
        assert os.path.samestat(d.stat(), os.stat(rootdir / "y"))


def test_below_a_directory_others_can_change_no_symlink_is_followed(tmp_path):
    # /tmp is world-writable: even a root-owned 0755 directory below it does not make its links trusted
    sub = tmp_path / "rootowned"
    sub.mkdir(mode=0o755)
    (sub / "real").mkdir()
    os.symlink("real", str(sub / "link"))
    assert fsutil.root_only(os.stat(sub))
    with pytest.raises(fsutil.PathError, match="a directory above it can be changed by a non-root user"):
        fsutil.open_dir(sub / "link", "try-secure")


def test_symlink_loop_is_reported(rootdir):
    os.symlink("b", str(rootdir / "a"))
    os.symlink("a", str(rootdir / "b"))
    with pytest.raises(fsutil.PathError, match="too many levels of symlinks"):
        fsutil.open_dir(rootdir / "a", "try-secure")


def test_not_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(fsutil.PathError, match="is not a directory"):
        fsutil.open_dir(tmp_path / "f" / "d", "try-secure", create=0o700)


def test_writes_replace_a_planted_file_symlink_and_reads_refuse_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(str(victim), str(dest / "key"))
    with fsutil.open_dir(dest, "secure") as d:
        with pytest.raises(fsutil.PathError, match="key: is a symlink"):
            d.read("key")
        d.write("key", b"secret")
        assert d.read("key") == b"secret"
    assert victim.read_bytes() == b"untouched"
    assert not (dest / "key").is_symlink()


def test_swapping_a_parent_for_a_symlink_never_redirects_a_write(tmp_path):
    """A thread swaps the destination's parent between a real directory and a symlink to another directory
    while the main thread writes; nothing may ever land in the other directory."""
    parent = tmp_path / "parent"
    aside = tmp_path / "parent.real"
    elsewhere = tmp_path / "elsewhere"
    (parent / "dest").mkdir(parents=True)
    (elsewhere / "dest").mkdir(parents=True)
    stop = threading.Event()
    swaps = [0]

    def swapper():
        while not stop.is_set():
            os.rename(parent, aside)
            os.symlink(str(elsewhere), str(parent))
            time.sleep(0.002)
            os.unlink(parent)
            os.rename(aside, parent)
            swaps[0] += 1
            time.sleep(0.002)

    t = threading.Thread(target=swapper)
    t.start()
    ok = refused = i = 0
    end = time.monotonic() + 20
    try:
        while (ok < 50 or refused < 50) and time.monotonic() < end:
            i += 1
            try:
                with fsutil.open_dir(parent / "dest", "try-secure") as d:
                    d.write("kubeconfig.yaml", b"%d" % i)
                ok += 1
            except OutputError:
                refused += 1
    finally:
        stop.set()
        t.join()
    assert os.listdir(elsewhere / "dest") == []
    assert ok >= 50 and refused >= 50, "the swaps did not overlap the writes enough"
    print("swaps=%d written=%d refused=%d" % (swaps[0], ok, refused))


def test_storage_must_belong_to_the_agent_and_not_be_writable_by_others(tmp_path):
    st = tmp_path / "bot"
    st.mkdir()
    os.chown(st, NOBODY, NOBODY)
    with pytest.raises(fsutil.PathError) as ei:
        fsutil.open_private_dir(st)
    assert "owned by nobody, not by the agent's user root" in str(ei.value)
    assert "fix: chown root: %s && chmod 0700 %s" % (st, st) in str(ei.value)
    os.chown(st, 0, 0)
    os.chmod(st, 0o770)
    with pytest.raises(fsutil.PathError, match=r"writable by its group \(mode 0770.*chmod 0700"):
        fsutil.open_private_dir(st)
    os.chmod(st, 0o757)
    with pytest.raises(fsutil.PathError, match="writable by others"):
        fsutil.open_private_dir(st)
    os.chmod(st, 0o755)  # readable only: tightened
    with fsutil.open_private_dir(st) as d:
        d.write("identity.json", b"{}")
    assert stat.S_IMODE(os.stat(st).st_mode) == 0o700
    # created when missing, mode 0700
    with fsutil.open_private_dir(tmp_path / "new" / "bot") as d:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_storage_acl_entries_are_removed_unless_acls_off(tmp_path):
    if shutil.which("setfacl") is None or acl.probe(tmp_path) is not None:
        pytest.fail("needs setfacl and a filesystem with ACLs (run scripts/bootstrap.sh)", pytrace=False)
    st = tmp_path / "bot"
    st.mkdir(mode=0o700)
    subprocess.run(["setfacl", "-m", "u:nobody:r-x", "-m", "d:u:nobody:r", str(st)], check=True)
    with fsutil.open_private_dir(st, acls="off"):
        pass
    assert "user:nobody:r-x" in subprocess.run(["getfacl", "-p", str(st)], capture_output=True, text=True,
                                               check=True).stdout
    with fsutil.open_private_dir(st, acls="try"):
        pass
    out = subprocess.run(["getfacl", "-p", str(st)], capture_output=True, text=True, check=True).stdout
    assert "nobody" not in out and "default:" not in out, out
    # a named entry with write access shows as group-writable: refused, with the setfacl fix
    subprocess.run(["setfacl", "-m", "u:nobody:rwx", str(st)], check=True)
    with pytest.raises(fsutil.PathError, match="setfacl -b"):
        fsutil.open_private_dir(st)


def test_secure_storage_under_a_symlink_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("real", str(tmp_path / "lib"))
    with pytest.raises(fsutil.PathError, match="symlink"):
        fsutil.open_private_dir(tmp_path / "lib" / "bot", "try-secure")
    assert not (tmp_path / "real" / "bot").exists()


def test_temp_helpers_and_cleanup(tmp_path):
    with fsutil.open_dir(tmp_path, "secure") as d:
        fd, tmp = d.create_temp("identity.json")
        os.write(fd, b"new")
        os.close(fd)
        assert stat.S_IMODE(os.stat(tmp_path / tmp).st_mode) == 0o600
        d.replace(tmp, "identity.json")
        assert d.read("identity.json") == b"new"
        fd, _tmp = d.create_temp("identity.json")
        os.close(fd)
        assert d.clean_temp_files() == 1
        assert d.statvfs().f_bsize > 0
    assert sorted(os.listdir(tmp_path)) == ["identity.json"]


def test_unknown_symlinks_mode():
    with pytest.raises(fsutil.PathError, match="not one of secure, try-secure, insecure"):
        fsutil.open_dir("/tmp", "sometimes")


def test_a_destination_the_agent_cannot_create_names_init(rootdir):
    """As an unprivileged user in a root-owned 0755 directory: the error says to run init as root."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody and try
        code = 1
        try:
            os.close(r)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                fsutil.open_dir(rootdir / "machine-id", "try-secure", create=0o700)
                msg = "opened"
            except OutputError as e:
                msg = str(e)
            os.write(w, msg.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    assert os.waitpid(pid, 0)[1] == 0
    assert msg == ("%s: %s does not exist and the agent's user (nobody) cannot create it (Permission denied); run "
                   "'machine-id-agent init' as root first, or create it owned by that user"
                   % (rootdir / "machine-id", rootdir / "machine-id")), msg
