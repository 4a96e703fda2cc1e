# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's gRPC-over-h2 client against a local HTTP/2 server double (h2's server side over TLS): message
framing, trailers and trailers-only answers, HTTP errors, stream resets, GOAWAY, deadlines, flow control in
both directions, and how renew.py turns gRPC codes into the user-facing errors."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from types import SimpleNamespace

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from machine_id_agent import grpcwire, renew
from machine_id_agent.errors import LockedError, RenewError

PATH = "/proto.AuthService/Ping"


def _server_ctx() -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "double")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1)).sign(key, hashes.SHA256()))
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        os.write(fd, cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        os.close(fd)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class H2Double:
    """One-connection-at-a-time HTTP/2 server over TLS. ``behave(conn, sock, stream_id, request_bytes)`` answers
    a complete request; it records every request body it saw."""

    def __init__(self, behave, window: int = 65535):
        self.behave = behave
        self.window = window
        self.requests = []
        self.connections = 0
        self.ctx = _server_ctx()
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.port = self.lsock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop:
            try:
                c = self.lsock.accept()[0]
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, raw):
        try:
            sock = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        bodies = {}
        try:
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            while not self.stop:
                data = sock.recv(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        bodies[ev.stream_id] = bytearray()
                        self.last_headers = dict(ev.headers)
                    elif isinstance(ev, h2.events.DataReceived):
                        bodies[ev.stream_id].extend(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        body = bytes(bodies.pop(ev.stream_id))
                        self.requests.append(body)
                        sock.sendall(conn.data_to_send())
                        self.behave(conn, sock, ev.stream_id, body)
                sock.sendall(conn.data_to_send())
        except (OSError, ssl.SSLError, h2.exceptions.H2Error):
            pass  # the client went away, or closed the connection (GOAWAY) while the double still talked
        finally:
            sock.close()

    @property
    def addr(self):
        return ("127.0.0.1", self.port)

    def channel(self, timeout=5.0) -> grpcwire.Channel:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        return grpcwire.Channel(grpcwire.tcp_dial(*self.addr), ctx, "double.example", connect_timeout=timeout)

    def close(self):
        self.stop = True
        self.lsock.close()


def _ok_headers():
    return [(":status", "200"), ("content-type", "application/grpc")]


def answer(payload: bytes, status: int = 0, message: str = ""):
    def behave(conn, sock, sid, body):
        conn.send_headers(sid, _ok_headers())
        conn.send_data(sid, grpcwire.frame_message(payload))
        trailers = [("grpc-status", str(status))] + ([("grpc-message", message)] if message else [])
        conn.send_headers(sid, trailers, end_stream=True)
    return behave


@pytest.fixture
def double():
    made = []

    def make(behave, **kw):
        d = H2Double(behave, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def test_framing():
    assert grpcwire.frame_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    buf = bytearray(grpcwire.frame_message(b"one") + grpcwire.frame_message(b"") + b"\x00\x00\x00")
    assert grpcwire.split_messages(buf) == [b"one", b""]
    assert bytes(buf) == b"\x00\x00\x00"  # an incomplete prefix stays
    with pytest.raises(grpcwire.RpcError, match="compressed"):
        grpcwire.split_messages(bytearray(b"\x01\x00\x00\x00\x01x"))
    with pytest.raises(grpcwire.RpcError) as err:
        grpcwire.split_messages(bytearray(struct.pack(">BI", 0, grpcwire.MAX_MESSAGE + 1)))
    assert err.value.code == grpcwire.RESOURCE_EXHAUSTED
    assert grpcwire.grpc_timeout(30) == "30000m" and grpcwire.grpc_timeout(1e9) == "99999999S"


def test_unary_ok_and_request_shape(double):
    d = double(answer(b"pong"))
    ch = d.channel()
    try:
        assert ch.unary(PATH, b"ping-bytes", 5) == b"pong"
        assert ch.unary(PATH, b"", 5) == b"pong"  # a second call on the same connection
    finally:
        ch.close()
    assert d.requests == [grpcwire.frame_message(b"ping-bytes"), grpcwire.frame_message(b"")]
    assert d.connections == 1
    h = d.last_headers
    assert (h[":method"], h[":scheme"], h[":path"], h[":authority"]) == ("POST", "https", PATH, "double.example")
    assert h["content-type"] == "application/grpc" and h["te"] == "trailers"
    assert h["grpc-timeout"].endswith("m")


def test_status_in_trailers_is_percent_decoded(double):
    d = double(answer(b"", status=7, message="access denied: bot%20locked %E2%9C%93"))
    ch = d.channel()
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            ch.unary(PATH, b"", 5)
    finally:
        ch.close()
    assert err.value.code == grpcwire.PERMISSION_DENIED and not err.value.transport
    assert err.value.details == "access denied: bot locked \u2713"


def test_trailers_only_answer(double):
    def behave(conn, sock, sid, body):
        conn.send_headers(sid, _ok_headers() + [("grpc-status", "16"), ("grpc-message", "no%20cert")],
                          end_stream=True)
    d = double(behave)
    ch = d.channel()
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            ch.unary(PATH, b"", 5)
        assert (err.value.code, err.value.details) == (grpcwire.UNAUTHENTICATED, "no cert")
        with pytest.raises(grpcwire.RpcError):  # the connection is still usable after a gRPC error
            ch.unary(PATH, b"", 5)
        assert d.connections == 1
    finally:
        ch.close()


@pytest.mark.parametrize("http,code", [("503", grpcwire.UNAVAILABLE), ("403", grpcwire.PERMISSION_DENIED),
                                       ("404", grpcwire.UNIMPLEMENTED), ("500", grpcwire.UNKNOWN)])
def test_http_status_without_grpc_status(double, http, code):
    def behave(conn, sock, sid, body):
        conn.send_headers(sid, [(":status", http), ("content-type", "text/plain")])
        conn.send_data(sid, b"upstream says no", end_stream=True)
    d = double(behave)
    ch = d.channel()
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            ch.unary(PATH, b"", 5)
    finally:
        ch.close()
    assert err.value.code == code and f"HTTP status {http}" in err.value.details


def test_missing_grpc_status_is_an_error(double):
    def behave(conn, sock, sid, body):
        conn.send_headers(sid, _ok_headers())
        conn.send_data(sid, grpcwire.frame_message(b"x"), end_stream=True)
    d = double(behave)
    ch = d.channel()
    try:
        with pytest.raises(grpcwire.RpcError, match="without a grpc-status"):
            ch.unary(PATH, b"", 5)
    finally:
        ch.close()


def test_stream_reset(double):
    def behave(conn, sock, sid, body):
        conn.reset_stream(sid, 7)  # REFUSED_STREAM
    d = double(behave)
    ch = d.channel()
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            ch.unary(PATH, b"", 5)
    finally:
        ch.close()
    assert err.value.code == grpcwire.UNAVAILABLE and "REFUSED_STREAM" in err.value.details


def test_goaway_fails_the_call_and_the_next_call_reconnects(double):
    state = {"n": 0}

    def behave(conn, sock, sid, body):
        state["n"] += 1
        if state["n"] == 1:
            conn.close_connection(error_code=2, additional_data=b"shutting down", last_stream_id=0)
            sock.sendall(conn.data_to_send())
            return
        answer(b"second")(conn, sock, sid, body)
    d = double(behave)
    ch = d.channel()
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            ch.unary(PATH, b"", 5)
        assert err.value.code == grpcwire.UNAVAILABLE and "GOAWAY" in err.value.details
        assert "shutting down" in err.value.details
        assert ch.unary(PATH, b"", 5) == b"second"
        assert d.connections == 2
    finally:
        ch.close()


def test_every_read_is_bounded_by_the_deadline(double):
    d = double(lambda conn, sock, sid, body: None)  # never answers
    ch = d.channel()
    t0 = time.monotonic()
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            ch.unary(PATH, b"", 0.5)
    finally:
        ch.close()
    assert err.value.code == grpcwire.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3


def test_tls_handshake_bounded_by_the_deadline():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)  # accepts (kernel backlog) but never speaks TLS
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ch = grpcwire.Channel(grpcwire.tcp_dial("127.0.0.1", lsock.getsockname()[1]), ctx, "x")
    t0 = time.monotonic()
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            ch.unary(PATH, b"", 0.5)
    finally:
        ch.close()
        lsock.close()
    assert err.value.transport and time.monotonic() - t0 < 3
    assert "TLS handshake" in err.value.details


def test_large_response_needs_our_window_updates(double):
    big = os.urandom(6 * 1024 * 1024)  # more than our 4 MiB receive window: needs acknowledgements

    def behave(conn, sock, sid, body):
        conn.send_headers(sid, _ok_headers())
        data = memoryview(grpcwire.frame_message(big))
        while data:
            n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(data))
            if n == 0:  # wait for the client's WINDOW_UPDATE
                for ev in conn.receive_data(sock.recv(65536)):
                    pass
                continue
            conn.send_data(sid, bytes(data[:n]))
            data = data[n:]
            sock.sendall(conn.data_to_send())
        conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    d = double(behave)
    ch = d.channel()
    try:
        assert ch.unary(PATH, b"", 20) == big
    finally:
        ch.close()


def test_large_request_waits_for_the_server_window(double):
    big = os.urandom(300 * 1024)  # more than the server's 64 KiB initial window
    d = double(answer(b"ok"))
    ch = d.channel()
    try:
        assert ch.unary(PATH, big, 10) == b"ok"
    finally:
        ch.close()
    assert d.requests == [grpcwire.frame_message(big)]


def test_verify_runs_before_any_application_byte(double):
    d = double(answer(b"never"))
    ch = d.channel()
    seen = []

    def refuse(der):
        seen.append(der)
        raise ValueError("server certificate not trusted (test)")

    ch._verify = refuse
    try:
        with pytest.raises(grpcwire.RpcError) as err:
            ch.unary(PATH, b"secret", 5)
    finally:
        ch.close()
    assert seen and seen[0]  # the verifier got the server's certificate
    assert "not trusted" in err.value.details and err.value.code == grpcwire.UNAVAILABLE
    time.sleep(0.2)
    assert d.requests == []


def test_connect_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ch = grpcwire.Channel(grpcwire.tcp_dial("127.0.0.1", port), ctx, "x")
    with pytest.raises(grpcwire.RpcError) as err:
        ch.unary(PATH, b"", 2)
    assert err.value.code == grpcwire.UNAVAILABLE and "cannot connect" in err.value.details


# --- renew.py's mapping of gRPC codes to the user-facing errors ----------------------------------------------
def _client(route="auth"):
    c = renew.AuthClient.__new__(renew.AuthClient)
    c.identity = SimpleNamespace(bot_name="b1")
    c.cfg = SimpleNamespace(storage_dir="/var/lib/x")
    c.route = (route, "h:3025")
    return c


CONN = SimpleNamespace(describe="auth h:3025 (direct mTLS)")


@pytest.mark.parametrize("code,retryable,words", [
    (grpcwire.UNAVAILABLE, True, "cannot reach auth h:3025"),
    (grpcwire.DEADLINE_EXCEEDED, True, "cannot reach"),
    (grpcwire.CANCELLED, True, "cannot reach"),
    (grpcwire.PERMISSION_DENIED, False, "tctl get locks"),
    (grpcwire.UNAUTHENTICATED, False, "tctl get locks"),
    (grpcwire.INVALID_ARGUMENT, False, "rejected the request"),
    (grpcwire.NOT_FOUND, False, "answered not found"),
    (grpcwire.INTERNAL, True, "failed (INTERNAL: boom)"),
])
def test_error_mapping(code, retryable, words):
    err = _client()._error(grpcwire.RpcError(code, "boom"), "renew bot 'b1'", CONN)
    assert err.__class__ is RenewError and err.retryable is retryable
    assert words in str(err) and str(err).startswith("renew bot 'b1': ") and "\n" not in str(err)


def test_error_mapping_locked_and_handshake_hint():
    refused = grpcwire.RpcError(grpcwire.PERMISSION_DENIED, "renewable cert generation mismatch: stored=4, presented=3")
    err = _client()._error(refused, "renew", CONN)
    assert isinstance(err, LockedError) and "stored=4, presented=3" in str(err)
    # a transport failure whose text happens to contain the words is not a lock
    err = _client()._error(grpcwire.RpcError(grpcwire.UNAVAILABLE, "generation mismatch", transport=True), "r", CONN)
    assert not isinstance(err, LockedError)
    err = _client("proxy")._error(grpcwire.RpcError(grpcwire.UNAVAILABLE, "the server closed the connection during "
                                                    "the TLS handshake (x)", transport=True), "renew", CONN)
    assert "set auth_server to the auth service address" in str(err) and err.retryable
