# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Adopting a host set up by hand with tbot: the import of tbot's storage files (good, partial, mismatched,
expired), what ``status`` reports for them, the service's first cycle, and tbot's storage lock."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from machine_id_agent import cli, identity as ident, service, tbot_import
from machine_id_agent.errors import ConfigError
from machine_id_agent.service import Agent

from test_identity import _cert  # noqa: E402  (same directory)
# logbuf is a fixture the tests take by name
from test_service import FakeBackend, FakeClient, logbuf, make_cfg  # noqa: E402,F401  pylint: disable=unused-import

CA1 = (b"-----BEGIN CERTIFICATE-----\nMIIBOne\n-----END CERTIFICATE-----\n")
CA2 = (b"-----BEGIN CERTIFICATE-----\nMIIBTwo\n-----END CERTIFICATE-----\n")
HASH = "0f" * 32


@pytest.fixture(scope="module")
def key_pem():
    return ident.generate_key()


def write_tbot(storage, key_pem, cert=None, skip=(), **cert_kw):
    """tbot v13's storage layout (lib/tbot/identity), as it writes it (CAs joined with ``$``)."""
    storage.mkdir(mode=0o700, exist_ok=True)
    files = {
        "key": key_pem,
        "key.pub": ident.ssh_public_key(key_pem),
        "tlscert": cert if cert is not None else _cert(key_pem, **cert_kw),
        "key-cert.pub": b"ssh-rsa-cert-v01@openssh.com AAAAcert bot\n",
        "tlscacerts": CA1 + b"$" + CA2,
        "sshcacerts": b"@cert-authority * ssh-rsa AAAAone\n$@cert-authority * ssh-rsa AAAAtwo\n",
        "tokenhash": HASH.encode(),
        ".write-test": b"",
        "lock": b"",
    }
    for name, data in files.items():
        if name in skip:
            continue
        (storage / name).write_bytes(data)
        os.chmod(storage / name, 0o600)
    return files


def test_good_identity_is_imported_once_and_tbot_files_moved_aside(tmp_path, key_pem):
    storage = tmp_path / "bot"
    files = write_tbot(storage, key_pem, generation="7")
    peeked = tbot_import.peek(storage)
    assert peeked.generation == 7 and peeked.bot_name == "example"
    assert not (storage / "identity.json").exists(), "peek (status) must change nothing"

    got = tbot_import.adopt(storage)
    assert got.generation == 7
    loaded = ident.load(storage)
    assert loaded.tls_cert_pem == files["tlscert"] and loaded.key_pem == key_pem and loaded.generation == 7
    assert loaded.tls_ca_pems == [CA1, CA2]
    assert loaded.ssh_ca_lines == [b"@cert-authority * ssh-rsa AAAAone\n", b"@cert-authority * ssh-rsa AAAAtwo\n"]
    assert loaded.ssh_cert == files["key-cert.pub"]
    assert ident.stored_token_hash(storage) == HASH  # a changed token in the config is still noticed
    assert stat_mode(storage / "identity.json") == 0o600
    # tbot's identity files are gone from where a tbot started by mistake would read (and present) them
    for name in ("key", "tlscert", "key-cert.pub", "tlscacerts", "sshcacerts", "tokenhash"):
        assert not (storage / name).exists(), name
        assert (storage / tbot_import.ADOPTED_DIR / name).read_bytes() == files[name]
    assert tbot_import.adopted(storage)
    # once: nothing left to import (identity.json is authoritative from now on)
    assert tbot_import.adopt(storage) is None


def stat_mode(p):
    return os.stat(p).st_mode & 0o777


def test_old_sshcert_name_is_read(tmp_path, key_pem):
    storage = tmp_path / "bot"
    write_tbot(storage, key_pem, skip=("key-cert.pub",))
    (storage / "sshcert").write_bytes(b"ssh-rsa-cert-v01@openssh.com AAAAold\n")
    assert tbot_import.adopt(storage).ssh_cert == b"ssh-rsa-cert-v01@openssh.com AAAAold\n"


