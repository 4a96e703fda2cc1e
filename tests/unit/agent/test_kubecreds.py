# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The exec plugin's own path (``machine-id-agent kube credentials`` through the console script, launch.main):
what it prints, that it does not import the rest of the agent, and that its errors and usage messages are the
ones the full command line gives."""

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
HEAVY = ("yaml", "machine_id_agent.config", "machine_id_agent.cli", "machine_id_agent.outputs",
         "machine_id_agent.logs", "machine_id_agent.renew", "machine_id_agent.service")

PROBE = """
import json, sys
from machine_id_agent.launch import main
rc = main(sys.argv[1:])
sys.stderr.write("\\nLOADED " + json.dumps(sorted(m for m in sys.modules if m in %r)) + "\\n")
sys.exit(rc)
""" % (HEAVY,)


def _run(*argv: str, entry: str = "launch"):
    code = PROBE if entry == "launch" else "import sys\nfrom machine_id_agent.cli import main\nsys.exit(main())\n"
    env = dict(os.environ, PYTHONPATH=str(AGENT_SRC))
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=60,
                          check=False)


def _loaded(stderr: str) -> list:
    return json.loads(stderr.rsplit("LOADED ", 1)[1])


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
    # the same document as the full command line's `kube credentials`
    full = _run("kube", "credentials", "--destination-dir", str(d), entry="cli")
    assert full.returncode == 0 and json.loads(full.stdout) == doc


@pytest.mark.parametrize("argv,code,says", [
    (["kube", "credentials", "--destination-dir", "{missing}"], 6, "no identity or kubeconfig.yaml yet"),
    (["kube", "credentials"], 2,
     "the following arguments are required: --destination-dir; see 'machine-id-agent kube credentials --help'"),
    # (the full command line's top parser reports this one and points at its own --help; the fast path points at
    # the subcommand's, which names the option that exists)
    (["kube", "credentials", "--destination-dir", "{dest}", "--bogus"], 2,
     "unrecognized arguments: --bogus; see 'machine-id-agent kube credentials --help'"),
    (["kube", "credentials", "--destination-dir", "{expired}"], 6, "the certificate expired at"),
])
def test_kube_credentials_errors_are_the_full_command_lines(tmp_path, argv, code, says):
    expired = tmp_path / "e"
    expired.mkdir()
    values = {"missing": str(tmp_path / "nothing"), "dest": str(_identity_dest(tmp_path)),
              "expired": str(_identity_dest(expired, days_valid=-1))}
    argv = [a.format(**values) for a in argv]
    fast, full = _run(*argv), _run(*argv, entry="cli")
    assert fast.returncode == full.returncode == code, (fast.stderr, full.stderr)
    first = fast.stderr.split("\nLOADED ")[0].strip()
    assert says in first and first.startswith("machine-id-agent: ") and "\n" not in first, first
    if "--bogus" not in argv:
        assert first == full.stderr.strip(), (first, full.stderr)
    assert "Traceback" not in fast.stderr and fast.stdout == ""


def test_every_other_command_goes_to_the_full_command_line():
    r = _run("version")
    assert r.returncode == 0 and r.stdout.startswith("machine-id-agent ")
    assert "machine_id_agent.cli" in _loaded(r.stderr)
    r = _run("kube")
    assert r.returncode == 2 and "kube: missing subcommand" in r.stderr
