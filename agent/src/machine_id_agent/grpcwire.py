# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A small gRPC client over HTTP/2 (the pure-Python ``h2`` state machine) on a TLS socket the agent
opens itself.

Why not grpcio: the route through the proxy's web port needs the ALPN
``teleport-auth@<hex cluster>.teleport.cluster.local``, which grpcio cannot offer; the agent used to
work around that with a local TCP relay that any local user could connect to. Here the agent dials
the server, runs TLS with Python's :mod:`ssl` (its own ALPN list, SNI and client certificate), checks
the server certificate with a caller-supplied function right after the handshake, before any
application byte is sent, and then speaks HTTP/2 on that socket. No socket is ever listened on.

gRPC over HTTP/2, as far as the agent needs it:

* a call is one HTTP/2 stream: ``POST /<service>/<method>`` with ``:scheme https``,
  ``:authority`` (the TLS server name), ``content-type: application/grpc``, ``te: trailers`` and
  ``grpc-timeout``;
* a message is a 5-byte prefix (compressed flag, big-endian length) followed by the protobuf bytes;
  the agent never compresses and refuses compressed answers (it does not offer any encoding);
* the outcome is in the trailers ``grpc-status`` / ``grpc-message`` (percent-encoded); a
  "trailers-only" answer carries them in the only HEADERS frame; an HTTP status other than 200
  without ``grpc-status`` maps to a gRPC code as the gRPC spec says.

Every blocking read and write is bounded by the call's deadline. Received data is acknowledged
(flow control), and outbound data waits for window when the peer's window is exhausted.
:meth:`Channel.unary` serves every request/response call; :meth:`Channel.stream` a server-streaming one
(``WatchEvents``: messages are handed out as they arrive, the caller checks a stop flag between reads).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

# gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

CODE_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
    10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
    15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}

# HTTP status -> gRPC code, for answers without grpc-status (gRPC's http-grpc-status-mapping)
_HTTP_TO_GRPC = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED,
                 429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}

# HTTP/2 error codes worth naming in a message
_H2_ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
              4: "SETTINGS_TIMEOUT", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL",
              9: "COMPRESSION_ERROR", 10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM", 12: "INADEQUATE_SECURITY",
              13: "HTTP_1_1_REQUIRED"}

MAX_MESSAGE = 16 * 1024 * 1024
_RECV = 65536
_WINDOW = 4 * 1024 * 1024  # our receive window (stream and connection); acknowledged as data is consumed
USER_AGENT = "machine-id-agent grpc-h2"


class RpcError(Exception):
    """A failed call. ``code`` is the gRPC status number; ``details`` the server's message or, for a
    failure below gRPC (connect, TLS, HTTP/2), what happened; ``transport`` tells the two apart."""

    def __init__(self, code: int, details: str, transport: bool = False):
        super().__init__(f"{CODE_NAMES.get(code, code)}: {details}")
        self.code = code
        self.details = details
        self.transport = transport

    @property
    def code_name(self) -> str:
        return CODE_NAMES.get(self.code, str(self.code))


def frame_message(payload: bytes) -> bytes:
    """One uncompressed gRPC message: flag 0, 4-byte big-endian length, the bytes."""
    return struct.pack(">BI", 0, len(payload)) + payload


def split_messages(buf: bytearray) -> List[bytes]:
    """Take every complete message off the front of ``buf`` (in place); raises RpcError on a compressed
    or oversized message."""
    out = []
    while len(buf) >= 5:
        flag, length = struct.unpack(">BI", bytes(buf[:5]))
        if flag not in (0, 1):
            raise RpcError(INTERNAL, f"bad gRPC message prefix (flag {flag})")
        if flag == 1:
            raise RpcError(INTERNAL, "the server sent a compressed message although none was offered")
        if length > MAX_MESSAGE:
            raise RpcError(RESOURCE_EXHAUSTED, f"the server sent a message of {length} bytes "
                                               f"(limit {MAX_MESSAGE})")
        if len(buf) < 5 + length:
            break
        out.append(bytes(buf[5:5 + length]))
        del buf[:5 + length]
    return out


