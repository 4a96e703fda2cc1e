# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The bot's renewable identity: key pair, certificates, CAs, and their durable storage.

Storage layout (``storage_dir``, mode 0700, files 0600):

``identity.json``
    ONE file holding the private key, TLS certificate, SSH certificate, TLS CA certificates, SSH CA
    lines and the token hash. It is the only thing the agent reads back. Because everything lives in
    one file that is replaced by ``rename()``, a crash can never pair a new key with an old certificate
    or a new certificate with an old token hash.
``tokenhash``
    hex SHA-256 of the join token, as tbot writes it (informational copy; ``identity.json`` is
    authoritative).

Writes are durable: temp file in the same directory, write, ``fsync``, ``rename``, ``fsync`` of the
directory. :func:`store` returns only after all of that, and callers must call it BEFORE they use a new
identity (Teleport locks a bot that presents an older certificate generation than the last one it
issued).
"""

from __future__ import annotations

import base64
import datetime as _dt
import errno
import functools
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from machine_id_agent import fsutil
from machine_id_agent.errors import AgentError, OutputError

IDENTITY_FILE = "identity.json"
TOKENHASH_FILE = "tokenhash"
FORMAT_VERSION = 1

# Teleport's Subject extra names (lib/tlsca/ca.go)
OID_RENEWABLE = x509.ObjectIdentifier("1.3.9999.1.13")
OID_GENERATION = x509.ObjectIdentifier("1.3.9999.1.14")


class IdentityError(AgentError):
    """The stored identity cannot be read or written."""


# --- keys -------------------------------------------------------------------------------------------
def generate_key() -> bytes:
    """A new RSA-2048 private key as PKCS#1 PEM (``RSA PRIVATE KEY``), as Teleport v13 clients use."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@functools.lru_cache(maxsize=8)
