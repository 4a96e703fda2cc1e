# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The proxy's SSH reverse-tunnel transport to auth (proxies without TLS routing), with paramiko.

How tbot reaches auth through a proxy without TLS routing, rebuilt on paramiko (optional dependency,
imported only when this transport is used):

1. TCP to the proxy's tunnel address (``/webapi/ping``: ``ssh_tunnel_public_addr``, else the public host
   with the port of ``tunnel_listen_addr``);
2. SSH handshake; the proxy's host key must be an SSH **host certificate** signed by one of the cluster
   CA keys the bot got with its identity (``ssh_ca_lines``) and valid now -- checked before the agent
   authenticates;
3. public-key authentication with the bot's SSH certificate, as its first principal;
4. per connection: a channel of type ``teleport-transport`` plus the channel request
   ``teleport-transport-dial`` (want-reply) whose payload is the raw JSON
   ``{"address": "@remote-auth-server", "conn_type": "node"}``; the channel is then a byte pipe to auth,
   and :class:`machine_id_agent.transport.TLSBridge` runs the same end-to-end mTLS + HTTP/2 inside it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import socket
import threading
from typing import List, Optional

from cryptography.hazmat.primitives import serialization

from machine_id_agent.transport import TransportError
from machine_id_agent.webapi import join_addr, split_addr

CHANNEL_TYPE = "teleport-transport"
DIAL_REQUEST = "teleport-transport-dial"
DIAL_PAYLOAD = {"address": "@remote-auth-server", "conn_type": "node"}
MISSING = ("the SSH reverse-tunnel transport needs the Python package paramiko (pip install paramiko); or set "
           "auth_server to the auth service address (host:3025)")


def _blob(line: bytes) -> bytes:
    parts = line.split()
    for i, p in enumerate(parts):  # skip markers such as "@cert-authority <hosts>"
        if p.startswith(b"ssh-") or p.startswith(b"ecdsa-"):
            return parts[i + 1] if i + 1 < len(parts) else b""
    return b""


def verify_host_cert(cert_line: bytes, ca_lines: List[bytes], now: Optional[_dt.datetime] = None) -> None:
    """The proxy's host key must be a HOST certificate, signed by a cluster CA key, valid now."""
    from cryptography.exceptions import InvalidSignature

    if not hasattr(serialization, "load_ssh_public_identity"):
        raise TransportError("checking the proxy's SSH host certificate needs the Python package cryptography "
                             ">= 40; upgrade it, or set auth_server to the auth service address (host:3025)")
    try:
        cert = serialization.load_ssh_public_identity(cert_line)
    except (ValueError, TypeError, AttributeError) as exc:
        raise TransportError(f"the proxy's SSH host key does not parse ({exc})") from None
    if not isinstance(cert, serialization.SSHCertificate):
        raise TransportError("the proxy's SSH host key is a plain key, not a Teleport host certificate")
    if cert.type != serialization.SSHCertificateType.HOST:
        raise TransportError("the proxy's SSH certificate is not a host certificate")
    try:
        cert.verify_cert_signature()
    except InvalidSignature:
        raise TransportError("the proxy's SSH host certificate has a bad signature") from None
    signer = cert.signature_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if _blob(signer) not in {_blob(line) for line in ca_lines}:
        raise TransportError("the proxy's SSH host certificate is not signed by a CA of the bot's cluster")
    now_s = (now or _dt.datetime.now(_dt.timezone.utc)).timestamp()
    if not cert.valid_after <= now_s < cert.valid_before:
        raise TransportError("the proxy's SSH host certificate is expired or not yet valid")


class _ChannelStream:
    """A paramiko channel as the bridge's raw stream. ``recv`` never blocks: the channel's select()able
    pipe can signal before the data is readable (seen on the real proxy: a blocking recv then hung
    the bridge), so an empty buffer raises BlockingIOError and the bridge selects again."""

    def __init__(self, chan):
        self.chan = chan

    def fileno(self) -> int:
        return self.chan.fileno()

    def recv(self, n: int) -> bytes:
        if self.chan.recv_ready():
            return self.chan.recv(n)
        if self.chan.closed or self.chan.eof_received:
            return b""
        raise BlockingIOError

    def sendall(self, data: bytes) -> None:
        self.chan.sendall(data)

    def close(self) -> None:
        self.chan.close()


class SSHTunnel:
    """One SSH connection to the proxy's tunnel port; :meth:`dial` opens a byte pipe to auth."""

    def __init__(self, addr: str, key_pem: bytes, ssh_cert: bytes, ssh_ca_lines: List[bytes], timeout: float = 15):
        try:
            import paramiko
        except ImportError:
            raise TransportError(MISSING) from None
        self._paramiko = paramiko
        self.addr = addr
        self.timeout = timeout
        host, port = split_addr(addr, 3024)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise TransportError(f"cannot connect to the proxy's tunnel {join_addr(host, port)} "
                                 f"({exc.strerror or exc})") from None
        self._lock = threading.Lock()
        self.transport = paramiko.Transport(sock)
        try:
            self.transport.start_client(timeout=timeout)
            hk = self.transport.get_remote_server_key()
            blob = getattr(hk, "public_blob", None)
            if blob is None:
                raise TransportError("the proxy's SSH host key is a plain key, not a Teleport host certificate")
            verify_host_cert(blob.key_type.encode() + b" " + base64.b64encode(blob.key_blob), ssh_ca_lines)
            user_cert = serialization.load_ssh_public_identity(ssh_cert.strip())
            principals = getattr(user_cert, "valid_principals", None) or []
            if not principals:
                raise TransportError("the bot's SSH certificate names no principal")
            key = paramiko.RSAKey.from_private_key(io.StringIO(key_pem.decode()))
            key.load_certificate(ssh_cert.decode().strip())
            self.transport.auth_publickey(principals[0].decode(), key)
        except TransportError:
            self.close()
            raise
        except (paramiko.SSHException, OSError, EOFError, ValueError) as exc:
            self.close()
            raise TransportError(f"SSH to the proxy's tunnel {addr} failed ({exc})") from None

    def dial(self):
        """A channel carrying a raw connection to the auth server."""
        p = self._paramiko
        from paramiko.common import cMSG_CHANNEL_REQUEST
        from paramiko.message import Message

        try:
            chan = self.transport.open_channel(CHANNEL_TYPE, timeout=self.timeout)
            m = Message()
            m.add_byte(cMSG_CHANNEL_REQUEST)
            m.add_int(chan.remote_chanid)
            m.add_string(DIAL_REQUEST)
            m.add_boolean(True)
            m.add_bytes(json.dumps(DIAL_PAYLOAD).encode())  # raw JSON payload, not an SSH string
            # paramiko has no public "send this channel request" call; these are the steps its own
            # exec_command() takes.
            chan._event_pending()
            self.transport._send_user_message(m)
            chan._wait_for_event()
        except (p.SSHException, OSError, EOFError) as exc:
            raise TransportError(f"the proxy's tunnel {self.addr} refused to dial auth ({exc})") from None
        return _ChannelStream(chan)

    def close(self) -> None:
        try:
            self.transport.close()
        except Exception:  # noqa: BLE001 - closing a broken transport
            pass