def test_nothing_from_tbot_is_none(tmp_path):
    assert tbot_import.peek(tmp_path / "missing") is None
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "lock").write_bytes(b"")  # tbot init / a tbot that never joined leaves only these
    (tmp_path / "bot" / ".write-test").write_bytes(b"")
    assert tbot_import.peek(tmp_path / "bot") is None and tbot_import.adopt(tmp_path / "bot") is None


@pytest.mark.parametrize("missing", ["tlscert", "tlscacerts", "key-cert.pub"])
def test_partial_identity_is_refused_and_nothing_is_written(tmp_path, key_pem, missing):
    storage = tmp_path / "bot"
    write_tbot(storage, key_pem, skip=(missing,))
    with pytest.raises(tbot_import.TbotIdentityError) as exc:
        tbot_import.adopt(storage)
    msg = str(exc.value)
    assert exc.value.state == "damaged" and exc.value.needs_token
    assert "incomplete (%s missing or empty)" % missing in msg and "new join token" in msg and "\n" not in msg
    assert not (storage / "identity.json").exists() and (storage / "key").exists()


def test_empty_file_counts_as_missing(tmp_path, key_pem):
    storage = tmp_path / "bot"
    write_tbot(storage, key_pem)
    (storage / "tlscert").write_bytes(b"")  # tbot writes with O_TRUNC: killed in between leaves it empty
    with pytest.raises(tbot_import.TbotIdentityError, match=r"incomplete \(tlscert missing or empty\)"):
        tbot_import.peek(storage)


def test_key_not_matching_the_certificate_is_refused(tmp_path, key_pem):
    storage = tmp_path / "bot"
    other = ident.generate_key()
    write_tbot(storage, key_pem, cert=_cert(other))
    with pytest.raises(tbot_import.TbotIdentityError, match=r"mismatched: key is not the key of tlscert") as exc:
        tbot_import.adopt(storage)
    assert exc.value.state == "damaged"
    assert not (storage / "identity.json").exists()


def test_expired_identity_is_refused_as_expired(tmp_path, key_pem):
    storage = tmp_path / "bot"
    write_tbot(storage, key_pem, hours=-0.005)
    with pytest.raises(tbot_import.TbotIdentityError, match=r"expired at .*new join token") as exc:
        tbot_import.adopt(storage)
    assert exc.value.state == "expired"
    assert not (storage / "identity.json").exists()


def test_non_renewable_identity_is_refused(tmp_path, key_pem):
    storage = tmp_path / "bot"
    write_tbot(storage, key_pem, renewable=None)
    with pytest.raises(tbot_import.TbotIdentityError, match="not a renewable bot identity"):
        tbot_import.peek(storage)


