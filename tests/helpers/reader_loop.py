# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a switch or an upgrade on a real host must not break, observed from outside: a reader loop of ``kubectl
get pods`` as the application's user, and the bot's generation as its certificate and Teleport count it."""

from __future__ import annotations

import json

from cryptography import x509

from helpers.fleet import wait_for

OID_GENERATION = x509.ObjectIdentifier("1.3.9999.1.14")
LOOP_DIR = "/var/tmp/reader-loop"
LOOP_LOG = LOOP_DIR + "/log"


def loop_script(dest: str) -> str:
    """One line per ``kubectl get pods`` with its exit status and which program the kubeconfig's exec plugin
    names, until LOOP_DIR/stop appears."""
    return f"""
while [ ! -e {LOOP_DIR}/stop ]; do
  who=$(grep -o 'command: [^ ]*' {dest}/kubeconfig.yaml | head -1)
  out=$(/usr/local/bin/kubectl --kubeconfig {dest}/kubeconfig.yaml --request-timeout=20s get pods -n demo -o name 2>&1)
  rc=$?
  echo "$(date +%s.%N) rc=$rc $who $(echo "$out" | tr '\\n' ' ' | cut -c1-200)" >> {LOOP_LOG}
  sleep 0.3
done
"""


def _sh(host, script: str, check: bool = True):
    r = host.run(["sh", "-c", script], check=False, timeout=120)
    if check:
        assert r.returncode == 0, f"{script}\n{r.stdout}\n{r.stderr}"
    return r


def start_loop(host, unit: str, dest: str, reader: str = "app") -> None:
    """Start the loop as a transient unit ``unit`` running as ``reader``; returns after its first success."""
    _sh(host, f"mkdir -p {LOOP_DIR} && chown {reader} {LOOP_DIR} && rm -f {LOOP_DIR}/*")
    (host.root / "var/tmp/reader-loop.sh").write_text(loop_script(dest))
    _sh(host, f"systemd-run --unit={unit} -p User={reader} /bin/sh /var/tmp/reader-loop.sh")
    log = host.root / LOOP_LOG.lstrip("/")
    assert wait_for(lambda: log.exists() and "rc=0" in log.read_text(), timeout=60), \
        log.read_text()[-2000:] if log.exists() else "the reader loop wrote nothing"


def stop_loop(host, unit: str) -> list[str]:
    """Stop the loop and return its lines."""
    _sh(host, f"touch {LOOP_DIR}/stop")
    assert wait_for(lambda: _sh(host, f"systemctl is-active {unit}", check=False).stdout.strip() != "active",
                    timeout=60)
    return (host.root / LOOP_LOG.lstrip("/")).read_text().splitlines()


def failed(lines: list[str], label: str = "reader loop") -> list[str]:
    """The loop's failed iterations (printed with the count, for the test's log)."""
    bad = [line for line in lines if " rc=0 " not in line]
    print(f"[{label}] {len(lines)} iterations, {len(bad)} failed")
    return bad


def cert_generation(pem: bytes) -> int:
    cert = x509.load_pem_x509_certificate(pem)
    return int(cert.subject.get_attributes_for_oid(OID_GENERATION)[0].value)


def server_generation(tp, bot) -> int:
    doc = json.loads(tp.tctl("get", f"user/bot-{bot}", "--format=json", check=True).stdout)
    return int(doc[0]["metadata"]["labels"]["teleport.internal/bot-generation"])


def locks(tp) -> str:
    return tp.tctl("get", "locks", check=True).stdout
