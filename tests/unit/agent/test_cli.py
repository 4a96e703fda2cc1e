# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""CLI: init reports changed exactly, status --json shape, wait, kube credentials, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from machine_id_agent import cli, outputs, service
from machine_id_agent.config import KubeOutput

from test_outputs import make_creds  # noqa: E402  (same directory)
from test_service import TOKEN, FakeBackend, FakeIdent, make_cfg  # noqa: E402


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "machine_id_agent", *argv], capture_output=True, text=True,
                          timeout=60, check=False)


def test_init_changed_then_unchanged(tmp_path):
    d = tmp_path / "machine-id"
    cfg = make_cfg(tmp_path, destinations=[{"directory": str(d), "kubernetes_cluster": "k"}], acls="try")
    args = ["init", "-c", str(cfg.source), "--init-dir", str(d), "--bot-user", "root", "--owner", "root:root",
            "--reader-user", "nobody"]
    r1 = run_cli(*args, "--json")
    assert r1.returncode == 0, r1.stderr
    doc = json.loads(r1.stdout)
    assert doc["changed"] is True and doc["acl"] == "user::rwx,user:nobody:r-x,group::---,mask::r-x,other::---"
    r2 = run_cli(*args)
    assert (r2.returncode, r2.stdout) == (0, "unchanged\n")
    r3 = run_cli(*args[:-1], "root")
    assert (r3.returncode, r3.stdout) == (0, "changed\n")


def test_init_errors_are_one_line(tmp_path):
    cfg = make_cfg(tmp_path)
    r = run_cli("init", "-c", str(cfg.source), "--init-dir", "/elsewhere", "--bot-user", "root")
    assert r.returncode == 2 and "--init-dir: /elsewhere is not a destination" in r.stderr
    r = run_cli("init", "--init-dir", str(tmp_path / "x"), "--bot-user", "no-such-user-xyz")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_cli("init", "--init-dir", str(tmp_path / "x"))
    assert r.returncode == 2 and "--bot-user" in r.stderr


