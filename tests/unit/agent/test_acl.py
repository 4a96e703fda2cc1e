# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""ACLs written as the system.posix_acl_access xattr; checked independently with getfacl."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess

import pytest

from machine_id_agent import acl, outputs
from machine_id_agent.config import KubeOutput
from machine_id_agent.errors import ConfigError, OutputError

from test_outputs import make_creds  # noqa: E402  (same directory)

NOBODY = 65534


def getfacl(path) -> list:
    """Independent check with the acl package's getfacl (numeric ids, no header)."""
    r = subprocess.run(["getfacl", "-n", "-p", "--omit-header", str(path)], capture_output=True, text=True,
                       check=True)
    return [line for line in r.stdout.splitlines() if line and not line.startswith("#")]


@pytest.fixture
def acl_dir(tmp_path):
    if shutil.which("getfacl") is None:
        pytest.fail("getfacl is missing: run scripts/bootstrap.sh (installs the 'acl' package)", pytrace=False)
    err = acl.probe(tmp_path)
    if err is not None:
        pytest.fail("%s has no POSIX ACL support (%s); run the unit tests on a filesystem with ACLs" % (tmp_path, err),
                    pytrace=False)
    return tmp_path


def test_xattr_roundtrip_and_order():
    entries = [acl.Entry(acl.OTHER, acl.UNDEFINED_ID, 0), acl.Entry(acl.USER, 1001, 4),
               acl.Entry(acl.USER_OBJ, acl.UNDEFINED_ID, 6), acl.Entry(acl.MASK, acl.UNDEFINED_ID, 4),
               acl.Entry(acl.GROUP_OBJ, acl.UNDEFINED_ID, 0)]
    blob = acl.encode(entries)
    assert blob[:4] == b"\x02\x00\x00\x00" and len(blob) == 4 + 8 * 5
    # user_obj first: tag 1, perm 6, id 0xffffffff
    assert blob[4:12] == b"\x01\x00\x06\x00\xff\xff\xff\xff"
    assert acl.decode(blob) == sorted(entries)
    with pytest.raises(ValueError):
        acl.decode(b"\x01\x00\x00\x00")


def test_desired_acl_shapes():
    f = acl.to_text(acl.desired(False, 0, writers=[0, 1000], readers=[1001]))
    assert f == "user::rw-,user:1000:rw-,user:1001:r--,group::---,mask::rw-,other::---".replace(
        "1000", acl._uname(1000)).replace("1001", acl._uname(1001))
    d = acl.desired(True, 1000, writers=[1000], readers=[NOBODY])
    assert acl.to_text(d) == "user::rwx,user:nobody:r-x,group::---,mask::r-x,other::---"
    assert acl.desired(False, 5, writers=[5]) == acl.from_mode(0o600)


def test_init_dir_exact_acl_and_idempotent(acl_dir):
    d = acl_dir / "machine-id"
    r1 = acl.init_dir(d, 0, 0, 0, [NOBODY])
    assert r1.changed and r1.acls_used
    assert getfacl(d) == ["user::rwx", "user:%d:r-x" % NOBODY, "group::---", "mask::r-x", "other::---"]
    r2 = acl.init_dir(d, 0, 0, 0, [NOBODY])
    assert not r2.changed and r2.actions == []
    # a drifted ACL (extra group entry, default ACL untouched) is repaired and reported
    subprocess.run(["setfacl", "-m", "g:%d:rwx" % NOBODY, str(d)], check=True)
    r3 = acl.init_dir(d, 0, 0, 0, [NOBODY])
    assert r3.changed and getfacl(d) == ["user::rwx", "user:%d:r-x" % NOBODY, "group::---", "mask::r-x",
                                         "other::---"]
    # an existing output file gets the file ACL
    (d / "kubeconfig.yaml").write_text("x")
    r4 = acl.init_dir(d, 0, 0, 0, [NOBODY])
    assert r4.actions == ["acl %s" % (d / "kubeconfig.yaml")]
    assert getfacl(d / "kubeconfig.yaml") == ["user::rw-", "user:%d:r--" % NOBODY, "group::---", "mask::r--",
                                              "other::---"]
    assert not acl.init_dir(d, 0, 0, 0, [NOBODY]).changed


