# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a switch or an upgrade on a real host must not break, observed from outside: a reader loop of ``kubectl
get pods`` (or of the exec plugin itself, back to back) as the application's user, and the bot's generation as its
certificate and Teleport count it."""

from __future__ import annotations

import json

from cryptography import x509

from helpers.fleet import AGENT, wait_for
from helpers.tbot_by_hand import sh as _sh

OID_GENERATION = x509.ObjectIdentifier("1.3.9999.1.14")
LOOP_ROOT = "/var/tmp/reader-loop"


def loop_script(dest: str, loop_dir: str, plugin_only: bool = False) -> str:
    """One line per call with its exit status (and, for kubectl, which program the kubeconfig's exec plugin
    names), until loop_dir/stop appears. ``plugin_only``: the agent's exec plugin back to back, no pause (a
    window of milliseconds, such as an interpreter re-reading its script, is then likely to be hit)."""
    if plugin_only:
        call = f"out=$({AGENT} kube credentials --destination-dir {dest} 2>&1 >/dev/null)"
        who, pause = "who=plugin", ""
    else:
        call = (f"out=$(/usr/local/bin/kubectl --kubeconfig {dest}/kubeconfig.yaml --request-timeout=20s get pods "
                f"-n demo -o name 2>&1)")
        who, pause = f"who=$(grep -o 'command: [^ ]*' {dest}/kubeconfig.yaml | head -1)", "sleep 0.3"
    return f"""
while [ ! -e {loop_dir}/stop ]; do
  {who}
  {call}
  rc=$?
  echo "$(date +%s.%N) rc=$rc $who $(echo "$out" | tr '\\n' ' ' | cut -c1-200)" >> {loop_dir}/log
  {pause}
done
"""


def start_loop(host, unit: str, dest: str, reader: str = "app", plugin_only: bool = False) -> None:
    """Start the loop as a transient unit ``unit`` running as ``reader``; returns after its first success."""
    d = f"{LOOP_ROOT}/{unit}"
    _sh(host, f"mkdir -p {d} && chown {reader} {d} && rm -f {d}/*")
    (host.root / f"var/tmp/{unit}.sh").write_text(loop_script(dest, d, plugin_only))
    _sh(host, f"systemd-run --unit={unit} -p User={reader} /bin/sh /var/tmp/{unit}.sh")
    log = host.root / d.lstrip("/") / "log"
    assert wait_for(lambda: log.exists() and "rc=0" in log.read_text(), timeout=60), \
        log.read_text()[-2000:] if log.exists() else "the reader loop wrote nothing"


def stop_loop(host, unit: str) -> list[str]:
    """Stop the loop and return its lines (also after a failed test: the unit is gone afterwards)."""
    d = f"{LOOP_ROOT}/{unit}"
    _sh(host, f"touch {d}/stop", check=False)
    if not wait_for(lambda: _sh(host, f"systemctl is-active {unit}", check=False).stdout.strip() != "active",
                    timeout=60):
        _sh(host, f"systemctl stop {unit}", check=False)
    log = host.root / d.lstrip("/") / "log"
    return log.read_text().splitlines() if log.exists() else []


def failed(lines: list[str], label: str = "reader loop", span: tuple[float, float] | None = None,
           max_gap: float = 30.0) -> list[str]:
    """The loop's failed iterations (printed with the count, for the test's log). A loop that stalled (a gap of
    more than ``max_gap`` s between iterations) or did not run through ``span`` (start, end: time.time() values)
    counts as failed too: it did not watch."""
    bad = [line for line in lines if " rc=0 " not in line]
    times = [float(line.split(" ", 1)[0]) for line in lines]
    print(f"[{label}] {len(lines)} iterations, {len(bad)} failed")
    if not times:
        return ["the loop ran no iteration"]
    gaps = [b - a for a, b in zip(times, times[1:])]
    if gaps and max(gaps) > max_gap:
        bad.append(f"the loop stalled for {max(gaps):.1f} s")
    if span is not None and not (times[0] <= span[0] and times[-1] >= span[1]):
        bad.append(f"the loop ran {times[0]:.1f}-{times[-1]:.1f}, not through {span[0]:.1f}-{span[1]:.1f}")
    return bad


def cert_generation(pem: bytes) -> int:
    cert = x509.load_pem_x509_certificate(pem)
    return int(cert.subject.get_attributes_for_oid(OID_GENERATION)[0].value)


def server_generation(tp, bot) -> int:
    doc = json.loads(tp.tctl("get", f"user/bot-{bot}", "--format=json", check=True).stdout)
    return int(doc[0]["metadata"]["labels"]["teleport.internal/bot-generation"])


def locks(tp) -> str:
    return tp.tctl("get", "locks", check=True).stdout
