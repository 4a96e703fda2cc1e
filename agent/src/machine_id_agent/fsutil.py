# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Opening directories without following symlinks an attacker could plant, and durable, atomic file writes.

Walking a path (``symlinks`` policy, tbot's names):

``secure``
    no component of the path may be a symlink. The walk starts at ``/`` and opens one component at a time
    with ``O_NOFOLLOW`` relative to the directory opened before it, so a symlink swapped in at any moment
    makes the open fail instead of being followed.
``try-secure`` (default)
    the same walk, but a symlink that only root could have placed is followed: the symlink is owned by root,
    sits in a directory owned by root that no one else can write (no group/other write bit, no sticky
    world-writable directory), and every directory above it is the same. Its target is walked again from
    ``/`` under the same rules. Below the first directory that a non-root user could change, nothing may be
    a symlink. (tbot falls back to following symlinks where the kernel lacks ``openat2``; this walk needs
    only ``O_NOFOLLOW`` and ``dir_fd``, so the fallback is used only where those are missing, with a warning.)
``insecure``
    the path is opened normally, following symlinks.

Once a directory is open, every file in it is created, renamed and read relative to that descriptor: a
reader sees either the old file or the new one, never a mix, and after a crash the file is one of the two.
"""

from __future__ import annotations

import errno
import os
import pwd
import secrets
import stat
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from machine_id_agent.errors import OutputError

TMP_PREFIX = ".tmp-"
# A full filesystem or a reached quota: space comes back without anyone telling the agent (a log rotated, a file
# deleted), so the service retries these with backoff rather than at the next renewal interval.
NO_SPACE = frozenset(n for n in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if n is not None)
SYMLINK_MODES = ("secure", "try-secure", "insecure")
DEFAULT_SYMLINKS = "try-secure"
MAX_SYMLINK_HOPS = 40

_O_PATH = getattr(os, "O_PATH", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# the secure walk needs openat() with O_NOFOLLOW|O_DIRECTORY and the *at() calls used below
CAN_WALK = bool(_O_NOFOLLOW and _O_DIRECTORY and os.open in os.supports_dir_fd and os.mkdir in os.supports_dir_fd
                and os.stat in os.supports_dir_fd and os.readlink in os.supports_dir_fd)

Warn = Optional[Callable[[str], None]]
PathLike = Union[str, Path]


class PathError(OutputError):
    """A storage or destination path is unsafe to use (symlink, wrong owner, writable by others)."""


def _uname(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def _components(path: str) -> List[str]:
    return [c for c in path.split("/") if c and c != "."]


def _join(parts: Sequence[str]) -> str:
    return "/" + "/".join(parts)


def root_only(st: os.stat_result) -> bool:
    """A directory only root can change: owned by root, no group/other write bit (a sticky 1777 directory
    like /tmp lets anyone create entries, so it does not count)."""
    return st.st_uid == 0 and not st.st_mode & 0o022


def check_symlinks_mode(mode: str, what: str = "symlinks") -> str:
    if mode not in SYMLINK_MODES:
        raise PathError("%s: %r is not one of secure, try-secure, insecure" % (what, mode))
    return mode


class Dir:
    """An open directory (``fd`` is O_RDONLY|O_DIRECTORY) and the path it was opened as. All file
    operations are relative to ``fd``, so renaming or replacing a parent directory cannot redirect them."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path

    def __enter__(self) -> "Dir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def name(self, name: str) -> str:
        return os.path.join(self.path, name)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def listdir(self) -> List[str]:
        return os.listdir(self.fd)

    def open_file(self, name: str, flags: int = os.O_RDONLY) -> Optional[int]:
        """An fd of the regular file ``name`` (never through a symlink); None if it does not exist."""
        try:
            fd = os.open(name, flags | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PathError("%s: is a symlink; remove it, the agent writes regular files there"
                                % self.name(name)) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise PathError("%s: is not a regular file; remove it, the agent writes regular files there"
                            % self.name(name))
        return fd

    def read(self, name: str) -> Optional[bytes]:
        """The content of ``name`` (None if it does not exist); a symlink is refused."""
        fd = self.open_file(name)
        if fd is None:
            return None
        try:
            chunks = []
            while True:
                b = os.read(fd, 1 << 16)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, name: str, data: bytes, mode: int = 0o600, prepare: Optional[Callable[[int], None]] = None,
              sync_dir: bool = True) -> None:
        """Replace ``name`` atomically and durably: temp file (O_EXCL, O_NOFOLLOW), ``prepare(fd)`` (sets
        the ACL before the file appears), write, fsync, rename, fsync of the directory."""
        target = self.name(name)
        tmp = "%s%s-%s" % (TMP_PREFIX, name, secrets.token_hex(6))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW, mode, dir_fd=self.fd)
        except OSError as e:
            if e.errno in NO_SPACE:
                raise no_space_from(target, self.path, e) from None
            raise OutputError("%s: cannot create a file in %s (%s); make the directory writable by the agent's "
                              "user (run 'machine-id-agent init')" % (target, self.path, e.strerror or e)) from None
        try:
            try:
                os.fchmod(fd, mode)  # umask must not widen or narrow what we asked for
                if prepare is not None:
                    prepare(fd)
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException as e:
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except OSError:
                pass
            if isinstance(e, OSError) and e.errno in NO_SPACE:
                raise no_space_from(target, self.path, e) from None
            if isinstance(e, OSError):
                raise OutputError("%s: write failed (%s); check free space and permissions of %s"
                                  % (target, e.strerror or e, self.path)) from None
            raise
        if sync_dir:
            os.fsync(self.fd)

    def create_temp(self, name: str, mode: int = 0o600) -> "tuple[int, str]":
        """A new temp file for ``name`` in this directory (O_EXCL, O_NOFOLLOW): (fd, temp name). Finish with
        :meth:`replace` (or :meth:`unlink` the temp name); :meth:`clean_temp_files` removes leftovers."""
        tmp = "%s%s-%s" % (TMP_PREFIX, name, secrets.token_hex(6))
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW, mode, dir_fd=self.fd)
        os.fchmod(fd, mode)
        return fd, tmp

    def replace(self, src: str, dst: str) -> None:
        """rename(2) of ``src`` over ``dst``, both in this directory."""
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def mkdir(self, name: str, mode: int = 0o700) -> None:
        """A subdirectory ``name`` (FileExistsError when something by that name is there already)."""
        os.mkdir(name, mode, dir_fd=self.fd)

    def rename_into(self, name: str, subdir: str) -> None:
        """rename(2) of ``name`` to ``subdir/name`` (a real subdirectory of this one, never a symlink)."""
        sub = os.open(subdir, os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self.fd)
        try:
            os.replace(name, name, src_dir_fd=self.fd, dst_dir_fd=sub)
            os.fsync(sub)
        finally:
            os.close(sub)

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.fd)

    def unlink(self, name: str) -> bool:
        try:
            os.unlink(name, dir_fd=self.fd)
            return True
        except FileNotFoundError:
            return False

    def clean_temp_files(self) -> int:
        """Remove temp files a crash left behind. Returns how many were removed."""
        n = 0
        try:
            names = self.listdir()
        except OSError:
            return 0
        for name in names:
            if name.startswith(TMP_PREFIX):
                try:
                    os.unlink(name, dir_fd=self.fd)
                    n += 1
                except OSError:
                    pass
        return n


