# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What ``ca_pins`` protect, on the REAL Teleport 13.3.8 bed.

* The bed's two Teleport processes (``multiplex`` and ``separate``) are two distinct clusters: separate data
  directories, so separate CAs (checked below), the same cluster name. An agent given cluster A's pin and
  pointed at cluster B's proxy must refuse BEFORE the token is sent. The proof that it was not sent: B holds a
  live bot token with the very same value, and B still accepts that token afterwards (had the agent sent it, B
  would have spent it on the refused attempt); A's token then joins A.
* A loopback stand-in that relays to the real join endpoint and adds one CA certificate to the join answer:
  refused, nothing in the storage directory. The same stand-in without the addition joins fine, so the
  refusal is the added CA's doing. Through the proxy the stand-in has its own web certificate (a test CA given
  as ``ca_path``); directly to auth it presents a server certificate signed by the cluster's host CA, as any holder of
  such a certificate could.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import http.server
import json
import select
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import List, Optional

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import testbed as tb
from testbed.pki import CertificateAuthority
from machine_id_agent import identity as ident
from machine_id_agent import join, webapi
from machine_id_agent.config import Config
from machine_id_agent.errors import JoinError

pytestmark = [pytest.mark.testbed]

BOT_ROLE = "access"  # a preset role; these bots only join


def make_cfg(tp, token: str, storage: Path, *, via: str, pins=None, ca_path=None, addr=None) -> Config:
    """``via``: "proxy" (proxy_server), "guide" (auth_server = the proxy), "auth" (auth_server = auth)."""
    target = addr or (tp.auth_addr if via == "auth" else tp.proxy_addr)
    return Config(
        auth_server=target if via in ("auth", "guide") else None,
        proxy_server=target if via == "proxy" else None,
        token=token, ca_pins=list(pins or []), ca_path=Path(ca_path or tp.web_ca_path), storage_dir=storage,
        credential_ttl=3600, renewal_interval=1200, source=storage / "tbot.yaml",
    )


def bot_with_token_value(tp, name: str, value: str, tmp: Path) -> None:
    """A bot on ``tp`` whose join token has the given value (a token resource first, then
    ``tctl bots add --token=<name of that token>``)."""
    f = tmp / f"token-{name}.yaml"
    expires = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    f.write_text(yaml.safe_dump({"kind": "token", "version": "v2",
                                 "metadata": {"name": value, "expires": expires},
                                 "spec": {"roles": ["Bot"], "join_method": "token", "bot_name": name}}))
    f.chmod(0o600)
    try:
        tp.tctl("create", "-f", str(f), check=True)
    finally:
        f.unlink()
    tp.tctl("bots", "add", name, f"--roles={BOT_ROLE}", f"--token={value}", check=True)


def token_exists(tp, value: str) -> bool:
    r = tp.tctl("get", f"token/{value}", "--format=json")
    return r.returncode == 0 and value in r.stdout


def storage_empty(d: Path) -> bool:
    return not d.exists() or not any(d.iterdir())


