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
import functools
import hashlib
import hmac
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from machine_id_agent.errors import AgentError

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
        doc = {
            "version": FORMAT_VERSION,
            "key": self.key_pem.decode(),
            "tlscert": self.tls_cert_pem.decode(),
            "sshcert": self.ssh_cert.decode(),
            "tlscacerts": [c.decode() for c in self.tls_ca_pems],
            "sshcacerts": [c.decode() for c in self.ssh_ca_lines],
            "tokenhash": token_hash_hex,
        }
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def from_certs(cls, key_pem: bytes, ssh: bytes, tls: bytes, tls_cas: List[bytes], ssh_cas: List[bytes]
                   ) -> "Identity":
        cas: List[bytes] = []
        for blob in tls_cas:
            cas.extend(split_pems(blob))
        return cls(key_pem=key_pem, tls_cert_pem=tls, ssh_cert=ssh.strip() + b"\n", tls_ca_pems=cas,
                   ssh_ca_lines=[c.strip() + b"\n" for c in ssh_cas if c.strip()])


# --- storage ----------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically and durably: temp file, write, fsync, rename, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, str(path))
        tmp = ""
        _fsync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _remove_stale_temps(d: Path) -> None:
    """Temp files a killed writer left behind (never the live files)."""
    for name in (IDENTITY_FILE, TOKENHASH_FILE, "stale-identity"):
        for p in d.glob(f".{name}.*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass


def ensure_storage_dir(storage_dir: Path) -> Path:
    d = Path(storage_dir)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            os.chmod(d, 0o700)
    except OSError as exc:
        raise IdentityError(f"storage directory {d}: {exc.strerror}; create it and make it owned by the user the "
                            f"agent runs as (mode 0700)") from None
    return d


def _read_doc(storage_dir: Path) -> Optional[dict]:
    p = Path(storage_dir) / IDENTITY_FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read the bot identity {p}: {exc.strerror}; run the agent as the user that "
                            f"owns {storage_dir}") from None
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


def stored_token_hash(storage_dir: Path) -> Optional[str]:
    """The token hash stored with the identity (None when there is no identity or no hash)."""
    doc = _read_doc(storage_dir)
    if doc is not None:
        h = doc.get("tokenhash")
        return h if isinstance(h, str) and h else None
    return None


def token_matches(storage_dir: Path, token: Optional[str]) -> bool:
    """True when the stored identity was obtained with this token (constant-time compare)."""
    stored = stored_token_hash(storage_dir)
    return bool(stored and token and hmac.compare_digest(stored, token_hash(token)))


def store(storage_dir: Path, identity: Identity, token_hash: Optional[str] = None) -> None:
    """Persist the identity durably. ``token_hash`` None keeps the hash already stored (renewals)."""
    d = ensure_storage_dir(storage_dir)
    if token_hash is None:
        try:
            token_hash = stored_token_hash(d)
        except IdentityError:
            token_hash = None
    try:
        durable_write(d / IDENTITY_FILE, identity.to_json(token_hash))
        _remove_stale_temps(d)
        if token_hash and _read_text(d / TOKENHASH_FILE) != token_hash:  # only after a join: keep renewals short
            durable_write(d / TOKENHASH_FILE, (token_hash + "\n").encode())
    except OSError as exc:
        raise IdentityError(f"cannot write the bot identity to {d}: {exc.strerror}; free space or fix the "
                            f"permissions of {d} (owned by the agent's user, mode 0700)") from None


STALE_FILE = "stale-identity"


def cert_fingerprint(cert_pem: bytes) -> str:
    return hashlib.sha256(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
                          ).hexdigest()


def mark_stale(storage_dir: Path, identity: Identity) -> None:
    """Remember that the server refused this identity as an OLD generation. Presenting it again would
    lock the bot again (also after an admin removed the lock), so it is never sent for renewal again."""
    try:
        durable_write(Path(storage_dir) / STALE_FILE, (cert_fingerprint(identity.tls_cert_pem) + "\n").encode())
    except OSError:
        pass  # best effort: the in-memory refusal still holds for this process


def is_stale(storage_dir: Path, identity: Identity) -> bool:
    try:
        marked = (Path(storage_dir) / STALE_FILE).read_text().strip()
    except OSError:
        return False
    return bool(marked) and hmac.compare_digest(marked, cert_fingerprint(identity.tls_cert_pem))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