def _real(link: str, target: Optional[str]) -> str:
    """Where the link points, for the fix in a message (best effort: it may change under us)."""
    if target is None:
        return "the directory the link points to"
    try:
        return os.path.realpath(os.path.join(os.path.dirname(link), target))
    except OSError:
        return os.path.normpath(os.path.join(os.path.dirname(link), target))


def _unsafe_link(link: str, parent: str, pst: os.stat_result, lst: os.stat_result, mode: str, path: str,
                 target: Optional[str] = None) -> PathError:
    real = _real(link, target)
    if mode == "secure":
        why = "symlinks is 'secure', which follows no symlink"
        fix = ("point the config at the real directory (%s) or set symlinks: try-secure, which follows symlinks "
               "only root can change" % real)
    else:
        if lst.st_uid != 0:
            why = "it is owned by %s, not root" % _uname(lst.st_uid)
        elif pst.st_uid != 0:
            why = "%s is owned by %s, who can replace it" % (parent, _uname(pst.st_uid))
        elif pst.st_mode & 0o022:
            why = "%s is writable by others (mode %04o), so they can replace it" % (parent, stat.S_IMODE(pst.st_mode))
        else:
            why = "a directory above it can be changed by a non-root user"
        fix = "point the config at the real directory (%s)" % real
    return PathError("%s: %s is a symlink that the agent will not follow (%s); %s"
                     % (path, link, why, fix))


