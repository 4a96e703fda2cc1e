# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The bot identity: certificate facts, durable storage, token hash."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from machine_id_agent import identity as ident


def _now():
    """Issue time. Not the import time: the whole suite runs for more than an hour before these tests."""
    return dt.datetime.now(dt.timezone.utc)


def _cert(key_pem: bytes, cn="bot-example", cluster="lanyard-testbed", generation="3", renewable="true",
          hours=1.0):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
                         x509.NameAttribute(NameOID.COMMON_NAME, cluster)])
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if renewable is not None:
        attrs.append(x509.NameAttribute(ident.OID_RENEWABLE, renewable))
    if generation is not None:
        attrs.append(x509.NameAttribute(ident.OID_GENERATION, generation))
    pub = serialization.load_pem_private_key(key_pem, None).public_key()
    cert = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca_name).public_key(pub)
            .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=1))
            .not_valid_after(_now() + dt.timedelta(hours=hours)).sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def key_pem():
    return ident.generate_key()


def make(key_pem, **kw) -> ident.Identity:
    return ident.Identity(key_pem=key_pem, tls_cert_pem=_cert(key_pem, **kw), ssh_cert=b"ssh-rsa-cert-v01 AAAA\n",
                          tls_ca_pems=[b"-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n"],
                          ssh_ca_lines=[b"@cert-authority x ssh-rsa AAA\n"])


def test_key_is_rsa_2048_pkcs1(key_pem):
    assert key_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert serialization.load_pem_private_key(key_pem, None).key_size == 2048
    assert ident.ssh_public_key(key_pem).startswith(b"ssh-rsa ") and ident.ssh_public_key(key_pem).endswith(b"\n")
    assert ident.tls_public_key(key_pem).startswith(b"-----BEGIN PUBLIC KEY-----")


def test_certificate_facts(key_pem):
    i = make(key_pem, generation="7")
    assert i.cluster_name == "lanyard-testbed"
    assert i.username == "bot-example" and i.bot_name == "example"
    assert i.generation == 7 and i.renewable
    assert i.valid() and not i.valid(_now() + dt.timedelta(hours=2))
    assert "generation 7" in i.describe()
    assert "PRIVATE" not in repr(i)


def test_missing_extra_names(key_pem):
    i = make(key_pem, generation=None, renewable=None, cn="plain")
    assert i.generation is None and not i.renewable and i.bot_name == "plain"


def test_store_load_roundtrip_modes_and_durability(tmp_path, key_pem, monkeypatch):
    d = tmp_path / "bot"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    i = make(key_pem)
    ident.store(d, i, ident.token_hash("tok"))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in (ident.IDENTITY_FILE, ident.TOKENHASH_FILE):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    assert len(synced) >= 4  # file + directory, for each of the two files
    assert sorted(p.name for p in d.iterdir()) == [ident.IDENTITY_FILE, ident.TOKENHASH_FILE]  # no temp left
    back = ident.load(d)
    assert back.key_pem == i.key_pem and back.tls_cert_pem == i.tls_cert_pem
    assert back.ssh_ca_lines == i.ssh_ca_lines and back.tls_ca_pems == i.tls_ca_pems
    assert ident.stored_token_hash(d) == ident.token_hash("tok")
    assert (d / ident.TOKENHASH_FILE).read_text().strip() == ident.token_hash("tok")


def test_renewal_store_keeps_token_hash(tmp_path, key_pem):
    ident.store(tmp_path, make(key_pem, generation="1"), ident.token_hash("tok"))
    ident.store(tmp_path, make(key_pem, generation="2"))
    assert ident.load(tmp_path).generation == 2
    assert ident.token_matches(tmp_path, "tok")
    assert not ident.token_matches(tmp_path, "other")
    assert not ident.token_matches(tmp_path, None)


def test_nothing_stored(tmp_path):
    assert ident.load(tmp_path) is None
    assert ident.stored_token_hash(tmp_path) is None


def test_crash_during_write_leaves_old_identity(tmp_path, key_pem, monkeypatch):
    ident.store(tmp_path, make(key_pem, generation="4"), "h")

    def boom(src, dst, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ident.IdentityError) as err:
        ident.store(tmp_path, make(key_pem, generation="5"))
    assert "No space left" in str(err.value)
    monkeypatch.undo()
    assert ident.load(tmp_path).generation == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [ident.IDENTITY_FILE, ident.TOKENHASH_FILE]


def test_damaged_file_is_one_clear_line(tmp_path):
    (tmp_path / ident.IDENTITY_FILE).write_text("{not json")
    with pytest.raises(ident.IdentityError) as err:
        ident.load(tmp_path)
    msg = str(err.value)
    assert "damaged" in msg and "join again" in msg and "\n" not in msg
    (tmp_path / ident.IDENTITY_FILE).write_text(json.dumps({"version": 1, "key": "x"}))
    with pytest.raises(ident.IdentityError, match="missing"):
        ident.load(tmp_path)