def test_init_dir_bot_not_owner_gets_rwx(acl_dir):
    d = acl_dir / "o"
    acl.init_dir(d, 0, 0, NOBODY, [])
    assert getfacl(d) == ["user::rwx", "user:%d:rwx" % NOBODY, "group::---", "mask::rwx", "other::---"]


def test_runtime_writes_give_readers_access_and_repair(acl_dir):
    d = acl_dir / "out"
    acl.init_dir(d, 0, 0, 0, [NOBODY])
    out = KubeOutput(destination=d, kubernetes_cluster="k")
    outputs.write_kube(out, make_creds(), "tc", outputs.KubeEndpoint("https://x:1"), acls="required")
    for name in ("key", "tlscert", "teleport-host-ca.crt", "kubeconfig.yaml"):
        assert getfacl(d / name) == ["user::rw-", "user:%d:r--" % NOBODY, "group::---", "mask::r--",
                                     "other::---"], name
    # somebody widens the directory: the next write puts it back
    subprocess.run(["setfacl", "-m", "o::rx", str(d)], check=True)
    res = outputs.write_kube(out, make_creds(), "tc", outputs.KubeEndpoint("https://x:1"), acls="required")
    assert res.acl_changes == [str(d)]
    assert getfacl(d)[-1] == "other::---"


def test_config_readers_added_at_runtime(acl_dir):
    d = acl_dir / "out2"
    out = KubeOutput(destination=d, kubernetes_cluster="k", readers=["nobody"])
    outputs.write_kube(out, make_creds(), "tc", outputs.KubeEndpoint("https://x:1"), acls="try",
                       reader_uids=[NOBODY])
    assert "user:%d:r-x" % NOBODY in getfacl(d)
    assert "user:%d:r--" % NOBODY in getfacl(d / "key")


def _no_acl_fs(monkeypatch):
    def nosup(*a, **k):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(acl.os, "setxattr", nosup)
    monkeypatch.setattr(acl.os, "getxattr", nosup)


def test_try_falls_back_to_modes_with_one_warning(tmp_path, monkeypatch):
    _no_acl_fs(monkeypatch)
    warnings = []
    d = tmp_path / "out"
    out = KubeOutput(destination=d, kubernetes_cluster="k")
    for dummy in range(2):
        outputs.write_kube(out, make_creds(), "tc", outputs.KubeEndpoint("https://x:1"), acls="try",
                           reader_uids=[NOBODY], warn=warnings.append)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert all(stat.S_IMODE((d / n).stat().st_mode) == 0o600 for n in os.listdir(d))
    assert len(warnings) == 2 and "does not support POSIX ACLs" in warnings[0]  # once per write cycle


def test_required_fails_without_acl_support(tmp_path, monkeypatch):
    _no_acl_fs(monkeypatch)
    out = KubeOutput(destination=tmp_path / "out", kubernetes_cluster="k")
    with pytest.raises(OutputError, match="does not support POSIX ACLs .* acls is 'required'"):
        outputs.write_kube(out, make_creds(), "tc", outputs.KubeEndpoint("https://x:1"), acls="required")
    with pytest.raises(OutputError, match="acls is 'required'"):
        acl.init_dir(tmp_path / "init", 0, 0, 0, [NOBODY], mode="required")


def test_unknown_user_is_config_error():
    with pytest.raises(ConfigError, match="--reader-user: user 'no-such-user-xyz' does not exist"):
        acl.resolve_user("no-such-user-xyz", "--reader-user")


# ----- issue 11: acls honoured per directory, revocation, symlink-safe init -----------------------------

DAEMON = 1  # a second existing user (Debian: daemon)


def _named(path) -> list:
    return [e for e in getfacl(path) if e.startswith("user:") and not e.startswith("user::")]