def open_dir(path: PathLike, symlinks: str = DEFAULT_SYMLINKS, create: Optional[int] = None,
             parents_mode: int = 0o755, warn: Warn = None) -> Dir:
    """Open the directory ``path`` under the ``symlinks`` policy. ``create``: the mode to create the last
    component with when it is missing (missing parents get ``parents_mode``); None: it must exist.

    Raises PathError for a refused symlink or a non-directory, OutputError for other failures."""
    path = os.path.normpath(str(path))
    check_symlinks_mode(symlinks)
    if not path.startswith("/"):
        raise PathError("%s: is not an absolute path; write it like /opt/machine-id" % path)
    if symlinks == "insecure" or not CAN_WALK:
        if symlinks != "insecure" and warn is not None:
            warn("%s: this platform cannot open paths without following symlinks; following them "
                 "(symlinks: %s)" % (path, symlinks))
        if symlinks == "secure" and not CAN_WALK:
            raise PathError("%s: symlinks is 'secure' but this platform cannot open paths without following "
                            "symlinks; set symlinks: try-secure or insecure" % path)
        try:
            if create is not None and not os.path.isdir(path):
                os.makedirs(os.path.dirname(path), parents_mode, exist_ok=True)
                try:
                    os.mkdir(path, create)
                except FileExistsError:
                    pass
            return Dir(os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC), path)
        except OSError as e:
            raise _open_error(path, path, e, create) from None
    return _walk(path, symlinks, create, parents_mode)


def no_space_error(target: str, where: str, err: int, why: str, **details) -> OutputError:
    """The error for ``target`` when the filesystem of ``where`` is full (``err`` ENOSPC) or the agent's user
    reached its quota there (EDQUOT): retryable (see NO_SPACE); its ``details["no_space"]`` is (err, why)."""
    if err == getattr(errno, "EDQUOT", None):
        cause = "the agent's user reached its disk quota on the filesystem of %s (%s); free some of its space there " \
                "or raise the quota: the agent writes it at its next renewal, or at a retry once space is freed there" \
                % (where, why)
    else:
        cause = "no space left on the filesystem of %s (%s); free space there: the agent retries with backoff (at " \
                "most a minute apart) and writes it once there is room" % (where, why)
    return OutputError("%s: %s" % (target, cause), retryable=True, no_space=(err, why), **details)


def no_space_from(target: str, where: str, e: OSError) -> OutputError:
    """:func:`no_space_error` for an OSError whose errno is in NO_SPACE."""
    return no_space_error(target, where, e.errno, e.strerror or str(e))


def free_space(path: Union[str, Path]) -> Optional[Tuple[int, int]]:
    """(bytes, inodes) the agent's user may still take on the filesystem of ``path``, or of its nearest existing
    parent (a destination not created yet); None when unknown. Root may also take the reserved blocks."""
    p = os.path.abspath(str(path))
    while True:
        try:
            st = os.statvfs(p)
            break
        except FileNotFoundError:
            if os.path.dirname(p) == p:
                return None
            p = os.path.dirname(p)
        except OSError:
            return None
    if os.geteuid() == 0:
        return st.f_bfree * st.f_frsize, st.f_ffree
    return st.f_bavail * st.f_frsize, st.f_favail


def _open_error(path: str, where: str, e: OSError, create: Optional[int]) -> OutputError:
    if e.errno in NO_SPACE:  # creating the destination (or a parent) on a full filesystem
        return no_space_from(path, where, e)
    if e.errno == errno.ENOENT:
        if create is None:
            return OutputError("%s: %s does not exist; create it (run 'machine-id-agent init' as root)"
                               % (path, where))
        return OutputError("%s: cannot create %s (%s); create it as root and chown it to the agent's user "
                           "(or run 'machine-id-agent init')" % (path, where, e.strerror or e))
    if e.errno == errno.ENOTDIR:
        return PathError("%s: %s is not a directory; remove it or point the config at a directory" % (path, where))
    if e.errno in (errno.EACCES, errno.EPERM):
        return OutputError("%s: permission denied at %s; let the agent's user (%s) search every parent "
                           "directory and own the last one" % (path, where, _uname(os.geteuid())))
    return OutputError("%s: cannot open %s (%s)" % (path, where, e.strerror or e))