def grpc_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` header value (at most 8 digits and a unit)."""
    ms = max(1, int(seconds * 1000))
    if ms < 100_000_000:
        return f"{ms}m"
    return f"{min(99_999_999, int(seconds))}S"


def status_from_headers(headers: Dict[str, str]) -> Optional[tuple]:
    """(code, message) from ``grpc-status``/``grpc-message`` or None when absent."""
    raw = headers.get("grpc-status")
    if raw is None:
        return None
    try:
        code = int(raw)
    except ValueError:
        return UNKNOWN, f"unparseable grpc-status {raw!r}"
    return code, unquote(headers.get("grpc-message", ""), errors="replace")


class _Call:
    """State of one stream: response headers, buffered message bytes, trailers, end/reset."""

    def __init__(self, stream_id: int):
        self.stream_id = stream_id
        self.headers: Optional[Dict[str, str]] = None
        self.trailers: Optional[Dict[str, str]] = None
        self.buf = bytearray()
        self.messages: List[bytes] = []
        self.ended = False
        self.reset: Optional[int] = None
        self.window_open = False
        self.error: Optional[RpcError] = None  # a bad message from the server
        self.other = bytearray()  # the start of a body that is not gRPC (an HTTP error page)

    @property
    def is_grpc(self) -> bool:
        h = self.headers or {}
        return h.get(":status") == "200" and h.get("content-type", "").startswith("application/grpc")

    def take(self, data: bytes) -> None:
        if not self.is_grpc:
            self.other.extend(data[:max(0, 200 - len(self.other))])
            return
        if self.error is not None:
            return
        self.buf.extend(data)
        try:
            self.messages.extend(split_messages(self.buf))
        except RpcError as exc:
            self.error = exc
            self.buf.clear()

    def result(self) -> tuple:
        """(code, message) once the stream ended (trailers, trailers-only headers, or HTTP status)."""
        if self.reset is not None:
            name = _H2_ERRORS.get(self.reset, str(self.reset))
            code = UNAVAILABLE if self.reset == 7 else CANCELLED if self.reset == 8 else INTERNAL
            return code, f"the server reset the stream ({name})"
        if self.error is not None:
            return self.error.code, self.error.details
        hdrs = self.headers or {}
        st = status_from_headers(self.trailers or {}) or status_from_headers(hdrs)
        http = hdrs.get(":status")
        if http is not None and http != "200":
            try:
                hcode = int(http)
            except ValueError:
                hcode = 0
            if st is not None:
                return st
            text = bytes(self.other).decode("utf-8", "replace").split("\n", 1)[0].strip()
            return (_HTTP_TO_GRPC.get(hcode, UNKNOWN),
                    f"HTTP status {http} from the server (not gRPC){': ' + text if text else ''}")
        if st is None:
            return INTERNAL, "the server ended the call without a grpc-status"
        return st


class Channel:
    """One HTTP/2 connection over TLS, opened on first use and reopened after it broke.

    ``dial(timeout)`` returns a connected TCP socket; ``ctx`` is the client SSLContext (ALPN list,
    client certificate, no trust store: the server is checked by ``verify(der)``); ``server_name`` is the
    SNI and the ``:authority``; ``require_alpn`` the protocol the handshake must settle on."""

    def __init__(self, dial: Callable[[float], socket.socket], ctx: ssl.SSLContext, server_name: str,
                 verify: Optional[Callable[[Optional[bytes]], None]] = None, require_alpn: Optional[str] = "h2",
                 connect_timeout: float = 15.0):
        self._dial = dial
        self._ctx = ctx
        self.server_name = server_name
        self._verify = verify
        self._require_alpn = require_alpn
        self._connect_timeout = connect_timeout
        self._sock: Optional[ssl.SSLSocket] = None
        self._h2: Optional[h2.connection.H2Connection] = None
        self._calls: Dict[int, _Call] = {}
        self._goaway: Optional[tuple] = None
        self._lock = threading.Lock()
        self.peer_cert_der: Optional[bytes] = None
        self.alpn: Optional[str] = None
        self.handshakes = 0

    # -- connection ------------------------------------------------------------------------------------
    def _connect(self, deadline: float) -> None:
        self.peer_cert_der = None
        budget = min(self._connect_timeout, max(0.0, deadline - time.monotonic()))
        if budget <= 0:
            raise RpcError(DEADLINE_EXCEEDED, "no time left to connect", transport=True)
        try:
            raw = self._dial(budget)
        except socket.timeout:
            raise RpcError(UNAVAILABLE, f"cannot connect: no answer within {budget:.0f}s", transport=True) from None
        except OSError as exc:
            raise RpcError(UNAVAILABLE, f"cannot connect: {exc.strerror or exc}", transport=True) from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        tls = None
        try:
            tls = self._ctx.wrap_socket(raw, server_hostname=self.server_name, do_handshake_on_connect=False)
            tls.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                tls.do_handshake()
            except socket.timeout:
                raise RpcError(UNAVAILABLE, "no answer from the server during the TLS handshake",
                               transport=True) from None
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError) as exc:
                # EOF or reset in the middle of the handshake: what a server does when it has no route
                # for the ALPN/SNI or refuses the client certificate
                raise RpcError(UNAVAILABLE, "the server closed the connection during the TLS handshake (no route "
                                            "for this ALPN/SNI, or client certificate rejected: "
                                            f"{getattr(exc, 'reason', None) or exc.__class__.__name__})",
                               transport=True) from None
            except ssl.SSLError as exc:
                raise RpcError(UNAVAILABLE, f"TLS failed ({exc.reason or exc})", transport=True) from None
            except OSError as exc:
                raise RpcError(UNAVAILABLE, f"connection failed during the TLS handshake "
                                            f"({exc.strerror or exc.__class__.__name__})", transport=True) from None
            self.handshakes += 1
            self.peer_cert_der = tls.getpeercert(binary_form=True)
            if self._verify is not None:
                try:
                    self._verify(self.peer_cert_der)  # before any application byte leaves this host
                except Exception as exc:  # noqa: BLE001 - the verifier's message is the reason
                    raise RpcError(UNAVAILABLE, str(exc), transport=True) from None
            self.alpn = tls.selected_alpn_protocol()
            if self._require_alpn and self.alpn != self._require_alpn:
                raise RpcError(UNAVAILABLE, f"the server negotiated ALPN {self.alpn!r}, not {self._require_alpn!r}",
                               transport=True)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                        header_encoding="utf-8"))
            conn.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 20,
            })
            conn.initiate_connection()
            conn.increment_flow_control_window(_WINDOW - 65535)  # the connection window is not a setting
            self._sock, self._h2 = tls, conn
            self._calls, self._goaway = {}, None
            self._flush(deadline)
        except BaseException:
            self._sock, self._h2 = None, None
            try:
                (tls or raw).close()
            except OSError:
                pass
            raise

    def _drop(self) -> None:
        sock, self._sock, self._h2 = self._sock, None, None
        self._calls = {}
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            if self._h2 is not None and self._sock is not None:
                try:
                    self._h2.close_connection()
                    self._sock.settimeout(1.0)
                    self._sock.sendall(self._h2.data_to_send())
                except (OSError, h2.exceptions.H2Error):
                    pass
            self._drop()

    # -- I/O ---------------------------------------------------------------------------------------------
    def _flush(self, deadline: float) -> None:
        data = self._h2.data_to_send()
        if not data:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RpcError(DEADLINE_EXCEEDED, "deadline exceeded while sending", transport=True)
        self._sock.settimeout(remaining)
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise RpcError(DEADLINE_EXCEEDED, "deadline exceeded while sending", transport=True) from None
        except (OSError, ssl.SSLError) as exc:
            raise RpcError(UNAVAILABLE, f"connection lost while sending ({getattr(exc, 'strerror', None) or exc})",
                           transport=True) from None

    def _pump(self, deadline: float, idle_ok: bool = False) -> bool:
        """Read once from the socket (bounded by ``deadline``) and dispatch the HTTP/2 events. With
        ``idle_ok`` a read that times out returns False instead of raising (a stream waiting for events)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if idle_ok:
                return False
            raise RpcError(DEADLINE_EXCEEDED, "deadline exceeded waiting for the server", transport=True)
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(_RECV)
        except socket.timeout:
            if idle_ok:
                return False
            raise RpcError(DEADLINE_EXCEEDED, "deadline exceeded waiting for the server", transport=True) from None
        except (OSError, ssl.SSLError) as exc:
            raise RpcError(UNAVAILABLE, f"connection lost ({getattr(exc, 'strerror', None) or exc})",
                           transport=True) from None
        if not data:
            raise RpcError(UNAVAILABLE, "the server closed the connection", transport=True)
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise RpcError(INTERNAL, f"HTTP/2 protocol error from the server ({exc})", transport=True) from None
        for ev in events:
            self._dispatch(ev)
        self._flush(max(deadline, time.monotonic() + 5.0))  # settings/ping acks, window updates
        return True

    def _dispatch(self, ev) -> None:
        call = self._calls.get(getattr(ev, "stream_id", None) or -1)
        if isinstance(ev, h2.events.ResponseReceived) and call is not None:
            call.headers = dict(ev.headers)
        elif isinstance(ev, h2.events.TrailersReceived) and call is not None:
            call.trailers = dict(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            if ev.flow_controlled_length:
                self._h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if call is not None:
                call.take(ev.data)
        elif isinstance(ev, h2.events.StreamEnded) and call is not None:
            call.ended = True
        elif isinstance(ev, h2.events.StreamReset) and call is not None:
            call.reset = ev.error_code
            call.ended = True
        elif isinstance(ev, h2.events.WindowUpdated):
            for c in self._calls.values():
                c.window_open = True
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._goaway = (ev.error_code, ev.last_stream_id, ev.additional_data)

    def _goaway_error(self, call: _Call) -> Optional[RpcError]:
        if self._goaway is None:
            return None
        code, last, extra = self._goaway
        if last is not None and call.stream_id <= last and code == 0:
            return None  # a graceful GOAWAY: streams up to `last` are still served
        name = _H2_ERRORS.get(code, str(code))
        more = f": {extra.decode(errors='replace')[:200]}" if extra else ""
        return RpcError(UNAVAILABLE, f"the server closed the connection (GOAWAY {name}{more})", transport=True)

    # -- calls -------------------------------------------------------------------------------------------
    def _start(self, path: str, deadline: float, timeout: Optional[float], metadata=()) -> _Call:
        if self._h2 is None or self._goaway is not None:
            self._drop()
            self._connect(deadline)
        sid = self._h2.get_next_available_stream_id()
        call = _Call(sid)
        self._calls[sid] = call
        headers = [(":method", "POST"), (":scheme", "https"), (":path", path), (":authority", self.server_name),
                   ("content-type", "application/grpc"), ("te", "trailers"), ("user-agent", USER_AGENT)]
        if timeout is not None:  # a stream that runs until cancelled carries no deadline
            headers.append(("grpc-timeout", grpc_timeout(timeout)))
        headers.extend(metadata)
        self._h2.send_headers(sid, headers)
        self._flush(deadline)
        return call

    def _send(self, call: _Call, data: bytes, deadline: float, end: bool = True) -> None:
        view = memoryview(data)
        while view:
            window = self._h2.local_flow_control_window(call.stream_id)
            n = min(window, self._h2.max_outbound_frame_size, len(view))
            if n <= 0:
                call.window_open = False
                while not call.window_open and not call.ended:
                    self._pump(deadline)
                if call.ended:
                    return  # the server answered (or reset) before taking the whole request
                continue
            self._h2.send_data(call.stream_id, bytes(view[:n]))
            view = view[n:]
            self._flush(deadline)
        if end:
            self._h2.end_stream(call.stream_id)
            self._flush(deadline)

    def _finish(self, call: _Call, deadline: float) -> None:
        while not call.ended:
            err = self._goaway_error(call)
            if err is not None:
                raise err
            self._pump(deadline)

    def unary(self, path: str, request: bytes, timeout: float) -> bytes:
        """Call ``path`` with one serialized request; return the one serialized response or raise RpcError."""
        deadline = time.monotonic() + timeout
        with self._lock:
            call = None
            try:
                call = self._start(path, deadline, timeout)
                self._send(call, frame_message(request), deadline)
                self._finish(call, deadline)
            except RpcError as exc:
                if exc.transport:  # the connection is in an unknown state: start afresh next time
                    self._drop()
                raise
            except h2.exceptions.H2Error as exc:
                self._drop()
                raise RpcError(INTERNAL, f"HTTP/2 error ({exc})", transport=True) from None
            finally:
                if call is not None:
                    self._calls.pop(call.stream_id, None)
        code, message = call.result()
        if code != OK:
            raise RpcError(code, message)
        if call.buf:
            raise RpcError(INTERNAL, f"the server's last message is truncated ({len(call.buf)} bytes left)")
        if len(call.messages) != 1:
            raise RpcError(INTERNAL, f"a unary call returned {len(call.messages)} messages")
        return call.messages[0]

    def stream(self, path: str, request: bytes, should_stop: Callable[[], bool], wait: float = 1.0,
               open_timeout: float = 30.0) -> Iterator[bytes]:
        """A server-streaming call: yield each serialized message as it arrives, until the server ends the
        stream (RpcError unless its status is OK) or ``should_stop()`` turns true (checked at least every
        ``wait`` seconds). The channel belongs to the stream while it runs; the connection is dropped when
        the stream ends, whichever way."""
        call = None
        try:
            deadline = time.monotonic() + open_timeout
            call = self._start(path, deadline, None)
            self._send(call, frame_message(request), deadline)
            while True:
                while call.messages:
                    yield call.messages.pop(0)
                if call.ended:
                    break
                err = self._goaway_error(call)
                if err is not None:
                    raise err
                if should_stop():
                    return
                self._pump(time.monotonic() + wait, idle_ok=True)
        except h2.exceptions.H2Error as exc:
            raise RpcError(INTERNAL, f"HTTP/2 error ({exc})", transport=True) from None
        finally:
            self._drop()
        code, message = call.result()
        if code != OK:
            raise RpcError(code, message)


def tcp_dial(host: str, port: int) -> Callable[[float], socket.socket]:
    def dial(timeout: float) -> socket.socket:
        s = socket.create_connection((host, port), timeout=timeout)
        return s

    return dial