def test_runtime_policy_readers_managed_legacy_and_revoked(acl_dir):
    d = acl_dir / "rp"
    acl.init_dir(d, 0, 0, NOBODY, [DAEMON])  # init: the bot (nobody here) rwx, daemon r-x
    # legacy (no readers: key): init's readers stay, config readers are added
    p = acl.runtime_policy(str(d), "try", [])
    assert (p.writers, p.readers) == ([NOBODY], [DAEMON])
    # a reader removed at a reload goes, the bot's own entry never does
    p = acl.runtime_policy(str(d), "try", [], revoke=[DAEMON, NOBODY])
    assert (p.writers, p.readers) == ([NOBODY], [])
    # managed (readers: listed): exactly the config's readers
    p = acl.runtime_policy(str(d), "try", [], managed=True)
    assert (p.writers, p.readers) == ([NOBODY], [])
    p = acl.runtime_policy(str(d), "try", [2], managed=True)
    assert (p.writers, p.readers) == ([NOBODY], [2])
    # off: the ACL is not even read
    p = acl.runtime_policy(str(d), "off", [2])
    assert (p.writers, p.readers, p.supported) == ([], [2], False)


def test_apply_acls_revokes_a_reader_on_directory_and_files(acl_dir):
    d = acl_dir / "rev"
    acl.init_dir(d, 0, 0, 0, [])
    out = KubeOutput(destination=d, kubernetes_cluster="k", readers=["nobody", "daemon"], readers_managed=True)
    outputs.write_kube(out, make_creds(), "tc", outputs.KubeEndpoint("https://x:1"), acls="try",
                       reader_uids=[NOBODY, DAEMON])
    assert _named(d) == ["user:%d:r-x" % DAEMON, "user:%d:r-x" % NOBODY]
    out2 = KubeOutput(destination=d, kubernetes_cluster="k", readers=["daemon"], readers_managed=True)
    changes = outputs.apply_acls(out2, "try", [DAEMON], revoke=[NOBODY])
    names = ("key", "tlscert", "teleport-host-ca.crt", "identity", "identity.validity.json", "kubeconfig.yaml")
    assert sorted(changes) == sorted([str(d)] + [str(d / n) for n in names])
    for p in [d] + [d / n for n in names]:
        assert str(NOBODY) not in " ".join(getfacl(p)), p
        assert any(e.startswith("user:%d:r" % DAEMON) for e in getfacl(p)), p
    assert outputs.apply_acls(out2, "try", [DAEMON]) == []  # idempotent
    # legacy output (no readers: key): a revoke still removes the entry
    legacy = KubeOutput(destination=d, kubernetes_cluster="k")
    outputs.apply_acls(legacy, "try", [], revoke=[DAEMON])
    assert _named(d) == [] and _named(d / "key") == []
    # a destination that does not exist yet is left alone
    assert outputs.apply_acls(KubeOutput(destination=acl_dir / "nope", kubernetes_cluster="k"), "try", []) == []


def test_acls_off_sets_no_acl(acl_dir):
    d = acl_dir / "off"
    warnings = []
    r = acl.init_dir(d, 0, 0, NOBODY, [DAEMON], mode="off", warn=warnings.append)
    assert not r.acls_used and r.acl == "user::rwx,group::---,other::---"
    assert "acls is 'off', so the readers (daemon) get no access" in warnings[0]
    out = KubeOutput(destination=d, kubernetes_cluster="k", acls="off", readers=["daemon"], readers_managed=True)
    outputs.write_kube(out, make_creds(), "tc", outputs.KubeEndpoint("https://x:1"), reader_uids=[DAEMON])
    for p in [d] + sorted(d.iterdir()):
        with pytest.raises(OSError) as ei:
            os.getxattr(str(p), acl.XATTR)
        assert ei.value.errno == errno.ENODATA, p
        assert getfacl(p) == (["user::rwx", "group::---", "other::---"] if p == d else
                              ["user::rw-", "group::---", "other::---"])


def test_output_acls_default_to_the_outputs_own_setting(acl_dir, monkeypatch):
    _no_acl_fs(monkeypatch)
    out = KubeOutput(destination=acl_dir / "own", kubernetes_cluster="k", acls="required")
    with pytest.raises(OutputError, match="acls is 'required'"):
        outputs.write_kube(out, make_creds(), "tc", outputs.KubeEndpoint("https://x:1"))