def _public_key(key_pem: bytes):
    """The public key of a PEM private key. Loading an RSA private key runs an expensive consistency
    check (~40 ms); the agent's own keys are loaded once per key and without it where supported."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:  # cryptography < 39
        key = serialization.load_pem_private_key(key_pem, password=None)
    return key.public_key()


def ssh_public_key(key_pem: bytes) -> bytes:
    """The authorized_keys line (with newline) of a private key."""
    return _public_key(key_pem).public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


def tls_public_key(key_pem: bytes) -> bytes:
    """PEM ``PUBLIC KEY`` (PKIX). Teleport v13 parses the PEM body as PKIX; v17+ accepts PKIX too."""
    return _public_key(key_pem).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def split_pems(data: bytes) -> List[bytes]:
    """Split concatenated PEM certificates into a list (each ending with a newline)."""
    out, cur = [], []
    for line in data.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"-----BEGIN "):
            cur = [line]
        elif cur:
            cur.append(line)
            if line.startswith(b"-----END "):
                out.append(b"\n".join(cur) + b"\n")
                cur = []
    return out


def spki_pin(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the certificate's DER SubjectPublicKeyInfo (the CA pin format)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def cert_not_after(cert: x509.Certificate) -> _dt.datetime:
    v = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    return v if v is not None else cert.not_valid_after.replace(tzinfo=_dt.timezone.utc)


def cert_not_before(cert: x509.Certificate) -> _dt.datetime:
    v = getattr(cert, "not_valid_before_utc", None)
    return v if v is not None else cert.not_valid_before.replace(tzinfo=_dt.timezone.utc)


def token_hash(token: str) -> str:
    """hex SHA-256 of the join token (what tbot stores in ``tokenhash``)."""
    return hashlib.sha256(token.encode()).hexdigest()


def cert_key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return (cert.public_key().public_bytes(serialization.Encoding.DER, spki)
            == _public_key(key_pem).public_bytes(serialization.Encoding.DER, spki))


# --- the identity -----------------------------------------------------------------------------------
@dataclass
class Identity:
    key_pem: bytes = field(repr=False)
    tls_cert_pem: bytes
    ssh_cert: bytes
    tls_ca_pems: List[bytes]
    ssh_ca_lines: List[bytes]

    def __post_init__(self):
        try:
            self._cert = x509.load_pem_x509_certificate(self.tls_cert_pem)
        except ValueError as exc:
            raise IdentityError(f"the TLS certificate of the bot identity does not parse ({exc}); "
                                f"delete the storage directory and join again with a new token") from None

    @property
    def cert(self) -> x509.Certificate:
        return self._cert

    @property
    def cluster_name(self) -> str:
        orgs = self._cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return orgs[0].value if orgs else ""

    @property
    def username(self) -> str:
        cns = self._cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return cns[0].value if cns else ""

    @property
    def bot_name(self) -> str:
        u = self.username
        return u[4:] if u.startswith("bot-") else u

    def _extra(self, oid) -> Optional[str]:
        attrs = self._cert.subject.get_attributes_for_oid(oid)
        return attrs[0].value if attrs else None

    @property
    def generation(self) -> Optional[int]:
        v = self._extra(OID_GENERATION)
        try:
            return int(v) if v is not None else None
        except ValueError:
            return None

    @property
    def renewable(self) -> bool:
        return (self._extra(OID_RENEWABLE) or "").lower() == "true"

    @property
    def not_before(self) -> _dt.datetime:
        return cert_not_before(self._cert)

    @property
    def not_after(self) -> _dt.datetime:
        return cert_not_after(self._cert)

    def valid(self, now: Optional[_dt.datetime] = None) -> bool:
        now = now or _dt.datetime.now(_dt.timezone.utc)
        return self.not_before <= now < self.not_after

    def describe(self) -> str:
        return (f"bot {self.bot_name!r} of cluster {self.cluster_name!r}, generation {self.generation}, "
                f"valid until {self.not_after.isoformat()}")

    # serialisation
    def to_json(self, token_hash_hex: Optional[str]) -> bytes:
        return doc_bytes(self.key_pem, self.ssh_cert, self.tls_cert_pem, self.tls_ca_pems, self.ssh_ca_lines,
                         token_hash_hex)

    @classmethod
    def from_certs(cls, key_pem: bytes, ssh: bytes, tls: bytes, tls_cas: List[bytes], ssh_cas: List[bytes]
                   ) -> "Identity":
        cas: List[bytes] = []
        for blob in tls_cas:
            cas.extend(split_pems(blob))
        return cls(key_pem=key_pem, tls_cert_pem=tls, ssh_cert=ssh.strip() + b"\n", tls_ca_pems=cas,
                   ssh_ca_lines=[c.strip() + b"\n" for c in ssh_cas if c.strip()])


def doc_bytes(key_pem: bytes, ssh: bytes, tls: bytes, tls_cas: List[bytes], ssh_cas: List[bytes],
              token_hash_hex: Optional[str]) -> bytes:
    """The ``identity.json`` bytes straight from a server answer, WITHOUT parsing any certificate: this runs
    between Teleport counting a renewal and the renewal being on disk, so it only copies bytes."""
    cas: List[bytes] = []
    for blob in tls_cas:
        cas.extend(split_pems(blob))
    doc = {
        "version": FORMAT_VERSION,
        "key": key_pem.decode(),
        "tlscert": tls.decode(),
        "sshcert": (ssh.strip() + b"\n").decode(),
        "tlscacerts": [c.decode() for c in cas],
        "sshcacerts": [(c.strip() + b"\n").decode() for c in ssh_cas if c.strip()],
        "tokenhash": token_hash_hex,
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


# --- storage ----------------------------------------------------------------------------------------
# How the storage path is opened (config: storage symlinks / acls; see fsutil). Every read and write below goes
# through a descriptor of the storage directory opened under these rules, so a symlink swapped into the path
# can never redirect the bot identity.
STORAGE_SYMLINKS = fsutil.DEFAULT_SYMLINKS
STORAGE_ACLS = "try"


def configure_storage(symlinks: str, acls: str) -> None:
    global STORAGE_SYMLINKS, STORAGE_ACLS
    STORAGE_SYMLINKS, STORAGE_ACLS = symlinks, acls


def durable_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically and durably (temp file, write, fsync, rename, fsync of the directory),
    through a descriptor of its directory opened under the storage rules."""
    path = Path(path)
    with fsutil.open_dir(path.parent, STORAGE_SYMLINKS) as d:
        d.write(path.name, data, mode)


