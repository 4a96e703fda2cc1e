# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Adopting a host set up by hand with the real ``tbot``: its renewable identity, read from tbot's storage files
and imported ONCE into ``identity.json``, so the agent carries on renewing the same bot (same generation count,
no new join token).

tbot v13 keeps the bot identity as separate files in its storage directory (``lib/tbot/identity``): ``key``,
``key.pub``, ``tlscert``, ``key-cert.pub`` (``sshcert`` before v9), ``tlscacerts`` and ``sshcacerts`` (several
entries joined with ``$``), ``tokenhash``; plus ``lock``, the file it holds an exclusive ``flock`` on while it
runs, and ``.write-test``. It writes them one after the other with ``O_TRUNC`` (not atomically), so a tbot
killed in the middle can leave a key that does not match the certificate: that is refused here, never imported.

The import runs only while the agent holds tbot's ``lock`` (see ``service.Agent.acquire_lock``), so no tbot can
renew the identity at the same time; after ``identity.json`` is on disk (durably) tbot's identity files are moved
into ``adopted-from-tbot/``, so a tbot started again by mistake finds no identity to present (it would present an
old generation and Teleport would lock the bot) and asks for a join token instead.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Dict, List, Optional

from machine_id_agent import fsutil
from machine_id_agent import identity as identmod
from machine_id_agent.errors import AgentError, OutputError

KEY = "key"
TLSCERT = "tlscert"
SSHCERT = "key-cert.pub"
SSHCERT_OLD = "sshcert"
TLSCAS = "tlscacerts"
SSHCAS = "sshcacerts"
PUBKEY = "key.pub"
TOKENHASH = "tokenhash"
LOCK = "lock"  # tbot holds an exclusive flock on it while it runs
# what makes an identity (a storage without any of these holds no tbot identity)
REQUIRED = (KEY, TLSCERT, TLSCAS)
MOVED = (KEY, PUBKEY, TLSCERT, SSHCERT, SSHCERT_OLD, TLSCAS, SSHCAS, TOKENHASH)
ADOPTED_DIR = "adopted-from-tbot"
FIX_JOIN = ("give the host a new join token (the rollout mints one for a host whose agent holds no valid "
            "identity, or put one in the agent's token file)")


class TbotIdentityError(identmod.IdentityError):
    """tbot's storage holds an identity the agent must not import (partial, mismatched, expired)."""

    def __init__(self, msg: str, state: str):
        super().__init__(msg, needs_token=True)
        self.state = state


def _read_all(storage_dir: Path) -> Optional[Dict[str, bytes]]:
    """tbot's files (name -> bytes; a missing file is absent, an empty one is b""), None when the directory does
    not exist."""
    try:
        d = fsutil.open_dir(storage_dir, identmod.STORAGE_SYMLINKS)
    except OutputError as exc:
        if not Path(storage_dir).exists():
            return None
        raise identmod.IdentityError(str(exc)) from None
    out: Dict[str, bytes] = {}
    with d:
        for name in MOVED:
            try:
                data = d.read(name)
            except OutputError as exc:
                raise identmod.IdentityError(str(exc)) from None
            if data is not None:
                out[name] = data
    return out


def present(files: Optional[Dict[str, bytes]]) -> bool:
    """True when tbot left (any part of) an identity in the storage."""
    return bool(files) and any(files.get(n, b"").strip() for n in (KEY, TLSCERT))