def test_status_json_shape(tmp_path, monkeypatch, capsys):
    be = FakeBackend()
    monkeypatch.setattr(service, "Backend", lambda: be)
    cfg = make_cfg(tmp_path)
    assert cli.main(["status", "-c", str(cfg.source), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["identity"] == {"present": False, "valid": False, "expires": None, "bot": None,
                               "token_hash_matches": None, "state": "none", "problem": None, "fix": None}
    assert doc["outputs"][0]["present"] is False
    assert doc["agent_version"] == cli.__version__
    service.Agent(cfg, backend=be).attempt()
    assert cli.main(["status", "-c", str(cfg.source), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    i = doc["identity"]
    assert (i["present"], i["valid"], i["bot"], i["token_hash_matches"]) == (True, True, "example", True)
    assert doc["outputs"][0]["valid"] is True and doc["outputs"][0]["kubernetes_cluster"] == "example-k8s-cluster"
    # a new token in the config: the identity is kept, the role sees the mismatch
    be.hash = "h:other"
    cli.main(["status", "-c", str(cfg.source), "--json"])
    assert json.loads(capsys.readouterr().out)["identity"]["token_hash_matches"] is False
    be.stored = FakeIdent(3, ttl=-10)
    cli.main(["status", "-c", str(cfg.source), "--json"])
    assert json.loads(capsys.readouterr().out)["identity"]["valid"] is False
    assert TOKEN not in capsys.readouterr().out


def test_wait_file_based(tmp_path):
    d = tmp_path / "out"
    r = run_cli("wait", "--destination-dir", str(d), "--timeout", "0.5")
    assert r.returncode == 1 and "not ready after 0.5s" in r.stderr
    outputs.write_kube(KubeOutput(destination=d, kubernetes_cluster="k"), make_creds(), "tc",
                       outputs.KubeEndpoint("https://x:1"), acls="off")
    r = run_cli("wait", "--destination-dir", str(d), "--timeout", "5")
    assert (r.returncode, r.stdout) == (0, "ready\n")


def test_kube_credentials_command(tmp_path):
    d = tmp_path / "out"
    c = make_creds()
    outputs.write_kube(KubeOutput(destination=d, kubernetes_cluster="k", exec_plugin=True), c, "tc",
                       outputs.KubeEndpoint("https://x:1"), acls="off")
    r = run_cli("kube", "credentials", "--destination-dir", str(d))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"]["clientCertificateData"] == c.cert_pem.decode()
    r = run_cli("kube", "credentials", "--destination-dir", str(tmp_path / "none"))
    assert r.returncode == 6 and "start the agent" in r.stderr


def test_kube_credentials_expired_is_one_clear_line_without_secrets(tmp_path):
    d = tmp_path / "out"
    c = make_creds(days_valid=-0.01)
    outputs.write_kube(KubeOutput(destination=d, kubernetes_cluster="k"), c, "tc",
                       outputs.KubeEndpoint("https://x:1"), acls="off")
    r = run_cli("kube", "credentials", "--destination-dir", str(d))
    assert (r.returncode, r.stdout) == (6, "")
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("machine-id-agent: %s: the certificate expired at " % d), r.stderr
    assert "machine-id-agent status" in lines[0] and "PRIVATE" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv,code", [([], 2), (["nope"], 2), (["version"], 0), (["start", "-c", "/nonexistent"], 2)])
def test_exit_codes(argv, code):
    r = run_cli(*argv)
    assert r.returncode == code, r
    assert "Traceback" not in r.stderr


def test_wait_on_diag_addr(tmp_path):
    from machine_id_agent.diag import DiagServer
    state = {"ready": False, "reason": "no renewal has finished yet"}
    srv = DiagServer("127.0.0.1:0", lambda: dict(state))
    srv.start()
    try:
        addr = "127.0.0.1:%d" % srv.address[1]
        r = run_cli("wait", "--diag-addr", addr, "--timeout", "0.5")
        assert r.returncode == 1 and "no renewal has finished yet" in r.stderr, r.stderr
        state["ready"] = True
        r = run_cli("wait", "--diag-addr", addr, "--timeout", "5")
        assert (r.returncode, r.stdout) == (0, "ready\n"), r.stderr
    finally:
        srv.stop()


def test_status_names_locked_lost_and_full_storage_with_the_fix(tmp_path, monkeypatch, capsys):
    """Issue 11 point 3: `status` says plainly when the bot is locked, lost a renewal, or the storage is full."""
    from machine_id_agent import identity as identmod
    from test_identity import make  # a real Identity

    key = identmod.generate_key()
    cfg = make_cfg(tmp_path)
    idt = make(key, generation="3")
    identmod.store(cfg.storage_dir, idt, "h")

    def status():
        assert cli.main(["status", "-c", str(cfg.source), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["identity"]

    i = status()
    assert (i["state"], i["problem"], i["generation"]) == ("ok", None, 3)
    identmod.mark_stale(cfg.storage_dir, idt, identmod.STALE_LOST)
    i = status()
    assert i["state"] == "lost-renewal" and "lost a renewal" in i["problem"] and "not locked" in i["problem"]
    assert "tctl bots add" in i["fix"]
    identmod.mark_stale(cfg.storage_dir, idt)
    i = status()
    assert i["state"] == "locked" and "locked" in i["problem"] and "tctl rm lock/" in i["fix"]
    assert cli.main(["status", "-c", str(cfg.source)]) == 0
    text = capsys.readouterr().out
    assert "state: LOCKED: " in text and "\nfix: " in text
    (cfg.storage_dir / identmod.STALE_FILE).unlink()
    monkeypatch.setattr(identmod, "MIN_FREE_BYTES", 1 << 62)
    i = status()
    assert i["state"] == "storage-full" and "free" in i["problem"] and "renews again by itself" in i["fix"]


def test_status_check_acls_reports_what_init_would_change_as_the_running_user(tmp_path, monkeypatch, capsys):
    """``status --check-acls`` (the role's no-change check, one process for status and the ACLs): per output what
    ``init -c CONFIG`` run by this user would change, with the config's readers; nothing is changed."""
    monkeypatch.setattr(service, "Backend", FakeBackend)
    d = tmp_path / "machine-id"
    cfg = make_cfg(tmp_path, destinations=[{"directory": str(d), "kubernetes_cluster": "k", "readers": ["nobody"]}],
                   acls="try")

    def check():
        assert cli.main(["status", "-c", str(cfg.source), "--json", "--check-acls"]) == 0
        return json.loads(capsys.readouterr().out)["outputs"][0]["acl_check"]

    assert check() == {"changed": True, "actions": ["would create %s" % d, "would chown root:root",
                                                    "would set the acl of %s" % d], "warnings": []}
    assert not d.exists()
    assert run_cli("init", "-c", str(cfg.source), "--init-dir", str(d), "--bot-user", "root").returncode == 0
    assert check() == {"changed": False, "actions": [], "warnings": []}
    # the reader's entry removed by hand: named (the role sends the host down its full path, whose init fixes it)
    subprocess.run(["setfacl", "-x", "u:nobody", str(d)], check=True)
    assert check()["actions"] == ["would set the acl of %s" % d]
    # without the flag, no acl_check (what an older role asks)
    assert cli.main(["status", "-c", str(cfg.source), "--json"]) == 0
    assert "acl_check" not in json.loads(capsys.readouterr().out)["outputs"][0]


def test_status_names_a_configured_token_teleport_refused(tmp_path, monkeypatch, capsys):
    """The agent keeps renewing when Teleport refuses a changed token; status says so instead of 're-join
    pending', from the note the agent leaves in the storage (only for that token)."""
    from machine_id_agent import identity
    be = FakeBackend()
    monkeypatch.setattr(service, "Backend", lambda: be)
    cfg = make_cfg(tmp_path)
    identity.ensure_storage_dir(cfg.storage_dir)
    service.Agent(cfg, backend=be).attempt()
    be.hash = "h:other"  # the configured token is no longer the one the identity joined with
    assert cli.main(["status", "-c", str(cfg.source)]) == 0
    assert "re-join pending" in capsys.readouterr().out
    identity.mark_token_refused(cfg.storage_dir, "h:someone-else", "refused")
    cli.main(["status", "-c", str(cfg.source), "--json"])
    assert "token_refused" not in json.loads(capsys.readouterr().out)["identity"]  # a note about another token
    identity.mark_token_refused(cfg.storage_dir, "h:" + TOKEN, "the proxy refused the join token: it is used")
    cli.main(["status", "-c", str(cfg.source), "--json"])
    refused = json.loads(capsys.readouterr().out)["identity"]["token_refused"]
    assert refused["reason"] == "the proxy refused the join token: it is used" and refused["at"].endswith("Z")
    cli.main(["status", "-c", str(cfg.source)])
    out = capsys.readouterr().out
    assert "Teleport refused it, the agent keeps renewing this identity" in out and "re-join pending" not in out
    assert "token: refused at " in out and TOKEN not in out
    identity.clear_token_refused(cfg.storage_dir)
    cli.main(["status", "-c", str(cfg.source)])
    assert "re-join pending" in capsys.readouterr().out


def _real_identity(hours: float):
    from machine_id_agent import identity
    from test_identity import _cert  # noqa: E402  (same directory)
    key = identity.generate_key()
    return identity.Identity(key_pem=key, tls_cert_pem=_cert(key, hours=hours), ssh_cert=b"x\n",
                             tls_ca_pems=[b"-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n"],
                             ssh_ca_lines=[b"@cert-authority x\n"])


@pytest.mark.parametrize("case", ["expired", "lost-renewal", "locked"])
def test_status_names_a_refusal_only_while_the_agent_keeps_its_identity(tmp_path, capsys, case):
    """An expired or stale identity is not kept: the agent tries the configured token at every cycle. The note
    left from an earlier refusal must not make status say the agent keeps renewing; state says what to do."""
    from machine_id_agent import identity
    cfg = make_cfg(tmp_path)
    ident = _real_identity(-0.01 if case == "expired" else 1)
    identity.store(cfg.storage_dir, ident, "hash-of-an-older-token")
    if case != "expired":
        identity.mark_stale(cfg.storage_dir, ident, case)
    identity.mark_token_refused(cfg.storage_dir, identity.token_hash(TOKEN), "the proxy refused the join token")
    assert cli.main(["status", "-c", str(cfg.source), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["identity"]
    assert doc["state"] == case and doc["token_hash_matches"] is False and "token_refused" not in doc
    cli.main(["status", "-c", str(cfg.source)])
    out = capsys.readouterr().out
    assert "keeps renewing" not in out and "token: refused" not in out and "re-join pending" in out


def test_a_damaged_refusal_note_is_ignored(tmp_path, capsys):
    from machine_id_agent import identity
    cfg = make_cfg(tmp_path)
    identity.ensure_storage_dir(cfg.storage_dir)
    note = cfg.storage_dir / identity.TOKEN_REFUSED_FILE
    for text in ('{"token_hash": "\u00e9"}', "not json", "[1, 2]", '{"token_hash": null}'):
        note.write_text(text)
        assert identity.token_refusal(cfg.storage_dir, "ab" * 32) is None, text


def test_the_refusal_note_on_a_real_storage(tmp_path):
    """The real Backend's note: written without following a symlink planted in its place, read back only for
    the same token hash, removed after a join."""
    from machine_id_agent import identity
    cfg = make_cfg(tmp_path)
    identity.ensure_storage_dir(cfg.storage_dir)
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    note = cfg.storage_dir / identity.TOKEN_REFUSED_FILE
    note.symlink_to(victim)
    be = service.Backend()
    be.note_token_refused(cfg.storage_dir, "ab" * 32, "refused")
    assert victim.read_text() == "keep\n" and not note.is_symlink()
    assert identity.token_refusal(cfg.storage_dir, "ab" * 32)["reason"] == "refused"
    assert identity.token_refusal(cfg.storage_dir, "cd" * 32) is None
    be.note_token_refused(cfg.storage_dir, None, None)
    assert not note.exists() and identity.token_refusal(cfg.storage_dir, "ab" * 32) is None