def _remove_stale_temps(d: "fsutil.Dir") -> None:
    """Temp files a killed writer left behind (never the live files)."""
    d.clean_temp_files()
    try:
        names = d.listdir()
    except OSError:
        return
    for name in names:  # the names older versions used
        if name.startswith(".") and name.endswith(".tmp") and name[1:].split(".")[0] in (
                "identity", "tokenhash", "stale-identity"):
            try:
                d.unlink(name)
            except OSError:
                pass


def open_storage(storage_dir: Path) -> "fsutil.Dir":
    """The storage directory for writing: opened without following untrusted symlinks, created 0700 when
    missing, refused unless owned by the agent's user and writable by nobody else."""
    try:
        return fsutil.open_private_dir(storage_dir, STORAGE_SYMLINKS, STORAGE_ACLS, create=True)
    except OutputError as exc:
        raise IdentityError(str(exc)) from None


def ensure_storage_dir(storage_dir: Path) -> Path:
    with open_storage(storage_dir):
        pass
    return Path(storage_dir)


def _read_storage(storage_dir: Path, name: str) -> Optional[bytes]:
    """A file of the storage directory (None when it or the directory does not exist); no owner check, so
    ``status`` run by root can read it."""
    try:
        d = fsutil.open_dir(storage_dir, STORAGE_SYMLINKS)
    except OutputError as exc:
        if not os.path.lexists(str(storage_dir)):
            return None
        raise IdentityError(str(exc)) from None
    with d:
        try:
            return d.read(name)
        except OutputError as exc:
            raise IdentityError(str(exc)) from None


def _read_text(storage_dir: Path, name: str) -> Optional[str]:
    try:
        raw = _read_storage(storage_dir, name)
    except (OSError, IdentityError):
        return None
    return raw.decode(errors="replace").strip() if raw is not None else None


def _read_doc(storage_dir: Path) -> Optional[dict]:
    p = Path(storage_dir) / IDENTITY_FILE
    try:
        raw = _read_storage(storage_dir, IDENTITY_FILE)
    except OSError as exc:
        raise IdentityError(f"cannot read the bot identity {p}: {exc.strerror}; run the agent as the user that "
                            f"owns {storage_dir}") from None
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            raise ValueError("unknown format version")
        return doc
    except ValueError as exc:
        raise IdentityError(f"the bot identity {p} is damaged ({exc}); delete {p} and join again with a new "
                            f"token from `tctl bots add`") from None