def parse(files: Dict[str, bytes], storage_dir: Path, now: Optional[_dt.datetime] = None) -> identmod.Identity:
    """The identity tbot stored, checked: complete, key matching the certificate, a renewable bot identity, valid
    now. Raises TbotIdentityError (state ``damaged`` or ``expired``) naming what is wrong and the fix."""
    where = "tbot's identity in %s" % storage_dir
    missing = [n for n in REQUIRED if not files.get(n, b"").strip()]
    ssh = files.get(SSHCERT, b"").strip() or files.get(SSHCERT_OLD, b"").strip()
    if not ssh:
        missing.append(SSHCERT)
    if missing:
        raise TbotIdentityError("%s is incomplete (%s missing or empty), so it cannot be adopted; %s"
                                % (where, ", ".join(missing), FIX_JOIN), "damaged")
    tls_cas: List[bytes] = []
    for blob in files[TLSCAS].split(b"$"):
        tls_cas.extend(identmod.split_pems(blob))
    ssh_cas = [c.strip() + b"\n" for c in files.get(SSHCAS, b"").split(b"$") if c.strip()]
    if not tls_cas:
        raise TbotIdentityError("%s has no CA certificate in %s, so it cannot be adopted; %s"
                                % (where, TLSCAS, FIX_JOIN), "damaged")
    try:
        ident = identmod.Identity(key_pem=files[KEY], tls_cert_pem=files[TLSCERT], ssh_cert=ssh + b"\n",
                                  tls_ca_pems=tls_cas, ssh_ca_lines=ssh_cas)
        matches = identmod.cert_key_matches(ident.tls_cert_pem, ident.key_pem)
    except (identmod.IdentityError, ValueError, TypeError) as exc:
        raise TbotIdentityError("%s does not parse (%s), so it cannot be adopted; %s"
                                % (where, str(exc).split(";", 1)[0], FIX_JOIN), "damaged") from None
    if not matches:
        raise TbotIdentityError("%s is mismatched: %s is not the key of %s (tbot stopped while writing them?), so "
                                "it cannot be adopted; %s" % (where, KEY, TLSCERT, FIX_JOIN), "damaged")
    if not ident.username.startswith("bot-") or not ident.renewable or ident.generation is None:
        raise TbotIdentityError("%s is not a renewable bot identity (user %r), so it cannot be adopted; %s"
                                % (where, ident.username, FIX_JOIN), "damaged")
    if not ident.valid(now):
        raise TbotIdentityError("%s expired at %s (tbot stopped renewing it), so it cannot be adopted; %s"
                                % (where, ident.not_after.isoformat(), FIX_JOIN), "expired")
    return ident


def peek(storage_dir: Path, now: Optional[_dt.datetime] = None) -> Optional[identmod.Identity]:
    """What ``status`` reports for a storage with no ``identity.json``: tbot's identity when it could be adopted,
    None when tbot left none; TbotIdentityError when it left one that cannot be adopted. Changes nothing."""
    files = _read_all(storage_dir)
    if not present(files):
        return None
    return parse(files, storage_dir, now)


def token_hash(files: Dict[str, bytes]) -> Optional[str]:
    h = files.get(TOKENHASH, b"").decode(errors="replace").strip()
    return h if h and all(c in "0123456789abcdef" for c in h.lower()) else None


def adopt(storage_dir: Path, now: Optional[_dt.datetime] = None) -> Optional[identmod.Identity]:
    """Import tbot's identity into ``identity.json`` (durably), then move tbot's files aside. None when tbot left
    no identity. The caller must hold tbot's ``lock`` (no tbot running) and have found no ``identity.json``."""
    files = _read_all(storage_dir)
    if not present(files):
        return None
    ident = parse(files, storage_dir, now)
    try:
        identmod.store(storage_dir, ident, token_hash(files))
    except identmod.UnsavedIdentityError as exc:
        # nothing was asked of the server: the identity is still tbot's files, untouched
        why = str(exc).split(";", 1)[0].split(": ", 1)[-1]
        raise identmod.StorageError("%s: cannot import tbot's identity (%s); free space or fix the permissions of "
                                    "%s (owned by the agent's user)" % (storage_dir, why, storage_dir)) from None
    _move_aside(Path(storage_dir))
    return ident


def _move_aside(storage_dir: Path) -> None:
    """tbot's identity files into ``adopted-from-tbot/`` (same filesystem: renames). A failure leaves them where
    they are; ``identity.json`` wins over them from now on anyway."""
    try:
        with identmod.open_storage(storage_dir) as d:
            try:
                d.mkdir(ADOPTED_DIR, 0o700)
            except FileExistsError:
                pass
            for name in MOVED:
                try:
                    d.rename_into(name, ADOPTED_DIR)
                except FileNotFoundError:
                    pass
            d.fsync()
    except (OSError, AgentError):
        pass


def adopted(storage_dir: Path) -> bool:
    """True when this storage's identity was imported from tbot (its files were moved aside)."""
    return (Path(storage_dir) / ADOPTED_DIR / TLSCERT).exists()