def test_required_verifies_the_acl_it_wrote(acl_dir, monkeypatch):
    d = acl_dir / "ver"
    d.mkdir(mode=0o700)
    monkeypatch.setattr(acl, "write", lambda target, entries: None)  # a filesystem that drops ACLs silently
    with pytest.raises(OutputError, match="did not keep the ACL .* acls is 'required'"):
        acl.AclPolicy("required", readers=[NOBODY]).ensure(str(d), True, str(d))
    assert acl.AclPolicy("try", readers=[NOBODY]).ensure(str(d), True, str(d))  # try does not verify


def test_init_dir_does_not_follow_a_symlinked_parent(acl_dir):
    real = acl_dir / "real"
    real.mkdir()
    os.symlink(str(real), str(acl_dir / "link"))
    with pytest.raises(OutputError, match="is a symlink that the agent will not follow"):
        acl.init_dir(acl_dir / "link" / "dest", 0, 0, NOBODY, [DAEMON])
    assert not (real / "dest").exists()
    # the destination itself planted as a symlink: not chowned, not given an ACL
    victim = acl_dir / "victim"
    victim.mkdir(mode=0o700)
    os.symlink(str(victim), str(acl_dir / "dest2"))
    with pytest.raises(OutputError, match="symlink"):
        acl.init_dir(acl_dir / "dest2", NOBODY, NOBODY, NOBODY, [DAEMON])
    assert os.stat(victim).st_uid == 0 and _named(victim) == []
    # an output file planted as a symlink is refused, its target untouched
    d = acl_dir / "d3"
    acl.init_dir(d, 0, 0, 0, [])
    (acl_dir / "secret").write_text("x")
    os.symlink(str(acl_dir / "secret"), str(d / "key"))
    with pytest.raises(OutputError, match="key: is a symlink"):
        acl.init_dir(d, 0, 0, 0, [DAEMON])
    assert _named(acl_dir / "secret") == []
    # symlinks: insecure follows (tbot's meaning)
    r = acl.init_dir(acl_dir / "link" / "dest", 0, 0, 0, [DAEMON], symlinks="insecure")
    assert r.changed and (real / "dest").is_dir()


def test_init_dry_run_reports_what_a_real_run_would_change_and_changes_nothing(acl_dir):
    """init --check (the role's check mode): the actions a real run would take, nothing written."""
    d = acl_dir / "dry"
    r = acl.init_dir(d, 0, 0, 0, [NOBODY], dry_run=True)
    assert r.changed and r.actions[0] == "would create %s" % d and not os.path.lexists(d)
    acl.init_dir(d, 0, 0, 0, [NOBODY])
    (d / "kubeconfig.yaml").write_text("x")
    acl.init_dir(d, 0, 0, 0, [NOBODY])
    assert not acl.init_dir(d, 0, 0, 0, [NOBODY], dry_run=True).changed, "converged: nothing to report"
    before = (getfacl(d), getfacl(d / "kubeconfig.yaml"))
    # a new reader, and a changed owner: reported, not made
    r = acl.init_dir(d, 0, 0, 0, [NOBODY, DAEMON], dry_run=True)
    assert r.actions == ["would set the acl of %s" % d, "would set the acl of %s" % (d / "kubeconfig.yaml")]
    r = acl.init_dir(d, DAEMON, DAEMON, 0, [NOBODY], dry_run=True)
    assert "would chown daemon:daemon" in r.actions and "would set the acl of %s" % d in r.actions
    assert (getfacl(d), getfacl(d / "kubeconfig.yaml")) == before and os.stat(d).st_uid == 0
    # drift made by hand is reported too, and only the real run repairs it
    subprocess.run(["setfacl", "-m", "o::rx", str(d)], check=True)
    assert acl.init_dir(d, 0, 0, 0, [NOBODY], dry_run=True).actions == ["would set the acl of %s" % d]
    assert getfacl(d)[-1] == "other::r-x"
    assert acl.init_dir(d, 0, 0, 0, [NOBODY]).changed and getfacl(d)[-1] == "other::---"


def test_init_dry_run_with_acls_off_reports_a_mode_change(tmp_path):
    d = tmp_path / "plain"
    acl.init_dir(d, 0, 0, 0, [], mode="off")
    os.chmod(d, 0o755)
    r = acl.init_dir(d, 0, 0, 0, [], mode="off", dry_run=True)
    assert r.actions == ["would set the acl of %s" % d] and stat.S_IMODE(os.stat(d).st_mode) == 0o755
