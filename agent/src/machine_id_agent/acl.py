# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""POSIX access ACLs on output directories and files, written straight to the
``system.posix_acl_access`` extended attribute (no setfacl/getfacl needed).

The exact ACL (the same on every run, so "changed" is honest):

    directory                         file
    user::rwx                         user::rw-
    user:<writer>:rwx  (bot user,     user:<writer>:rw-   (only when the writer
                        if not owner)                       is not the file's owner)
    user:<reader>:r-x  (each reader)  user:<reader>:r--
    group::---                        group::---
    mask::<union of named entries>    mask::<union of named entries>
    other::---                        other::---

No default ACL is ever set; named group entries are removed. Without named entries the ACL is just the
mode: 0700 for directories, 0600 for files.

Xattr format (Linux ``posix_acl_xattr``): a little-endian u32 version (2), then one 8-byte entry per line:
u16 tag, u16 permission bits, u32 uid/gid (0xffffffff where it does not apply), ordered by tag then id.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from machine_id_agent import fsutil
from machine_id_agent.errors import ConfigError, OutputError

XATTR = "system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
R, W, X = 4, 2, 1
_TAGNAMES = {USER_OBJ: "user", USER: "user", GROUP_OBJ: "group", GROUP: "group", MASK: "mask", OTHER: "other"}
NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)

Target = Union[int, str, Path]


@dataclass(frozen=True, order=True)
class Entry:
    tag: int
    id: int
    perm: int


def encode(entries: Iterable[Entry]) -> bytes:
    out = [struct.pack("<I", VERSION)]
    for e in sorted(entries):
        out.append(struct.pack("<HHI", e.tag, e.perm, e.id))
    return b"".join(out)


def decode(blob: bytes) -> List[Entry]:
    if len(blob) < 4 or (len(blob) - 4) % 8:
        raise ValueError("malformed ACL xattr (%d bytes)" % len(blob))
    (version,) = struct.unpack_from("<I", blob, 0)
    if version != VERSION:
        raise ValueError("unsupported ACL xattr version %d" % version)
    entries = []
    for off in range(4, len(blob), 8):
        tag, perm, ident = struct.unpack_from("<HHI", blob, off)
        if tag not in (USER, GROUP):
            ident = UNDEFINED_ID
        entries.append(Entry(tag, ident, perm & 7))
    return sorted(entries)


def from_mode(mode: int) -> List[Entry]:
    return [Entry(USER_OBJ, UNDEFINED_ID, (mode >> 6) & 7), Entry(GROUP_OBJ, UNDEFINED_ID, (mode >> 3) & 7),
            Entry(OTHER, UNDEFINED_ID, mode & 7)]


def _perm_text(p: int) -> str:
    return ("r" if p & R else "-") + ("w" if p & W else "-") + ("x" if p & X else "-")


