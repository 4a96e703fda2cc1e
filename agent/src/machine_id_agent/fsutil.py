# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Durable, atomic file writes: temp file in the same directory, fsync, rename, fsync of the directory.

A reader sees either the old file or the new one, never a mix; after a crash the file is one of the two.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable, Optional, Union

from machine_id_agent.errors import OutputError

TMP_PREFIX = ".tmp-"


def fsync_dir(directory: Union[str, Path]) -> None:
    fd = os.open(str(directory), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], data: bytes, mode: int = 0o600,
                 prepare: Optional[Callable[[int], None]] = None, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    ``prepare(fd)`` runs on the temp file before the rename (used to set its ACL), so the file never
    appears under its final name with the wrong permissions.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / ("%s%s-%s" % (TMP_PREFIX, path.name, secrets.token_hex(6)))
    try:
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    except OSError as e:
        raise OutputError("%s: cannot create a file in %s (%s); make the directory writable by the agent's user "
                          "(run 'machine-id-agent init')" % (path, directory, e.strerror or e)) from None
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
        os.replace(str(tmp), str(path))
    except BaseException as e:
        try:
            os.unlink(str(tmp))
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OutputError("%s: write failed (%s); check free space and permissions of %s"
                              % (path, e.strerror or e, directory)) from None
        raise
    if sync_dir:
        fsync_dir(directory)


def clean_temp_files(directory: Union[str, Path]) -> int:
    """Remove temp files a crash left behind. Returns how many were removed."""
    n = 0
    try:
        names = os.listdir(str(directory))
    except OSError:
        return 0
    for name in names:
        if name.startswith(TMP_PREFIX):
            try:
                os.unlink(os.path.join(str(directory), name))
                n += 1
            except OSError as e:
                if e.errno != errno.ENOENT:
                    pass
    return n


def read_bytes(path: Union[str, Path]) -> Optional[bytes]:
    try:
        with open(str(path), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