def load(storage_dir: Path) -> Optional[Identity]:
    """The stored identity, or None when nothing is stored yet."""
    doc = _read_doc(storage_dir)
    if doc is None:
        return None
    p = Path(storage_dir) / IDENTITY_FILE
    try:
        return Identity(
            key_pem=doc["key"].encode(),
            tls_cert_pem=doc["tlscert"].encode(),
            ssh_cert=doc["sshcert"].encode(),
            tls_ca_pems=[c.encode() for c in doc["tlscacerts"]],
            ssh_ca_lines=[c.encode() for c in doc["sshcacerts"]],
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise IdentityError(f"the bot identity {p} is damaged (missing {exc}); delete {p} and join again with a "
                            f"new token from `tctl bots add`") from None


def stored_token_hash(storage_dir: Path, required: bool = False) -> Optional[str]:
    """The token hash stored with the identity (None when there is no identity or no hash). ``required``: a
    renewal copies the hash into the new identity, so StorageError when the storage cannot be read or is gone
    (a directory moved away for a moment must never yield an identity without its hash)."""
    try:
        doc = _read_doc(storage_dir)
    except IdentityError as exc:
        if not required:
            raise
        raise StorageError(str(exc)) from None
    if doc is None and required and not os.path.isdir(str(storage_dir)):
        raise StorageError(f"the storage directory {storage_dir} is gone; nothing was asked of the server; the next "
                           f"cycle retries (check what moved it)")
    if doc is not None:
        h = doc.get("tokenhash")
        return h if isinstance(h, str) and h else None
    return None


def token_matches(storage_dir: Path, token: Optional[str]) -> bool:
    """True when the stored identity was obtained with this token (constant-time compare)."""
    stored = stored_token_hash(storage_dir)
    return bool(stored and token and hmac.compare_digest(stored, token_hash(token)))


class StorageError(IdentityError):
    """The storage directory cannot take a new identity (not writable, no space): nothing was asked of the
    server, so nothing is lost."""


class UnsavedIdentityError(IdentityError):
    """The server issued an identity (it already counts it) but the storage refused it. The caller must keep
    ``identity`` in memory, use it, and store it later: the identity on disk is now one generation behind
    and presenting it would lock the bot (or, for a join, the token is spent)."""

    def __init__(self, msg: str, identity: "Identity", token_hash: Optional[str]):
        super().__init__(msg)
        self.identity = identity
        self.token_hash = token_hash


# room the identity file needs (a 2048-bit identity is about 10 KiB; larger CA sets fit too)
RESERVE_BYTES = 64 * 1024
# free space demanded before a renewal or a join (statvfs), on top of the reservation
MIN_FREE_BYTES = 256 * 1024


class Reservation:
    """A temp file in the storage directory, created and given its disk blocks (``posix_fallocate``) BEFORE
    the server is asked for a new identity. It is the check tbot does (writable, room left) and more: after
    the answer arrives the write goes into blocks already allocated, so a full disk can no longer make it
    fail. :meth:`commit` writes, renames over ``identity.json`` (from then on a kill of the process cannot
    lose the identity), then fsyncs the file and the directory (from then on a power cut cannot either)."""

    def __init__(self, storage_dir: Path, size: Optional[int] = None, min_free: Optional[int] = None):
        size = RESERVE_BYTES if size is None else size
        min_free = MIN_FREE_BYTES if min_free is None else min_free
        self.d = open_storage(storage_dir)
        d = Path(storage_dir)
        self.dir = d
        self.path = d / IDENTITY_FILE
        self.fd = -1
        self.tmp = ""
        self.timings: dict = {}
        try:
            st = self.d.statvfs()
        except OSError as exc:
            self.abort()
            raise StorageError(f"storage {d}: cannot check free space ({exc.strerror}); fix the storage "
                               f"directory") from None
        free = st.f_bavail * st.f_frsize
        if free < size + min_free:
            self.abort()
            raise StorageError(f"storage {d}: only {free // 1024} KiB free, a renewal needs "
                               f"{(size + min_free) // 1024} KiB; not renewing the bot identity until space is "
                               f"freed (the outputs stay valid until they expire): free space on that filesystem")
        if st.f_files and st.f_favail < 2:
            self.abort()
            raise StorageError(f"storage {d}: no free inodes; not renewing the bot identity until some are freed "
                               f"(the outputs stay valid until they expire): delete files on that filesystem")
        try:
            self.fd, self.tmp = self.d.create_temp(IDENTITY_FILE, 0o600)
            try:
                os.posix_fallocate(self.fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                    raise
                _write_all(self.fd, b"\0" * size, 0)  # no fallocate here: a test write of the same size
        except OSError as exc:
            self.abort()
            raise StorageError(f"storage {d}: cannot reserve room for the renewed identity ({exc.strerror}); not "
                               f"renewing the bot identity until that works (the outputs stay valid until they "
                               f"expire): free space or fix the permissions of {d} (owned by the agent's user, "
                               f"mode 0700)") from None

    def commit(self, data: bytes) -> dict:
        """Write ``data`` as the new ``identity.json``; returns monotonic timestamps ``visible`` (renamed in
        place: safe from a process kill) and ``durable`` (fsynced: safe from a power cut)."""
        if self.fd < 0:
            raise OSError(errno.EBADF, "reservation already used")
        _write_all(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))
        self.d.replace(self.tmp, IDENTITY_FILE)
        self.tmp = ""
        self.timings["visible"] = monotonic()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.d.fsync()
        self.timings["durable"] = monotonic()
        return self.timings

    def abort(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if self.tmp:
            try:
                self.d.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = ""
        if self.d.fd >= 0:
            self.d.close()

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def monotonic() -> float:
    return time.monotonic()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def check_storage(storage_dir: Path) -> None:
    """Raise StorageError unless the storage directory can take a new identity now (writable, room left,
    a reservation of the identity's size succeeds). Run before every renewal and join."""
    try:
        with open_storage(storage_dir) as d:
            _remove_stale_temps(d)  # a reservation a killed agent left behind must not eat the room it checks
    except IdentityError as exc:
        raise StorageError(str(exc)) from None
    Reservation(Path(storage_dir)).abort()


def store(storage_dir: Path, identity: Identity, token_hash: Optional[str] = None) -> None:
    """Persist the identity durably. ``token_hash`` None keeps the hash already stored (renewals).
    Raises UnsavedIdentityError (carrying the identity) when the storage refuses it."""
    d = Path(storage_dir)
    if token_hash is None:
        try:
            token_hash = stored_token_hash(d)
        except IdentityError:
            token_hash = None
    try:
        with Reservation(d, size=len(identity.to_json(token_hash)), min_free=0) as res:
            res.commit(identity.to_json(token_hash))
        with open_storage(d) as sd:
            _remove_stale_temps(sd)
            if token_hash and _read_text(d, TOKENHASH_FILE) != token_hash:  # only after a join: keep renewals short
                sd.write(TOKENHASH_FILE, (token_hash + "\n").encode())
    except (OSError, IdentityError, OutputError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise UnsavedIdentityError(f"cannot write the bot identity to {d}: {why}; the agent keeps it in memory "
                                   f"and retries every cycle; free space or fix the permissions of {d} (owned "
                                   f"by the agent's user, mode 0700)", identity, token_hash) from None


STALE_FILE = "stale-identity"


def cert_fingerprint(cert_pem: bytes) -> str:
    return hashlib.sha256(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
                          ).hexdigest()


STALE_LOCKED = "locked"  # Teleport answered "generation mismatch" to this identity
STALE_LOST = "lost-renewal"  # Teleport already counts a newer generation than this identity holds
STALE_UNTRUSTED = "untrusted"  # signed by a user CA the cluster dropped (a user CA rotation the agent missed)


def mark_stale(storage_dir: Path, identity: Identity, reason: str = STALE_LOCKED) -> None:
    """Remember that this identity must never be presented for renewal again: the server refused it as an
    OLD generation (``locked``), or the bot's generation label is ahead of it (``lost-renewal``: a renewal
    the server counted never reached the disk). Presenting it would lock the bot (again, also after an
    admin removed the lock). ``status`` reads the reason."""
    try:
        with open_storage(storage_dir) as d:
            d.write(STALE_FILE, (cert_fingerprint(identity.tls_cert_pem) + "\n" + reason + "\n").encode())
    except (OSError, AgentError):
        pass  # best effort: the in-memory refusal still holds for this process


def stale_reason(storage_dir: Path, identity: Identity) -> Optional[str]:
    """The reason this identity was marked stale (``locked``, ``lost-renewal``), or None."""
    text = _read_text(storage_dir, STALE_FILE)
    if text is None:
        return None
    lines = text.split()
    if not lines or not hmac.compare_digest(lines[0], cert_fingerprint(identity.tls_cert_pem)):
        return None
    return lines[1] if len(lines) > 1 else STALE_LOCKED


def is_stale(storage_dir: Path, identity: Identity) -> bool:
    return stale_reason(storage_dir, identity) is not None


IN_FLIGHT_FILE = "renewal-in-flight"


def mark_in_flight(storage_dir: Path, identity: Identity) -> None:
    """Record, before the renewal request leaves, that ``identity`` is being renewed. Removed once the answer
    is on disk; found again it means the agent stopped (or the connection dropped) with the answer unknown:
    Teleport may or may not have counted that renewal, see :func:`renewal_in_doubt`. Raises StorageError
    when the storage cannot take the mark (then the request is not sent)."""
    try:
        with open_storage(storage_dir) as d:
            d.write(IN_FLIGHT_FILE, (cert_fingerprint(identity.tls_cert_pem) + "\n").encode())
    except (OSError, AgentError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise StorageError(f"storage {storage_dir}: cannot record the renewal about to be made ({why}); "
                           f"not renewing until that works: free space or fix the permissions of {storage_dir}"
                           ) from None


def renewal_in_doubt(storage_dir: Path, identity: Identity) -> Optional[float]:
    """When a renewal of exactly this identity was sent and its answer never reached the disk: the wall-clock
    time the doubt was first noticed (now, recorded in the mark, when this is the first look; an agent killed
    again while it waits goes on from that time instead of starting over). None otherwise; a mark naming
    another certificate is left over from a renewal that did reach the disk (the agent stopped between the
    rename and the removal of the mark): not in doubt."""
    text = _read_text(storage_dir, IN_FLIGHT_FILE)
    if not text:
        return None
    fields = text.split()
    fingerprint = cert_fingerprint(identity.tls_cert_pem)
    if not hmac.compare_digest(fields[0], fingerprint):
        return None
    now = time.time()
    try:
        noticed = float(fields[1])
    except (IndexError, ValueError):
        noticed = None
    if noticed is None or noticed > now:  # first look (or a clock that went back): from now
        noticed = now
        try:
            with open_storage(storage_dir) as d:
                d.write(IN_FLIGHT_FILE, ("%s\n%.3f\n" % (fingerprint, noticed)).encode())
        except (OSError, AgentError):
            pass  # the wait starts over after a restart: slower, never less safe
    return noticed


def clear_in_flight(storage_dir: Path) -> None:
    try:
        with open_storage(storage_dir) as d:
            d.unlink(IN_FLIGHT_FILE)
    except (OSError, AgentError):
        pass  # a mark naming an older certificate is ignored (renewal_in_doubt)


def write_note(storage_dir: Path, name: str, doc: Optional[dict]) -> None:
    """A small JSON note for ``status`` in the storage, stamped with the time (``at``); None removes it. Best
    effort: the journal says the same."""
    try:
        if doc is None:
            if os.path.lexists(os.path.join(str(storage_dir), name)):
                with open_storage(storage_dir) as d:
                    d.unlink(name)
            return
        doc = dict(doc, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open_storage(storage_dir) as d:
            d.write(name, (json.dumps(doc, sort_keys=True) + "\n").encode())
    except (OSError, AgentError):
        pass


def read_note(storage_dir: Path, name: str) -> Optional[dict]:
    """The note ``name`` (a JSON object), or None when it is missing, unreadable or damaged."""
    try:
        raw = _read_storage(Path(storage_dir), name)
        doc = json.loads(raw) if raw else None
    except (AgentError, OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


TOKEN_REFUSED_FILE = "token-refused.json"


def mark_token_refused(storage_dir: Path, token_hash: str, reason: str) -> None:
    """Remember, for ``status``, that Teleport refused the configured token (by its hash) while the agent kept
    renewing the identity it had."""
    write_note(storage_dir, TOKEN_REFUSED_FILE, {"token_hash": token_hash, "reason": reason})


def clear_token_refused(storage_dir: Path) -> None:
    write_note(storage_dir, TOKEN_REFUSED_FILE, None)


def token_refusal(storage_dir: Path, token_hash: Optional[str]) -> Optional[dict]:
    """``{"at": ..., "reason": ...}`` when Teleport refused exactly this token (hash) and the agent kept its
    identity; None otherwise (a note about another token is an old one)."""
    doc = read_note(storage_dir, TOKEN_REFUSED_FILE) if token_hash else None
    if doc is None or not hmac.compare_digest(str(doc.get("token_hash") or "").encode(), token_hash.encode()):
        return None  # no note, a damaged one, or one about another token
    return {"at": doc.get("at"), "reason": doc.get("reason")}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