def _uname(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _gname(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def to_text(entries: Iterable[Entry]) -> str:
    """getfacl-like short text: user::rw-,user:app:r--,group::---,mask::r--,other::---"""
    parts = []
    for e in sorted(entries):
        q = ""
        if e.tag == USER:
            q = _uname(e.id)
        elif e.tag == GROUP:
            q = _gname(e.id)
        parts.append("%s:%s:%s" % (_TAGNAMES[e.tag], q, _perm_text(e.perm)))
    return ",".join(parts)


def _stat(target: Target) -> os.stat_result:
    return os.fstat(target) if isinstance(target, int) else os.stat(str(target), follow_symlinks=False)


def read(target: Target) -> List[Entry]:
    """The access ACL of a path or fd; a file without the xattr gets the ACL its mode implies."""
    t = target if isinstance(target, int) else str(target)
    try:
        blob = os.getxattr(t, XATTR) if isinstance(t, int) else os.getxattr(t, XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return from_mode(_stat(target).st_mode)
        raise
    return decode(blob)


def write(target: Target, entries: Iterable[Entry]) -> None:
    t = target if isinstance(target, int) else str(target)
    data = encode(entries)
    if isinstance(t, int):
        os.setxattr(t, XATTR, data)
    else:
        os.setxattr(t, XATTR, data, follow_symlinks=False)


def desired(is_dir: bool, owner_uid: int, writers: Iterable[int] = (), readers: Iterable[int] = ()) -> List[Entry]:
    full = R | W | X if is_dir else R | W
    ro = R | X if is_dir else R
    named: Dict[int, int] = {}
    for uid in writers:
        if uid != owner_uid:
            named[uid] = full
    for uid in readers:
        if uid != owner_uid and uid not in named:
            named[uid] = ro
    entries = [Entry(USER_OBJ, UNDEFINED_ID, full), Entry(GROUP_OBJ, UNDEFINED_ID, 0),
               Entry(OTHER, UNDEFINED_ID, 0)]
    mask = 0
    for uid, perm in named.items():
        entries.append(Entry(USER, uid, perm))
        mask |= perm
    if named:
        entries.append(Entry(MASK, UNDEFINED_ID, mask))
    return sorted(entries)


def plain_mode(is_dir: bool) -> int:
    return 0o700 if is_dir else 0o600


def named_users(entries: Iterable[Entry]) -> Tuple[List[int], List[int]]:
    """(writers, readers) among the named user entries of an ACL."""
    writers, readers = [], []
    for e in entries:
        if e.tag != USER or not e.perm & R:
            continue
        if e.perm & W:
            writers.append(e.id)
        else:
            readers.append(e.id)
    return sorted(writers), sorted(readers)


def resolve_user(name: Union[str, int], what: str) -> int:
    if isinstance(name, int):
        return name
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ConfigError("%s: user %r does not exist on this host; create it (useradd) or fix the name"
                          % (what, name)) from None


def resolve_group(name: Union[str, int], what: str) -> int:
    if isinstance(name, int):
        return name
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ConfigError("%s: group %r does not exist on this host; create it (groupadd) or fix the name"
                          % (what, name)) from None


class AclPolicy:
    """Applies the exact ACL to output files and directories according to ``acls: try|required|off``.

    ``warn`` is called once with a one-line message when ACLs turn out to be unsupported under ``try``.
    """

    def __init__(self, mode: str = "try", readers: Sequence[int] = (), writers: Sequence[int] = (),
                 warn: Optional[Callable[[str], None]] = None):
        if mode not in ("try", "required", "off"):
            raise ConfigError("acls: %r is not one of try, required, off" % mode)
        self.mode = mode
        self.readers = list(readers)
        self.writers = list(writers)
        self.warn = warn or (lambda msg: None)
        self.supported: Optional[bool] = None if mode != "off" else False
        self._warned = False
        self.dry_run = False  # report what ensure() would change, change nothing (init --check)

    def _unsupported(self, where: str, err: OSError) -> None:
        if self.mode == "required":
            raise OutputError("%s: the filesystem does not support POSIX ACLs (%s) and acls is 'required'; "
                              "mount it with ACL support or set acls: try" % (where, err.strerror or err))
        self.supported = False
        if not self._warned:
            self._warned = True
            self.warn("%s: the filesystem does not support POSIX ACLs; falling back to mode 0600/0700, so readers "
                      "cannot read the outputs (set acls: off to silence this)" % where)

    def ensure(self, target: Target, is_dir: bool, where: str, owner_uid: Optional[int] = None) -> bool:
        """Make the ACL (or plain mode) of ``target`` exact. Returns True if something changed."""
        st = _stat(target)
        owner = st.st_uid if owner_uid is None else owner_uid
        if self.supported is not False:
            want = desired(is_dir, owner, self.writers, self.readers)
            try:
                have = read(target)
                if have == want:
                    self.supported = True
                    return False
                if self.dry_run:
                    self.supported = True
                    return True
                write(target, want)
                self.supported = True
                if self.mode == "required":
                    got = read(target)
                    if got != want:
                        raise OutputError("%s: the filesystem did not keep the ACL (reads back %s, want %s) and acls "
                                          "is 'required'; mount it with ACL support or set acls: try"
                                          % (where, to_text(got), to_text(want)))
                return True
            except OSError as e:
                if e.errno in NOT_SUPPORTED:
                    self._unsupported(where, e)
                elif e.errno == errno.EPERM:
                    raise OutputError("%s: cannot set its ACL: the agent's user (uid %d) does not own it (owner uid "
                                      "%d); run 'machine-id-agent init' as root or chown it to the agent's user"
                                      % (where, os.geteuid(), st.st_uid)) from None
                elif e.errno in fsutil.NO_SPACE:  # an ACL is an extended attribute: it takes space too
                    raise fsutil.no_space_from(where, where, e) from None
                else:
                    raise OutputError("%s: cannot set its ACL (%s)" % (where, e.strerror or e)) from None
        mode = plain_mode(is_dir)
        if stat.S_IMODE(st.st_mode) == mode:
            return False
        if self.dry_run:
            return True
        try:
            if isinstance(target, int):
                os.fchmod(target, mode)
            else:
                os.chmod(str(target), mode)
        except OSError as e:
            raise OutputError("%s: cannot chmod it to %o (%s); chown it to the agent's user"
                              % (where, mode, e.strerror or e)) from None
        return True

    def verify(self, target: Target, is_dir: bool) -> Optional[str]:
        """None if ``target`` has the exact ACL, else a short description of what differs."""
        st = _stat(target)
        if self.supported is not False:
            try:
                want = desired(is_dir, st.st_uid, self.writers, self.readers)
                have = read(target)
            except OSError as e:
                if e.errno in NOT_SUPPORTED and self.mode != "required":
                    return None if stat.S_IMODE(st.st_mode) == plain_mode(is_dir) else "mode is not %o" % plain_mode(is_dir)
                return "cannot read ACL: %s" % (e.strerror or e)
            return None if have == want else "ACL is %s, want %s" % (to_text(have), to_text(want))
        mode = plain_mode(is_dir)
        return None if stat.S_IMODE(st.st_mode) == mode else "mode is %o, want %o" % (stat.S_IMODE(st.st_mode), mode)


def probe(directory: Target) -> Optional[OSError]:
    """None if ``directory`` (a path or an fd) can hold access ACLs, else the error (EOPNOTSUPP when the fs
    has none)."""
    try:
        os.getxattr(directory if isinstance(directory, int) else str(directory), XATTR)
        return None
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        return e


ARTIFACTS = ("key", "tlscert", "teleport-host-ca.crt", "kubeconfig.yaml", "identity", "identity.validity.json")


@dataclass
class InitResult:
    changed: bool
    path: str
    acl: str
    acls_used: bool
    actions: List[str]


XATTR_DEFAULT = "system.posix_acl_default"


def make_private(fd: int, mode: str, where: str, warn: Optional[Callable[[str], None]] = None) -> bool:
    """The storage directory's ACL under ``acls`` (``fd`` is the open directory): ``try``/``required`` remove
    every named user/group entry and any default ACL, so the directory is 0700 and nothing more, and
    ``required`` fails where ACLs cannot be read or set; ``off`` does not touch ACLs. Returns True if
    something changed."""
    if mode == "off":
        return False
    policy = AclPolicy(mode, warn=warn)
    changed = False
    try:
        have = read(fd)
    except OSError as e:
        if e.errno in NOT_SUPPORTED:
            policy._unsupported(where, e)  # raises under required
            return False
        raise OutputError("%s: cannot read its ACL (%s)" % (where, e.strerror or e)) from None
    if any(e.tag in (USER, GROUP, MASK) for e in have):
        st = os.fstat(fd)
        policy.ensure(fd, True, where, owner_uid=st.st_uid)
        changed = True
    try:
        os.getxattr(fd, XATTR_DEFAULT)
        os.removexattr(fd, XATTR_DEFAULT)
        changed = True
    except OSError as e:
        if e.errno not in (errno.ENODATA,) + NOT_SUPPORTED:
            raise OutputError("%s: cannot remove its default ACL (%s); run setfacl -k %s"
                              % (where, e.strerror or e, where)) from None
    return changed


def init_dir(directory: Union[str, Path], owner_uid: int, owner_gid: int, bot_uid: int, reader_uids: Sequence[int],
             mode: str = "try", warn: Optional[Callable[[str], None]] = None,
             symlinks: str = fsutil.DEFAULT_SYMLINKS, dry_run: bool = False) -> InitResult:
    """Create ``directory`` if needed, chown it to the owner and give it (and any output files in it) the exact
    ACL. The path is opened under ``symlinks`` (see fsutil), and every change is made through the opened
    descriptor, so a symlink swapped into the path cannot redirect the chown or the ACL. ``mode`` off touches
    no ACL (plain 0700/0600). Idempotent: the second run reports changed=False. ``dry_run`` (``init --check``,
    the role's check mode) changes nothing and reports, as ``actions``, what a real run would do."""
    if mode not in ("try", "required", "off"):
        raise ConfigError("--acls: %r is not one of try, required, off" % mode)
    path = str(directory)
    actions: List[str] = []
    if not path.startswith("/"):
        raise ConfigError("--init-dir: %r is not an absolute path; pass it like /opt/machine-id" % path)
    path = os.path.normpath(path)
    if path == "/":
        raise ConfigError("--init-dir: / cannot be a destination; pass a directory like /opt/machine-id")
    parent, name = os.path.split(path)
    if dry_run and not os.path.lexists(path):
        owner = "%s:%s" % (_uname(owner_uid), _gname(owner_gid))
        return InitResult(changed=True, path=path, acl="", acls_used=mode != "off",
                          actions=["would create %s" % path, "would chown %s" % owner,
                                   "would set the acl of %s" % path])
    with fsutil.open_dir(parent, symlinks, create=None if dry_run else 0o755, warn=warn) as pd:
        try:
            os.stat(name, dir_fd=pd.fd, follow_symlinks=False)
        except FileNotFoundError:
            try:
                os.mkdir(name, 0o700, dir_fd=pd.fd)
            except OSError as e:
                raise OutputError("%s: cannot create it (%s); run init as root or create the parent directory"
                                  % (path, e.strerror or e)) from None
            actions.append("created %s" % path)
    with fsutil.open_dir(path, symlinks, warn=warn) as d:
        st = d.stat()
        owner_known = None
        if (st.st_uid, st.st_gid) != (owner_uid, owner_gid) and dry_run:
            actions.append("would chown %s:%s" % (_uname(owner_uid), _gname(owner_gid)))
            owner_known = owner_uid
        elif (st.st_uid, st.st_gid) != (owner_uid, owner_gid):
            try:
                os.fchown(d.fd, owner_uid, owner_gid)
            except OSError as e:
                raise OutputError("%s: cannot chown it to %s:%s (%s); run init as root"
                                  % (path, _uname(owner_uid), _gname(owner_gid), e.strerror or e)) from None
            actions.append("chown %s:%s" % (_uname(owner_uid), _gname(owner_gid)))
        policy = AclPolicy(mode, readers=reader_uids, writers=[bot_uid], warn=warn)
        policy.dry_run = dry_run
        if mode == "off":
            if [u for u in reader_uids if u != owner_uid] and warn is not None:
                warn("%s: acls is 'off', so the readers (%s) get no access; set acls: try to let them read"
                     % (path, ", ".join(_uname(u) for u in reader_uids)))
        else:
            err = probe(d.fd)
            if err is not None and err.errno in NOT_SUPPORTED:
                policy._unsupported(path, err)
        verb = "would set the acl of" if dry_run else "acl"
        if policy.ensure(d.fd, True, path, owner_uid=owner_known if dry_run else None):
            actions.append("%s %s" % (verb, path))
        changed_files = apply_files(d, policy)
        actions += ["%s %s" % (verb, f) for f in changed_files]
        final = read(d.fd) if policy.supported else from_mode(d.stat().st_mode)
    return InitResult(changed=bool(actions), path=path, acl=to_text(final), acls_used=bool(policy.supported),
                      actions=actions)


def apply_files(d: "fsutil.Dir", policy: AclPolicy, names: Iterable[str] = ARTIFACTS) -> List[str]:
    """Give the output files already in ``d`` the policy's ACL (through O_NOFOLLOW descriptors; a symlink is
    refused). Returns the paths that changed."""
    changed = []
    for name in names:
        fd = d.open_file(name)
        if fd is None:
            continue
        try:
            if policy.ensure(fd, False, d.name(name)):
                changed.append(d.name(name))
        finally:
            os.close(fd)
    return changed


def runtime_policy(directory: Target, mode: str, config_readers: Sequence[int],
                   warn: Optional[Callable[[str], None]] = None, managed: bool = False,
                   revoke: Iterable[int] = (), where: Optional[str] = None) -> AclPolicy:
    """The policy for writes into an output directory at run time (``directory`` is a path or an fd).

    Writers: the named users with write access on the directory's ACL (the bot's own entry that init set; the
    agent's user is never dropped). Readers: with ``managed`` (the output lists ``readers:``) exactly the
    config's readers; otherwise the readers init named on the directory plus the config's readers. Users in
    ``revoke`` (removed from ``readers:`` at a reload) lose their entry either way, unless they are writers."""
    where = where or str(directory)
    writers: List[int] = []
    on_acl: List[int] = []
    if mode != "off":
        try:
            writers, on_acl = named_users(read(directory))
        except OSError as e:
            if e.errno not in NOT_SUPPORTED:
                raise OutputError("%s: cannot read its ACL (%s)" % (where, e.strerror or e)) from None
    gone = set(revoke) - set(config_readers)
    readers: List[int] = [u for u in config_readers if u not in writers]
    if not managed:
        readers += [u for u in on_acl if u not in readers and u not in gone and u not in writers]
    return AclPolicy(mode, readers=readers, writers=writers, warn=warn)