def test_garbage_certificate_is_one_line(tmp_path, key_pem):
    storage = tmp_path / "bot"
    write_tbot(storage, key_pem, cert=b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(tbot_import.TbotIdentityError, match="does not parse") as exc:
        tbot_import.peek(storage)
    assert "\n" not in str(exc.value)


# --- status: what agent_state reads -------------------------------------------------------------------------------
def _status(cfg, capsys):
    assert cli.main(["status", "-c", str(cfg.source), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["identity"]


def test_status_reports_an_adoptable_tbot_identity_as_valid(tmp_path, key_pem, capsys):
    cfg = make_cfg(tmp_path)
    write_tbot(cfg.storage_dir, key_pem, generation="4")
    i = _status(cfg, capsys)
    assert (i["present"], i["valid"], i["state"], i["source"], i["bot"], i["generation"]) == (
        True, True, "ok", "tbot", "example", 4)
    assert not (cfg.storage_dir / "identity.json").exists()


@pytest.mark.parametrize("case,state", [("expired", "expired"), ("mismatched", "damaged"), ("partial", "damaged")])
def test_status_sends_an_unusable_tbot_identity_to_a_token(tmp_path, key_pem, capsys, case, state):
    cfg = make_cfg(tmp_path)
    if case == "expired":
        write_tbot(cfg.storage_dir, key_pem, hours=-0.005)
    elif case == "mismatched":
        write_tbot(cfg.storage_dir, key_pem, cert=_cert(ident.generate_key()))
    else:
        write_tbot(cfg.storage_dir, key_pem, skip=("tlscacerts",))
    i = _status(cfg, capsys)
    assert (i["valid"], i["state"], i["source"]) == (False, state, "tbot")
    assert "cannot be adopted" in i["problem"] and "join token" in i["fix"]


# --- the service ------------------------------------------------------------------------------------------------
class AdoptingBackend(FakeBackend):
    """The fake protocol backend with the real import (identity.json is the fake's ``stored``)."""

    def __init__(self, storage):
        super().__init__()
        self.storage = storage

    def adopt_tbot(self, d):
        got = tbot_import.adopt(d)
        if got is not None:
            self.calls.append(("adopt", got.generation))
            self.stored, self.hash = got, None
        return got


def test_first_cycle_adopts_and_renews_at_once_without_a_token(tmp_path, key_pem, logbuf):
    cfg = make_cfg(tmp_path, onboarding={"token": str(tmp_path / "token")})  # no token file
    write_tbot(cfg.storage_dir, key_pem, generation="5")
    be = AdoptingBackend(cfg.storage_dir)
    renewed = []

    class Client(FakeClient):
        def renew_identity(self, ttl):
            renewed.append(self.ident.generation)
            self.be.calls.append(("renew", self.ident.generation))
            fresh = {"generation": 6, "not_after": self.ident.not_after, "bot_name": "example",
                     "valid": lambda s, n=None: True}
            self.be.stored = self.ident = type("I", (), fresh)()
            return self.ident

    be.client = lambda cfg, ident, facts: Client(be, ident)
    assert Agent(cfg, backend=be, log=logbuf[0]).run_oneshot() == 0
    assert be.calls[:2] == [("adopt", 5), ("renew", 5)]
    assert not [c for c in be.calls if c[0] == "join"]
    assert "adopted the identity tbot left in" in logbuf[1].getvalue()


def test_unusable_tbot_identity_without_a_token_stops_with_the_fix(tmp_path, key_pem, logbuf):
    cfg = make_cfg(tmp_path, onboarding={"token": str(tmp_path / "token")})
    write_tbot(cfg.storage_dir, key_pem, hours=-0.005)
    be = AdoptingBackend(cfg.storage_dir)
    rc = Agent(cfg, backend=be, log=logbuf[0]).run_oneshot()
    assert rc != 0
    assert "expired at" in logbuf[1].getvalue() and "join token" in logbuf[1].getvalue()
    assert not [c for c in be.calls if c[0] in ("join", "adopt")]


def test_unusable_tbot_identity_with_a_token_joins_like_a_new_host(tmp_path, key_pem, logbuf):
    cfg = make_cfg(tmp_path)  # with a token (the rollout minted one: status said expired)
    write_tbot(cfg.storage_dir, key_pem, cert=_cert(ident.generate_key()))
    be = AdoptingBackend(cfg.storage_dir)
    assert Agent(cfg, backend=be, log=logbuf[0]).run_oneshot() == 0
    assert be.calls[0][0] == "join"
    assert "not adopting tbot's identity" in logbuf[1].getvalue() and "mismatched" in logbuf[1].getvalue()


def test_agent_refuses_to_start_while_tbot_holds_its_storage_lock(tmp_path, logbuf, monkeypatch):
    cfg = make_cfg(tmp_path)
    cfg.storage_dir.mkdir(mode=0o700)
    fd = os.open(str(cfg.storage_dir / "lock"), os.O_RDWR | os.O_CREAT, 0o600)  # what a running tbot holds
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setattr(service, "TBOT_LOCK_WAIT", 0.2)
    try:
        a = Agent(cfg, backend=FakeBackend(), log=logbuf[0])
        with pytest.raises(ConfigError, match=r"lock tbot takes while it runs: a tbot is renewing this identity; "
                                              r"stop and disable its unit first"):
            a.acquire_lock()
        # and it let go of its own lock again: a retry after tbot stopped works
        fcntl.flock(fd, fcntl.LOCK_UN)
        a.acquire_lock()
        # while the agent runs, a tbot started on the same storage cannot get its lock (tbot then refuses to run)
        fd2 = os.open(str(cfg.storage_dir / "lock"), os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd2)
        a.release_lock()
    finally:
        os.close(fd)