def _walk(path: str, symlinks: str, create: Optional[int], parents_mode: int) -> Dir:
    pending = _components(path)
    done: List[str] = []
    hops = 0
    fd = os.open("/", _O_PATH | _O_DIRECTORY | _O_CLOEXEC)
    trusted = root_only(os.fstat(fd))  # stays False once a directory a non-root user can change was passed
    try:
        while pending:
            name = pending.pop(0)
            last = not pending
            where = _join(done + [name])
            flags = (os.O_RDONLY if last else _O_PATH) | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
            try:
                nfd = os.open(name, flags, dir_fd=fd)
            except FileNotFoundError as e:
                if create is None:
                    raise _open_error(path, where, e, create) from None
                try:
                    os.mkdir(name, create if last else parents_mode, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as e2:
                    if e2.errno in NO_SPACE:
                        raise no_space_from(path, where, e2) from None
                    raise OutputError("%s: %s does not exist and the agent's user (%s) cannot create it (%s); run "
                                      "'machine-id-agent init' as root first, or create it owned by that user"
                                      % (path, where, _uname(os.geteuid()), e2.strerror or e2)) from None
                pending.insert(0, name)
                continue
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise _open_error(path, where, e, create) from None
                try:
                    lst = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError as e2:
                    raise _open_error(path, where, e2, create) from None
                if not stat.S_ISLNK(lst.st_mode):
                    raise _open_error(path, where, e, create) from None
                pst = os.fstat(fd)
                if symlinks == "secure" or not (trusted and lst.st_uid == 0):
                    try:
                        target: Optional[str] = os.readlink(name, dir_fd=fd)
                    except OSError:
                        target = None
                    raise _unsafe_link(where, _join(done), pst, lst, symlinks, path, target) from None
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise PathError("%s: too many levels of symlinks at %s; point the config at the real "
                                    "directory" % (path, where))
                try:
                    target = os.readlink(name, dir_fd=fd)
                except OSError as e2:  # replaced since the lstat: refuse rather than guess
                    raise _open_error(path, where, e2, create) from None
                base = "/" if target.startswith("/") else _join(done)
                # the prefix walked so far holds no symlink, so ".." in the target can be resolved lexically;
                # the walk restarts at "/" and checks the target with the same rules
                pending = _components(os.path.normpath(os.path.join(base, target))) + pending
                done = []
                os.close(fd)
                fd = os.open("/", _O_PATH | _O_DIRECTORY | _O_CLOEXEC)
                trusted = root_only(os.fstat(fd))
                continue
            os.close(fd)
            fd = nfd
            done.append(name)
            trusted = trusted and root_only(os.fstat(fd))
        if not done:  # the path is "/"
            nfd = os.open("/", os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
            os.close(fd)
            fd = nfd
        out = Dir(fd, path)
        fd = -1
        return out
    finally:
        if fd >= 0:
            os.close(fd)


def check_private(d: Dir, what: str = "storage") -> None:
    """The bot's own directory: owned by the agent's user and not writable by anyone else. A directory that
    is merely readable by others is tightened to 0700 (files in it are 0600 anyway)."""
    st = d.stat()
    me = os.geteuid()
    fix = "chown %s: %s && chmod 0700 %s" % (_uname(me), d.path, d.path)
    if st.st_uid != me:
        raise PathError("%s %s: owned by %s, not by the agent's user %s, so that user could swap or read the "
                        "bot identity; fix: %s" % (what, d.path, _uname(st.st_uid), _uname(me), fix))
    if st.st_mode & 0o022:
        raise PathError("%s %s: writable by %s (mode %04o, an ACL mask with w also shows here); others could "
                        "replace the bot identity; fix: %s%s" % (
                            what, d.path, "group and others" if st.st_mode & 0o022 == 0o022 else
                            "its group" if st.st_mode & 0o020 else "others", stat.S_IMODE(st.st_mode),
                            "setfacl -b %s && " % d.path if st.st_mode & 0o020 else "", fix))
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(d.fd, 0o700)


def open_private_dir(path: PathLike, symlinks: str = DEFAULT_SYMLINKS, acls: str = "try", create: bool = True,
                     warn: Warn = None, what: str = "storage") -> Dir:
    """The storage directory, opened under ``symlinks``, checked with :func:`check_private` (mode 0700 when
    created), and under ``acls`` try/required stripped of named ACL entries and default ACLs (see
    acl.make_private). Use it for every read and write of the bot identity, e.g.
    ``with open_private_dir(dir, cfg.storage_symlinks, cfg.storage_acls) as d: d.write("identity.json", data)``."""
    from machine_id_agent import acl as aclmod  # acl imports this module
    d = open_dir(path, symlinks, create=0o700 if create else None, warn=warn)
    try:
        check_private(d, what)
        aclmod.make_private(d.fd, acls, "%s %s" % (what, d.path), warn=warn)
    except BaseException:
        d.close()
        raise
    return d


# ----- path-based helpers kept for callers that hold no Dir ---------------------------------------------

def fsync_dir(directory: PathLike) -> None:
    fd = os.open(str(directory), os.O_RDONLY | _O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, data: bytes, mode: int = 0o600, prepare: Optional[Callable[[int], None]] = None,
                 sync_dir: bool = True, symlinks: str = DEFAULT_SYMLINKS) -> None:
    """Write ``data`` to ``path`` atomically and durably; the directory is opened under ``symlinks``."""
    p = Path(path)
    with open_dir(p.parent, symlinks) as d:
        d.write(p.name, data, mode, prepare=prepare, sync_dir=sync_dir)


def clean_temp_files(directory: PathLike, symlinks: str = DEFAULT_SYMLINKS) -> int:
    try:
        d = open_dir(directory, symlinks)
    except OutputError:
        return 0
    with d:
        return d.clean_temp_files()


def read_bytes(path: Union[str, Path]) -> Optional[bytes]:
    try:
        with open(str(path), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
