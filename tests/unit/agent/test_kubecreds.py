# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The exec plugin's own path (``machine-id-agent kube credentials`` through the console script, cli.main): what it
prints, that it does not import the rest of the agent, and that its errors are one line with the exit code of
their kind; and that importing the command line for any other command does not import cryptography."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_outputs import make_creds

AGENT_SRC = Path(__file__).resolve().parents[3] / "agent" / "src"
# what the exec plugin must not pay for on every kubectl call
HEAVY = ("yaml", "machine_id_agent.config", "machine_id_agent.outputs",
         "machine_id_agent.logs", "machine_id_agent.renew", "machine_id_agent.service")

PROBE = """
import json, sys
from machine_id_agent.cli import main
rc = main(sys.argv[1:])
sys.stderr.write("\\nLOADED " + json.dumps(sorted(m for m in sys.modules if m in %r)) + "\\n")
sys.exit(rc)
""" % (HEAVY,)


def _run(*argv: str):
    env = dict(os.environ, PYTHONPATH=str(AGENT_SRC))
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=60,
                          check=False)


def _loaded(stderr: str) -> list:
    return json.loads(stderr.rsplit("LOADED ", 1)[1])


def _write(dest: Path, creds) -> None:
    """One kubernetes output in ``dest`` as the agent writes it (exec plugin on, so with its validity record)."""
    from machine_id_agent import outputs
    from machine_id_agent.config import KubeOutput
    outputs.write_kube(KubeOutput(destination=dest, kubernetes_cluster="k"), creds, "tc",
                       outputs.KubeEndpoint("https://x:1"), acls="off")


def _identity_dest(tmp_path: Path, days_valid: float = 1.0) -> Path:
    c = make_creds(days_valid)
    d = tmp_path / "out"
    d.mkdir()
    (d / "identity").write_bytes(c.key_pem + c.cert_pem)
    (d / "kubeconfig.yaml").write_text("apiVersion: v1\n")
    return d


def test_kube_credentials_prints_the_exec_credential_without_importing_the_rest_of_the_agent(tmp_path):
    d = _identity_dest(tmp_path)
    r = _run("kube", "credentials", "--destination-dir", str(d))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "ExecCredential" and "BEGIN CERTIFICATE" in doc["status"]["clientCertificateData"]
    assert _loaded(r.stderr) == []
    # the same document as the exec plugin's function itself
    from machine_id_agent import kubecreds
    again = kubecreds.exec_credential(d)
    assert doc["status"]["clientKeyData"] == again["status"]["clientKeyData"]
    assert doc["status"]["expirationTimestamp"] == again["status"]["expirationTimestamp"]