def rogue_ca_pem(cluster: str) -> bytes:
    """A self-signed CA that looks like a Teleport CA of ``cluster`` (same O and CN), another key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
                      x509.NameAttribute(NameOID.COMMON_NAME, cluster)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def add_ca_to_join_answer(raw: bytes, extra_pem: Optional[bytes]) -> bytes:
    if extra_pem is None:
        return raw
    doc = json.loads(raw)
    doc["tls_ca_certs"] = list(doc.get("tls_ca_certs") or []) + [base64.b64encode(extra_pem).decode()]
    return json.dumps(doc).encode()


# --- the stand-ins ----------------------------------------------------------------------------------------
class ProxyStandIn:
    """HTTPS on 127.0.0.1 with its own web certificate; relays every request to the real proxy and, when
    ``extra_ca`` is set, adds it to the answer of the join endpoint."""

    def __init__(self, tp, workdir: Path):
        self.tp = tp
        self.extra_ca: Optional[bytes] = None
        self.seen: List[str] = []
        self.web_ca = CertificateAuthority(workdir / "standin-pki", "lanyard-standin-web-ca")
        pair = self.web_ca.issue("standin", "localhost", dns=("localhost",), ips=("127.0.0.1",), server=True)
        up_host, up_port = webapi.split_addr(tp.proxy_addr)
        up_ctx = ssl.create_default_context(cafile=str(tp.web_ca_path))
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _relay(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                outer.seen.append(f"{self.command} {self.path}")
                up = http.client.HTTPSConnection(up_host, up_port, context=up_ctx, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() in ("content-type", "accept", "user-agent")}
                    up.request(self.command, self.path, body=body, headers=headers)
                    resp = up.getresponse()
                    raw = resp.read()
                    ctype = resp.getheader("Content-Type") or "application/json"
                finally:
                    up.close()
                if self.command == "POST" and self.path == join.REGISTER_PATH_PROXY and resp.status == 200:
                    raw = add_ca_to_join_answer(raw, outer.extra_ca)
                self.send_response(resp.status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _relay

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.addr = f"localhost:{self.httpd.server_address[1]}"
        self.ca_path = self.web_ca.cert_path

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class AuthStandIn:
    """TLS on 127.0.0.1 with a server certificate signed by the cluster's pinned host CA (SAN
    ``teleport.cluster.local``), as any holder of such a certificate could present. ALPN ``h2`` connections
    (the CA fetch) are piped to the real auth service; HTTP/1.1 join requests are relayed and, when
    ``extra_ca`` is set, the answer gets that CA added."""

    def __init__(self, tp, workdir: Path):
        self.tp = tp
        self.extra_ca: Optional[bytes] = None
        self.seen: List[str] = []
        cert, key = self._host_certificate(tp, workdir)
        self.up_host, self.up_port = webapi.split_addr(tp.auth_addr, 3025)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.ctx.set_alpn_protocols(["h2", "http/1.1"])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _host_certificate(self, tp, workdir: Path):
        """A server certificate signed by the cluster's host CA (v13's `tctl auth sign --host` writes only
        OpenSSH certificates, so the host CA key is exported -- the bed is ours -- and signs one here)."""
        key_pem = tp.tctl("auth", "export", "--keys", "--type=tls-host", check=True).stdout.encode()
        ca_key = serialization.load_pem_private_key(ident.split_pems(key_pem)[0], password=None)
        ca_cert = x509.load_pem_x509_certificate(
            tp.tctl("auth", "export", "--type=tls-host", check=True).stdout.encode())
        self.host_ca = ca_cert.public_bytes(serialization.Encoding.PEM)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "standin")]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("teleport.cluster.local"),
                                                            x509.DNSName("*.teleport.cluster.local")]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = workdir / "standin-host.crt", workdir / "standin-host.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    def _upstream(self, alpn: str) -> ssl.SSLSocket:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if alpn == "h2":  # the CA fetch is unverified by design (the pins check its answer)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.load_verify_locations(cadata=self.host_ca.decode())
        ctx.set_alpn_protocols([alpn])
        raw = socket.create_connection((self.up_host, self.up_port), timeout=30)
        return ctx.wrap_socket(raw, server_hostname="teleport.cluster.local")

    def _accept(self):
        while not self._stop:
            try:
                conn = self.sock.accept()[0]
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        alpn = tls.selected_alpn_protocol() or "http/1.1"
        self.seen.append(alpn)
        try:
            if alpn == "h2":
                up = self._upstream("h2")
                try:
                    self._pipe(tls, up)
                finally:
                    up.close()
            else:
                self._http(tls)
        except (OSError, ssl.SSLError):
            pass
        finally:
            tls.close()

    @staticmethod
    def _pipe(a: ssl.SSLSocket, b: ssl.SSLSocket, idle: float = 30):
        """Copy bytes both ways in ONE thread (an SSL object must not be read and written from two threads
        at once), with non-blocking sockets so that a TLS record without application data (a TLS 1.3
        session ticket) never blocks the other direction."""
        peer = {a: b, b: a}
        for s in (a, b):
            s.setblocking(False)

        def send_all(dst: ssl.SSLSocket, data: bytes) -> None:
            view = memoryview(data)
            while view:
                try:
                    view = view[dst.send(view):]
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    select.select([], [dst], [], 5)

        while True:
            ready = [s for s in (a, b) if s.pending()]
            if not ready:
                ready, _w, _x = select.select([a, b], [], [], idle)
                if not ready:
                    return
            for src in ready:
                try:
                    data = src.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    continue
                if not data:
                    return
                send_all(peer[src], data)

    def _http(self, tls: ssl.SSLSocket):
        f = tls.makefile("rb")
        request_line = f.readline().decode().strip()
        method, path, _ver = request_line.split(" ", 2)
        headers = {}
        while True:
            line = f.readline().decode().strip()
            if not line:
                break
            k, _s, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        body = f.read(int(headers.get("content-length") or 0))
        self.seen.append(f"{method} {path}")
        up = http.client.HTTPConnection("teleport.cluster.local", timeout=30)
        up.sock = self._upstream("http/1.1")
        try:
            up.request(method, path, body=body, headers={"Content-Type": headers.get("content-type",
                                                                                     "application/json")})
            resp = up.getresponse()
            raw = resp.read()
        finally:
            up.close()
        if method == "POST" and path == join.REGISTER_PATH_AUTH and resp.status == 200:
            raw = add_ca_to_join_answer(raw, self.extra_ca)
        tls.sendall(f"HTTP/1.1 {resp.status} {resp.reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n".encode() + raw)

    def stop(self):
        self._stop = True
        self.sock.close()


# --- tests --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_clusters(teleport_multiplex, teleport_separate):
    a, b = teleport_multiplex, teleport_separate
    pa, pb = a.status_ca_pin(), b.status_ca_pin()
    assert pa != pb, "the bed's two Teleport processes share a host CA; this test needs two clusters"
    return {"multiplex": (a, pa), "separate": (b, pb)}


def test_proxy_serves_the_pinned_host_ca_without_auth(two_clusters):
    """The fact the pre-check rests on: /webapi/auth/export?type=tls-host on v13 is the host CA whose SPKI
    hash is the `tctl status` pin; no client certificate, no session."""
    for tp, pin in two_clusters.values():
        cas = webapi.export_host_cas(tp.proxy_addr, ca_path=Path(tp.web_ca_path))
        assert [ident.spki_pin(c) for c in cas] == [pin] == tp.ca_pins()


@pytest.mark.parametrize("via", ["proxy", "guide"])
@pytest.mark.parametrize("home, wrong", [("multiplex", "separate"), ("separate", "multiplex")])
def test_wrong_cluster_refused_before_the_token_is_sent(two_clusters, tmp_path, home, wrong, via):
    a, pin_a = two_clusters[home]
    b, pin_b = two_clusters[wrong]
    name = f"pins-{uuid.uuid4().hex[:8]}"
    token = a.bot_add(name, [BOT_ROLE])
    # The trap: cluster B holds a live bot token with the same value. If the agent sent the token to B's
    # proxy, B would spend it on that attempt.
    bot_with_token_value(b, name, token, tmp_path)
    assert token_exists(b, token)

    # A's pin, B's proxy; B's web certificate trusted (ca_path), so only the pin can stop it.
    storage = tmp_path / "wrong"
    with pytest.raises(JoinError) as err:
        join.join(make_cfg(b, token, storage, via=via, pins=[pin_a]))
    msg = str(err.value)
    assert "another cluster or the pin is wrong" in msg and "token was not sent" in msg, msg
    assert pin_b in msg and "tctl status" in msg and token not in msg and "\n" not in msg
    assert storage_empty(storage)

    # Not sent: B still has the token and accepts it now (with B's own pin) -- a token B had seen in the
    # refused attempt would be spent (bot tokens join once).
    assert token_exists(b, token)
    on_b = join.join(make_cfg(b, token, tmp_path / "b", via=via, pins=[pin_b]))
    assert on_b.generation == 1 and on_b.bot_name == name
    # And A's token (never sent anywhere) joins A.
    on_a = join.join(make_cfg(a, token, tmp_path / "a", via=via, pins=[pin_a]))
    assert on_a.generation == 1 and on_a.bot_name == name
    assert [ident.spki_pin(c) for c in on_a.tls_ca_pems] == [pin_a]
    assert [ident.spki_pin(c) for c in on_b.tls_ca_pems] == [pin_b]


def test_join_answer_cas_on_the_bed(two_clusters, tmp_path, capsys):
    """What v13 returns in tls_ca_certs of a bot join (both routes), and what the agent keeps."""
    for mode, (tp, pin) in two_clusters.items():
        for via in ("proxy", "auth"):
            name = f"pins-{uuid.uuid4().hex[:8]}"
            token = tp.bot_add(name, [BOT_ROLE])
            key = ident.generate_key()
            expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
            if via == "proxy":
                raw = join.join_via_proxy(tp.proxy_addr, token, key, expires, Path(tp.web_ca_path))
            else:
                raw = join.join_via_auth(tp.auth_addr, token, key, expires, [pin])
            got = [(ident.spki_pin(c), x509.load_pem_x509_certificate(c).subject.rfc4514_string(),
                    join._signed_by(raw.tls_cert_pem, c)) for c in raw.tls_ca_pems]
            with capsys.disabled():
                print(f"\n[{mode}/{via}] bot cert issuer {raw.cert.issuer.rfc4514_string()}")
                for p, subj, signer in got:
                    print(f"[{mode}/{via}]   CA {subj} {p} signed-bot-cert={signer} pinned={p == pin}")
            assert len(got) == 2
            assert [g[2] for g in got].count(True) == 1  # exactly one is the issuer (the user CA)
            assert [g[0] == pin for g in got].count(True) == 1  # the other is the pinned host CA
            assert not any(g[2] and g[0] == pin for g in got)
            kept = join.check_joined_cas(raw, [pin], via)
            assert [ident.spki_pin(c) for c in kept.tls_ca_pems] == [pin]


@pytest.mark.parametrize("via", ["proxy", "guide"])
def test_standin_proxy_adding_a_ca_is_refused(teleport, tmp_path, via):
    tp = teleport
    pin = tp.status_ca_pin()
    standin = ProxyStandIn(tp, tmp_path)
    try:
        # Control: the stand-in relays faithfully -> the join works through it.
        ok_token = tp.bot_add(f"pins-{uuid.uuid4().hex[:8]}", [BOT_ROLE])
        ok = join.join(make_cfg(tp, ok_token, tmp_path / "ok", via=via, pins=[pin], addr=standin.addr,
                                ca_path=standin.ca_path))
        assert ok.generation == 1 and [ident.spki_pin(c) for c in ok.tls_ca_pems] == [pin]
        assert f"GET {webapi.EXPORT_HOST_CA_PATH}" in standin.seen
        assert standin.seen.index(f"GET {webapi.EXPORT_HOST_CA_PATH}") < standin.seen.index(
            f"POST {join.REGISTER_PATH_PROXY}")  # the pin check came first

        # The stand-in adds one CA certificate (same cluster name, another key) to the join answer.
        extra = rogue_ca_pem(tb.CLUSTER_NAME)
        standin.extra_ca = extra
        token = tp.bot_add(f"pins-{uuid.uuid4().hex[:8]}", [BOT_ROLE])
        storage = tmp_path / "bot"
        storage.mkdir(mode=0o700)
        with pytest.raises(JoinError) as err:
            join.join(make_cfg(tp, token, storage, via=via, pins=[pin], addr=standin.addr,
                               ca_path=standin.ca_path))
        msg = str(err.value)
        assert "matches none of the configured ca_pins" in msg and "not stored" in msg, msg
        assert ident.spki_pin(extra) in msg and token not in msg and "\n" not in msg
        assert storage_empty(storage) and ident.load(storage) is None
    finally:
        standin.stop()


def test_standin_auth_adding_a_ca_is_refused(teleport, tmp_path):
    tp = teleport
    pin = tp.status_ca_pin()
    standin = AuthStandIn(tp, tmp_path)
    try:
        ok_token = tp.bot_add(f"pins-{uuid.uuid4().hex[:8]}", [BOT_ROLE])
        ok = join.join(make_cfg(tp, ok_token, tmp_path / "ok", via="auth", pins=[pin], addr=standin.addr))
        assert ok.generation == 1 and [ident.spki_pin(c) for c in ok.tls_ca_pems] == [pin]
        assert "h2" in standin.seen and f"POST {join.REGISTER_PATH_AUTH}" in standin.seen

        extra = rogue_ca_pem(tb.CLUSTER_NAME)
        standin.extra_ca = extra
        token = tp.bot_add(f"pins-{uuid.uuid4().hex[:8]}", [BOT_ROLE])
        storage = tmp_path / "bot"
        storage.mkdir(mode=0o700)
        with pytest.raises(JoinError) as err:
            join.join(make_cfg(tp, token, storage, via="auth", pins=[pin], addr=standin.addr))
        msg = str(err.value)
        assert "matches none of the configured ca_pins" in msg and "not stored" in msg, msg
        assert ident.spki_pin(extra) in msg and token not in msg
        assert storage_empty(storage) and ident.load(storage) is None
    finally:
        standin.stop()


def wait_ready(tp, timeout: float = 120) -> None:
    """A rotation phase change reloads the bed's Teleport in-process; wait for /readyz again."""
    import requests

    time.sleep(2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{tp.diag_port}/readyz", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"teleport-{tp.mode} not ready {timeout:.0f}s after a rotation phase change", pytrace=False)


def status_pins(tp) -> List[str]:
    """Every CA pin `tctl status` prints (two during a host CA rotation)."""
    out = tp.tctl("status", check=True).stdout
    return [w for w in out.split() if w.startswith("sha256:")]


def test_rotation_needs_both_pins(testbed_bins, tmp_path, capsys):
    """On a private bed (a rotation changes the cluster's pins): during a host CA rotation the join answer
    holds both host CAs, so a single pin is refused on both routes and both pins are accepted. Then a user CA
    rotation, to see what a pinned join does while the user CA is rotating."""
    try:
        bed = tb.Testbed.start(modes=("multiplex",))
    except (tb.TestbedError, tb.BuildError) as exc:
        pytest.fail(f"the real test bed failed to start: {exc}", pytrace=False)
    try:
        tp = bed.teleport["multiplex"]
        old = tp.status_ca_pin()
        tp.tctl("auth", "rotate", "--type=host", "--manual", "--phase=init", check=True)
        wait_ready(tp)
        pins = status_pins(tp)
        assert old in pins and len(pins) == 2, pins
        new = [p for p in pins if p != old][0]
        exported = [ident.spki_pin(c) for c in webapi.export_host_cas(tp.proxy_addr, ca_path=Path(tp.web_ca_path))]
        with capsys.disabled():
            print(f"\n[rotation init] tctl status pins {pins}; /webapi/auth/export serves {exported}")

        for via in ("proxy", "auth"):
            token = tp.bot_add(f"pins-{uuid.uuid4().hex[:8]}", [BOT_ROLE])
            storage = tmp_path / f"one-{via}"
            with pytest.raises(JoinError) as err:
                join.join(make_cfg(tp, token, storage, via=via, pins=[old]))
            with capsys.disabled():
                print(f"[rotation init] {via}, old pin only: {err.value}")
            assert new in str(err.value) and storage_empty(storage)
            if via == "auth":  # refused before the token was sent: it still joins with both pins
                again = join.join(make_cfg(tp, token, tmp_path / "both-auth-same-token", via=via, pins=[old, new]))
                assert again.generation == 1
            token = tp.bot_add(f"pins-{uuid.uuid4().hex[:8]}", [BOT_ROLE])
            both = join.join(make_cfg(tp, token, tmp_path / f"both-{via}", via=via, pins=[old, new]))
            assert sorted(ident.spki_pin(c) for c in both.tls_ca_pems) == sorted([old, new])
            assert ident.load(tmp_path / f"both-{via}") is not None

        # The user CA rotates too (the host CA rotation stays in its init phase): the join answer then holds
        # both user CAs; the one that did not sign the bot certificate has no pin, so the join is refused.
        tp.tctl("auth", "rotate", "--type=user", "--manual", "--phase=init", check=True)
        wait_ready(tp)
        token = tp.bot_add(f"pins-{uuid.uuid4().hex[:8]}", [BOT_ROLE])
        raw = join.join_via_proxy(tp.proxy_addr, token, ident.generate_key(),
                                  dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1), Path(tp.web_ca_path))
        seen = [(ident.spki_pin(c), join._signed_by(raw.tls_cert_pem, c)) for c in raw.tls_ca_pems]
        with capsys.disabled():
            for p, signer in seen:
                print(f"[user rotation init] join answer CA {p} signed-bot-cert={signer} host-pin={p in pins}")
        user_pins = [p for p, _signer in seen if p not in pins]
        assert len(seen) == 4 and len(user_pins) == 2 and sum(signer for _p, signer in seen) == 1
        with pytest.raises(JoinError, match="rotating its user CA"):
            join.check_joined_cas(raw, [old, new], "proxy")
        kept = join.check_joined_cas(raw, [old, new] + user_pins, "proxy")  # every CA pinned: accepted
        assert len(kept.tls_ca_pems) == 4
    finally:
        bed.stop()
