# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 16 point 1: long-lived clients keep working with the default kubeconfig (real bed).

``kubectl proxy`` is started ONCE, as the reader user, with the destination's kubeconfig.yaml exactly as the
agent writes it by default (only certificate_ttl and renewal_interval are short). It is queried every
second across at least three renewals and until the certificate it authenticated with first has expired,
and must answer every time with the demo pod. Meanwhile a reader thread reads the destination files in a
tight loop:

- ``identity`` (one file: key and certificate, replaced atomically) must match on EVERY read: that is the
  guarantee, and it is what the exec plugin reads;
- ``key`` then ``tlscert`` (two files, two reads) cannot be read atomically together: a renewal may land
  between the two reads. Each file alone is always complete; the pair is NOT guaranteed and the test only
  counts and reports torn pairs (a reader of the two files must check that they match and read again).

The same setup with ``exec_plugin: false`` (inline credentials, the former default) fails once the first
certificate has expired: that is the bug the default fixes, and it shows the first test can fail.

Which certificate kubectl proxy first used cannot be seen from outside. It is the one in ``identity`` when
the plugin first ran, which happened after the proxy started and before its first answer; certificates only
get newer, so the one read after the first answer has a notAfter at or after it. The tests wait until that
notAfter has passed.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

import testbed as tb
from machine_id_agent import kubecreds, outputs

from test_agent_e2e import free_port, http_get, metric, wait_for  # noqa: E402

APP_USER = "lanyardtest-app"  # see conftest.py

pytestmark = [pytest.mark.testbed]

TTL, INTERVAL = "1m", "15s"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def identity_cert(dest):
    key, cert = kubecreds.split_bundle((dest / outputs.IDENTITY).read_bytes())
    assert outputs.key_matches_cert(key, cert)
    return cert


def start_proxy(h, port: int, log_path) -> subprocess.Popen:
    """kubectl proxy as the reader user (no capabilities, no PYTHONPATH), with the default kubeconfig."""
    log = open(log_path, "ab")
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    p = subprocess.Popen([runuser, "-u", APP_USER, "--", str(h.kubectl_bin), "proxy",
                          "--kubeconfig=%s" % (h.dest / "kubeconfig.yaml"), "--address=127.0.0.1",
                          "--port=%d" % port], stdout=log, stderr=subprocess.STDOUT, cwd="/",
                         env={"PATH": "/usr/bin:/bin", "HOME": "/"}, start_new_session=True)
    log.close()
    return p