@pytest.mark.parametrize("argv,code,says", [
    (["kube", "credentials", "--destination-dir", "{missing}"], 6, "no identity or kubeconfig.yaml yet"),
    (["kube", "credentials"], 2,
     "the following arguments are required: --destination-dir; see 'machine-id-agent kube credentials --help'"),
    (["kube", "credentials", "--destination-dir", "{dest}", "--bogus"], 2,
     "unrecognized arguments: --bogus; see 'machine-id-agent kube credentials --help'"),
    (["kube", "credentials", "--destination-dir", "{expired}"], 6, "the certificate expired at"),
])
def test_kube_credentials_errors_are_one_line_with_the_exit_code_of_their_kind(tmp_path, argv, code, says):
    expired = tmp_path / "e"
    expired.mkdir()
    values = {"missing": str(tmp_path / "nothing"), "dest": str(_identity_dest(tmp_path)),
              "expired": str(_identity_dest(expired, days_valid=-1))}
    argv = [a.format(**values) for a in argv]
    r = _run(*argv)
    assert r.returncode == code, r.stderr
    first = r.stderr.split("\nLOADED ")[0].strip()
    assert says in first and first.startswith("machine-id-agent: ") and "\n" not in first, first
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_every_other_command_goes_to_the_full_command_line_without_cryptography_for_version():
    r = _run("version")
    assert r.returncode == 0 and r.stdout.startswith("machine-id-agent ")
    assert "machine_id_agent.config" in _loaded(r.stderr)
    env = dict(os.environ, PYTHONPATH=str(AGENT_SRC))
    probe = ("import sys\nfrom machine_id_agent.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n"
             "    pass\nprint(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr
    r = _run("kube")
    assert r.returncode == 2 and "kube: missing subcommand" in r.stderr


def test_kube_credentials_takes_the_validity_the_agent_recorded_and_does_not_import_cryptography(tmp_path):
    """An identity file the agent wrote (outputs.write_kube) comes with its record (identity.validity.json): the
    plugin's answer is the same as from reading the certificate, without importing cryptography. A record that
    does not name these bytes (another pair written by hand, a damaged record, none) is not used."""
    from machine_id_agent import kubecreds
    c = make_creds()
    dest = tmp_path / "out"
    _write(dest, c)
    record = json.loads((dest / kubecreds.VALIDITY).read_text())
    assert set(record) == {"identity"} and record["identity"]["not_after"] == c.not_after.isoformat()
    r = subprocess.run([sys.executable, "-c", PROBE.replace("%r" % (HEAVY,), "%r" % (HEAVY + ("cryptography",),)),
                        "kube", "credentials", "--destination-dir", str(dest)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(AGENT_SRC)), timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert _loaded(r.stderr) == [], "cryptography imported although the record names this identity file"
    fast = json.loads(r.stdout)
    (dest / kubecreds.VALIDITY).unlink()
    slow = kubecreds.exec_credential(dest)
    assert fast == slow
    # a record of other bytes: the pair is read and judged (here: a key that is not the certificate's)
    _write(dest, c)
    other = make_creds()
    (dest / "identity").write_bytes(c.key_pem + other.cert_pem)
    with pytest.raises(Exception, match="do not match"):
        kubecreds.exec_credential(dest)
    # a damaged record: read the certificate instead
    (dest / "identity").write_bytes(c.key_pem + c.cert_pem)
    (dest / kubecreds.VALIDITY).write_text("{not json")
    assert kubecreds.exec_credential(dest)["status"]["expirationTimestamp"] == slow["status"]["expirationTimestamp"]
    # the agent records no validity for a pair that does not match
    assert kubecreds.validity_record(b"x", c.key_pem, other.cert_pem) is None


def test_kube_credentials_reads_the_certificate_when_the_record_is_denied(tmp_path, monkeypatch):
    """A reader that may read the identity but not its record (an ACL set by hand): the plugin answers from the
    certificate, the same answer, and names no error."""
    from machine_id_agent import fsutil, kubecreds
    c = make_creds()
    dest = tmp_path / "out"
    _write(dest, c)
    with_record = kubecreds.exec_credential(dest)
    real_read = fsutil.read_bytes
    denied = []

    def read_bytes(path):
        if Path(path).name == kubecreds.VALIDITY:
            denied.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(kubecreds.fsutil, "read_bytes", read_bytes)
    assert kubecreds.exec_credential(dest) == with_record
    assert denied, "the record was not read at all"


def test_a_full_disk_at_the_record_fails_the_write_and_leaves_nothing_that_misleads_the_plugin(tmp_path, monkeypatch):
    """ENOSPC while the agent writes the validity record of a renewal: the write fails with an error that names
    the record and the cause, no temp file stays, the old record stays whole, and the plugin, which now finds the
    new identity beside a record of other bytes, answers from the new certificate, not from the old record."""
    import errno
    from machine_id_agent import fsutil, kubecreds
    dest = tmp_path / "out"
    old, new = make_creds(days_valid=1.0), make_creds(days_valid=2.0)
    _write(dest, old)
    old_record = (dest / kubecreds.VALIDITY).read_bytes()
    old_kubeconfig = (dest / kubecreds.KUBECONFIG).read_bytes()
    real_write = os.write

    def write(fd, data):
        if os.path.basename(os.readlink("/proc/self/fd/%d" % fd)).startswith(
                fsutil.TMP_PREFIX + kubecreds.VALIDITY):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(fsutil.os, "write", write)
    with pytest.raises(fsutil.OutputError) as err:
        _write(dest, new)
    monkeypatch.undo()
    assert kubecreds.VALIDITY in str(err.value) and "No space left on device" in str(err.value)
    assert [n for n in os.listdir(dest) if n.startswith(fsutil.TMP_PREFIX)] == []
    assert (dest / kubecreds.VALIDITY).read_bytes() == old_record
    assert (dest / kubecreds.KUBECONFIG).read_bytes() == old_kubeconfig  # written last, so not reached
    assert new.cert_pem in (dest / kubecreds.IDENTITY).read_bytes()
    answer = kubecreds.exec_credential(dest)
    assert answer["status"]["clientCertificateData"] == new.cert_pem.decode()
    (dest / kubecreds.VALIDITY).unlink()
    assert answer == kubecreds.exec_credential(dest)  # what the certificate itself says
    assert answer["status"]["expirationTimestamp"] > old.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
