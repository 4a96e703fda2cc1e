# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A local attacker for the agent's boundary test (stdlib only; run as ``nobody`` with the system Python).

    boundary_attacker.py OUT_JSONL STOP_FILE BOT_UID

Polls /proc/net/tcp, tcp6, udp, udp6 and unix as fast as it can. Targets: every TCP listener and UDP socket
owned by BOT_UID (the uid column; ``nobody`` cannot read the agent's /proc/<pid>/fd), and every listening Unix
socket that appeared after the attacker started (/proc/net/unix has no uid). Each new target (a new inode) is
tried at once, and a known one again every 0.5 s: connect, then a TLS handshake offering ALPN h2 (no
verification, the way a client of the old relay would), and on a second connection an HTTP/2 prior-knowledge
preface, waiting for a SETTINGS frame. One JSON line per attempt: ``tls`` / ``h2`` true means that connection
got somewhere. Stops when STOP_FILE exists.

    boundary_attacker.py --control CERT_AND_KEY_PEM UNIX_PATH SECONDS

The positive control, run as the bot user: what the old relay was (a TLS server offering h2 on 127.0.0.1 and a
world-connectable Unix socket) for SECONDS; prints the TCP port. The attacker must get into both.
"""

import json
import os
import socket
import ssl
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
RETRY = 0.5
TIMEOUT = 1.0


def _hex_addr(text, v6):
    ip_hex, port_hex = text.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(ip_hex)
    if v6:
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), port
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), port


def inet_targets(bot_uid):
    out = []
    for name, kind, v6 in (("tcp", "tcp", False), ("tcp6", "tcp", True), ("udp", "udp", False),
                           ("udp6", "udp", True)):
        try:
            with open("/proc/net/" + name) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            local, state, uid, inode = parts[1], parts[3], int(parts[7]), parts[9]
            if uid != bot_uid:
                continue
            if kind == "tcp" and state != "0A":  # LISTEN
                continue
            host, port = _hex_addr(local, v6)
            if kind == "udp" and port == 0:
                continue
            out.append((kind, v6, host, port, inode))
    return out


def unix_listeners():
    out = {}
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) < 7:
            continue
        flags, inode = int(parts[3], 16), parts[6]
        path = parts[7] if len(parts) > 7 else ""
        if flags & 0x10000 and path:  # __SO_ACCEPTCON: a listener; unnamed ones cannot be connected to
            out[inode] = path
    return out


def _connect(kind, v6, host, port):
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect("\0" + host[1:] if host.startswith("@") else host)
        return s
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect((host, port))
    return s


def try_tls(kind, v6, host, port):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    s = _connect(kind, v6, host, port)
    try:
        t = ctx.wrap_socket(s, server_hostname="teleport.cluster.local")
        alpn = t.selected_alpn_protocol()
        t.close()
        return True, "TLS handshake completed (ALPN %r)" % alpn
    except (ssl.SSLError, OSError) as exc:
        return False, "TLS: %s" % (exc.__class__.__name__,)
    finally:
        s.close()


def try_h2(kind, v6, host, port):
    s = _connect(kind, v6, host, port)
    try:
        s.sendall(PREFACE)
        got = b""
        end = time.monotonic() + TIMEOUT
        while len(got) < 9 and time.monotonic() < end:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        if len(got) >= 9 and got[3] == 4 and got[5:9] == b"\x00\x00\x00\x00":
            return True, "HTTP/2 SETTINGS frame received"
        return False, "h2: answer %r" % got[:20]
    except OSError as exc:
        return False, "h2: %s" % exc.__class__.__name__
    finally:
        s.close()


def try_udp(v6, host, port):
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    try:
        s.sendto(PREFACE, (host, port))
        data = s.recv(4096)
        return bool(data), "udp answer %d bytes" % len(data)
    except OSError as exc:
        return False, "udp: %s" % exc.__class__.__name__
    finally:
        s.close()


def attempt(target):
    kind, v6, host, port, inode = target
    rec = {"kind": kind, "host": host, "port": port, "inode": inode, "t": time.time(), "tls": False, "h2": False}
    try:
        if kind == "udp":
            rec["udp"], rec["detail"] = try_udp(v6, host, port)
            return rec
        rec["tls"], d1 = try_tls(kind, v6, host, port)
        rec["h2"], d2 = try_h2(kind, v6, host, port)
        rec["detail"] = d1 + "; " + d2
        rec["connected"] = True
    except OSError as exc:
        rec["connected"] = False
        rec["detail"] = "connect: %s (%s)" % (exc.__class__.__name__, exc.strerror or "")
    return rec


def control(argv):
    import threading

    pem, unix_path, seconds = argv[0], argv[1], float(argv[2])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    ctx.set_alpn_protocols(["h2"])
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    ux = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ux.bind(unix_path)
    os.chmod(unix_path, 0o777)
    ux.listen(16)
    print(tcp.getsockname()[1], flush=True)

    def serve(lsock):
        while True:
            try:
                c = lsock.accept()[0]
            except OSError:
                return
            try:
                c.settimeout(2)
                t = ctx.wrap_socket(c, server_side=True)
                t.close()
            except (OSError, ssl.SSLError):
                c.close()

    for ls in (tcp, ux):
        threading.Thread(target=serve, args=(ls,), daemon=True).start()
    time.sleep(seconds)
    tcp.close()
    ux.close()
    os.unlink(unix_path)


def main(argv):
    if argv and argv[0] == "--control":
        return control(argv[1:])
    out_path, stop_file, bot_uid = argv[0], argv[1], int(argv[2])
    baseline = set(unix_listeners())
    last_try = {}
    scans = 0
    with open(out_path, "a") as out:
        out.write(json.dumps({"start": time.time(), "uid": os.getuid(), "baseline_unix": len(baseline)}) + "\n")
        out.flush()
        while not os.path.exists(stop_file):
            scans += 1
            targets = inet_targets(bot_uid)
            for inode, path in unix_listeners().items():
                if inode not in baseline:
                    targets.append(("unix", False, path, 0, inode))
            now = time.monotonic()
            for t in targets:
                key = (t[0], t[2], t[3], t[4])
                if now - last_try.get(key, -1e9) < RETRY:
                    continue
                last_try[key] = now
                out.write(json.dumps(attempt(t)) + "\n")
                out.flush()
            time.sleep(0.005)  # a few ms between scans: a relay lives for a whole renewal (100s of ms)
            if scans % 2000 == 0:
                out.write(json.dumps({"scans": scans, "t": time.time()}) + "\n")
                out.flush()
        out.write(json.dumps({"end": time.time(), "scans": scans}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