def stop_proxy(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def pods_via(port: int):
    """(status, body) of one pod list through the proxy; status 0 when the proxy did not answer."""
    url = "http://127.0.0.1:%d/api/v1/namespaces/%s/pods" % (port, tb.DEMO_NAMESPACE)
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def has_demo_pod(body: str) -> bool:
    try:
        doc = yaml.safe_load(body)
    except yaml.YAMLError:
        return False
    return tb.DEMO_POD in [i["metadata"]["name"] for i in (doc or {}).get("items") or []]


def setup(make_host, teleport, **dest_extra):
    diag = "127.0.0.1:%d" % free_port()
    h = make_host(teleport, certificate_ttl=TTL, renewal_interval=INTERVAL, diag_addr=diag)
    if dest_extra:
        h.write_config(certificate_ttl=TTL, renewal_interval=INTERVAL, diag_addr=diag,
                       destinations=[dict({"directory": str(h.dest), "kubernetes_cluster": tb.KUBE_CLUSTER_NAME},
                                          **dest_extra)])
    assert h.init().returncode == 0
    agent = h.start()
    wait_for(lambda: http_get("http://%s/readyz" % diag)[0] == 200, 60, "first outputs (/readyz 200)")
    return h, diag, agent


def first_answer(h, port: int, proxy):
    """Wait for the proxy's first answer (it listens a moment after it starts); returns the bound on the
    notAfter of the certificate it used (see the module docstring)."""
    def answered():
        assert proxy.poll() is None, "kubectl proxy exited: %s" % (h.root / "proxy.log").read_text()[-2000:]
        return pods_via(port)[0] == 200
    wait_for(answered, 30, "kubectl proxy's first answer")
    return outputs.cert_not_after(identity_cert(h.dest))


def test_kubectl_proxy_started_once_keeps_answering_past_expiry_and_reads_always_match(
        teleport_multiplex, make_host):
    h, diag, agent = setup(make_host, teleport_multiplex)
    doc = yaml.safe_load((h.dest / "kubeconfig.yaml").read_text())
    ex = doc["users"][0]["user"]["exec"]  # the default output: the exec plugin, no inline key
    assert ex["command"] == str(h.agent_bin) and "client-key-data" not in doc["users"][0]["user"]

    stop = threading.Event()
    stats = {"identity": 0, "pairs": 0, "torn_pairs": 0}
    seen_certs = set()  # distinct certificates the reader read from identity: it read across the renewals
    problems = []

    def reader():
        d = h.dest
        while not stop.is_set():
            try:
                key, cert = kubecreds.split_bundle((d / outputs.IDENTITY).read_bytes())
                if not (key and cert and outputs.key_matches_cert(key, cert)):
                    problems.append("identity: not a matching pair")
                seen_certs.add(cert)
                stats["identity"] += 1
                k, c = (d / outputs.KEY).read_bytes(), (d / outputs.TLSCERT).read_bytes()
                # each file alone is complete (parses); the pair may straddle a renewal
                stats["torn_pairs"] += not outputs.key_matches_cert(k, c)
                stats["pairs"] += 1
            except Exception as e:  # a torn or missing file would land here
                problems.append("%s: %s" % (type(e).__name__, str(e)[:200]))
            time.sleep(0.002)

    reading = threading.Thread(target=reader, daemon=True)
    reading.start()
    port = free_port()
    proxy = start_proxy(h, port, h.root / "proxy.log")
    try:
        first_not_after = first_answer(h, port, proxy)
        r0 = metric(diag, "renewals_total")
        answers = 0
        serials = set()
        drops = []  # requests client-go cut off when it switched certificates (see below)
        while True:
            code, body = pods_via(port)
            if code == 500 and "use of closed network connection" in body:
                # client-go closes every connection when the exec plugin hands it a new certificate (at the
                # plugin's expirationTimestamp, kubecreds.refresh_at); a request in flight at that moment fails. Seen
                # in CI under load. Allowed only at such a moment, once per certificate, and never twice in a row.
                cut_at = now()
                assert any(kubecreds.refresh_at(c) - dt.timedelta(seconds=3) <= cut_at
                           <= kubecreds.refresh_at(c) + dt.timedelta(seconds=10) for c in serials), (
                    "a cut-off request away from any certificate switch at %s: %s" % (cut_at.isoformat(), body[:300]))
                assert not drops or drops[-1][1] < answers, "two requests in a row cut off"
                drops.append((cut_at, answers))
                time.sleep(1)
                continue
            assert code == 200 and has_demo_pod(body), (
                "answer %d at %s (first certificate expires %s): HTTP %s %s\nproxy log: %s" % (
                    answers + 1, now().isoformat(), first_not_after.isoformat(), code, body[:500],
                    (h.root / "proxy.log").read_text()[-2000:]))
            answers += 1
            serials.add(identity_cert(h.dest))
            renewed = metric(diag, "renewals_total") - r0
            if renewed >= 3 and now() > first_not_after + dt.timedelta(seconds=5):
                break
            assert answers < 240, "no 3 renewals past the first certificate's expiry in 4 minutes"
            time.sleep(1)
        assert proxy.poll() is None, "the same kubectl proxy process answered throughout"
    finally:
        stop.set()
        reading.join(10)
        stop_proxy(proxy)
    assert now() > first_not_after, "the certificate kubectl proxy first used has expired"
    assert len(serials) >= 3, "the agent wrote new certificates meanwhile"
    assert len(drops) <= len(serials), drops
    assert not problems, problems[:5]
    assert len(seen_certs) >= 4, "the reader read the first certificate and those of 3 renewals (%d)" % len(seen_certs)
    assert metric(diag, "renewal_failures_total") == 0
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0
    print("[long-lived] %d answers from one kubectl proxy over %.0f renewals (%d cut off at a certificate switch); "
          "first certificate expired %s; reads: %d identity (all matching, %d certificates), %d key+tlscert pairs "
          "(%d torn)" % (answers, renewed, len(drops), first_not_after.isoformat(), stats["identity"],
                         len(seen_certs), stats["pairs"], stats["torn_pairs"]))


def test_inline_credentials_fail_after_the_first_certificate_expires(teleport_multiplex, make_host):
    h, diag, agent = setup(make_host, teleport_multiplex, exec_plugin=False)
    user = yaml.safe_load((h.dest / "kubeconfig.yaml").read_text())["users"][0]["user"]
    assert "client-key-data" in user and "exec" not in user
    port = free_port()
    proxy = start_proxy(h, port, h.root / "proxy.log")
    try:
        wait_for(lambda: pods_via(port)[0] == 200, 30, "kubectl proxy's first answer")
        # inline: kubectl loaded the key and certificate once, from the kubeconfig it read at start; that
        # certificate is the one in the file now or an older one
        loaded = outputs.read_credentials(h.dest)["cert"]
        first_not_after = outputs.cert_not_after(loaded)
        r0 = metric(diag, "renewals_total")
        while now() < first_not_after + dt.timedelta(seconds=5):
            time.sleep(1)
        assert metric(diag, "renewals_total") - r0 >= 1, "the agent renewed meanwhile"
        assert outputs.inspect(h.dest)["valid"], "the files on disk hold a valid, newer certificate"
        code, body = pods_via(port)
        assert proxy.poll() is None
    finally:
        stop_proxy(proxy)
    assert code != 200 or not has_demo_pod(body), (
        "inline credentials kept working past the expiry of the loaded certificate: the test cannot tell the "
        "fix from the bug")
    print("[long-lived] inline credentials after expiry: HTTP %s %s" % (code, body[:200].replace("\n", " ")))