def test_split_pems_and_pin(key_pem):
    a, b = _cert(key_pem), _cert(key_pem, cn="other")
    parts = ident.split_pems(a + b"\n" + b)
    assert parts == [a, b]
    pin = ident.spki_pin(a)
    assert pin.startswith("sha256:") and len(pin) == 71
    assert pin == ident.spki_pin(b)  # same key -> same SPKI pin
    assert ident.cert_key_matches(a, key_pem)
    assert not ident.cert_key_matches(a, ident.generate_key())


def test_token_hash_is_sha256_hex():
    assert ident.token_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_renewal_store_skips_unchanged_tokenhash_and_cleans_temps(tmp_path, key_pem):
    ident.store(tmp_path, make(key_pem, generation="1"), "h1")
    (tmp_path / ".tmp-identity.json-abc").write_text("left by a killed writer")
    before = (tmp_path / ident.TOKENHASH_FILE).stat().st_ino
    ident.store(tmp_path, make(key_pem, generation="2"))
    # the token hash did not change: only identity.json is replaced per renewal
    assert (tmp_path / ident.TOKENHASH_FILE).stat().st_ino == before
    assert ident.load(tmp_path).generation == 2 and ident.stored_token_hash(tmp_path) == "h1"
    assert not list(tmp_path.glob(".tmp-*"))
    ident.store(tmp_path, make(key_pem, generation="1"), "h2")  # a new join rewrites it
    assert (tmp_path / ident.TOKENHASH_FILE).read_text().strip() == "h2"


# --- issue 11 point 3: room checked before asking, the answer on disk before it is parsed ---------------------
def test_reservation_refuses_a_full_disk_before_anything_is_asked(tmp_path, monkeypatch):
    real = os.fstatvfs

    def full(fd):
        st = real(fd)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 5, 5, st.f_files, st.f_ffree,
                                  st.f_favail, st.f_flag, st.f_namemax))
    monkeypatch.setattr(os, "fstatvfs", full)
    with pytest.raises(ident.StorageError) as ei:
        ident.check_storage(tmp_path / "bot")
    msg = str(ei.value)
    assert "KiB free" in msg and "not renewing" in msg and "free space" in msg and "\n" not in msg
    assert not list((tmp_path / "bot").glob(".tmp-*"))


def test_reservation_fallocate_failure_is_a_storage_error(tmp_path, monkeypatch):
    import errno

    def enospc(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ident.os, "posix_fallocate", enospc)
    with pytest.raises(ident.StorageError, match="No space left on device"):
        ident.check_storage(tmp_path)
    assert not list(tmp_path.glob(".tmp-*")), "the test write is cleaned up"


def test_reservation_commit_writes_in_place_then_syncs(tmp_path, key_pem):
    old = make(key_pem, generation="1")
    ident.store(tmp_path, old, "h1")
    new = make(key_pem, generation="2")
    res = ident.Reservation(tmp_path)
    assert len(list(tmp_path.glob(".tmp-identity.json-*"))) == 1
    data = ident.doc_bytes(new.key_pem, new.ssh_cert, new.tls_cert_pem, new.tls_ca_pems, new.ssh_ca_lines, "h1")
    assert data == new.to_json("h1"), "the raw write is the same file a parsed identity makes"
    t = res.commit(data)
    res.abort()
    assert t["visible"] <= t["durable"]
    assert ident.load(tmp_path).generation == 2 and ident.stored_token_hash(tmp_path) == "h1"
    assert (tmp_path / ident.IDENTITY_FILE).stat().st_size == len(data)
    assert oct((tmp_path / ident.IDENTITY_FILE).stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.glob(".tmp-*"))


def test_store_failure_hands_back_the_identity(tmp_path, key_pem, monkeypatch):
    idt = make(key_pem, generation="5")
    monkeypatch.setattr(ident, "MIN_FREE_BYTES", 1 << 62)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: os.statvfs_result((4096, 4096, 10, 0, 0, 10, 0, 0, 0, 255)))
    with pytest.raises(ident.UnsavedIdentityError) as ei:
        ident.store(tmp_path, idt, "h9")
    assert ei.value.identity is idt and ei.value.token_hash == "h9"
    assert "keeps it in memory" in str(ei.value)


def test_stale_reasons(tmp_path, key_pem):
    a, b = make(key_pem, generation="1"), make(key_pem, generation="2")
    assert ident.stale_reason(tmp_path, a) is None
    ident.mark_stale(tmp_path, a, ident.STALE_LOST)
    assert ident.stale_reason(tmp_path, a) == ident.STALE_LOST and ident.is_stale(tmp_path, a)
    assert ident.stale_reason(tmp_path, b) is None
    (tmp_path / ident.STALE_FILE).write_text(ident.cert_fingerprint(b.tls_cert_pem) + "\n")  # older format
    assert ident.stale_reason(tmp_path, b) == ident.STALE_LOCKED
