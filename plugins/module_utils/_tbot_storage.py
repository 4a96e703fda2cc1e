# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: judge the identity a hand-run ``tbot`` left in its storage directory, on a host
where the agent is not installed yet (``agent_state``). No I/O (``_host_state`` reads the files) and no third-party
library: the host's Python may lack ``cryptography``, so the few certificate fields needed (validity, subject,
Teleport's generation and renewable attributes, the public key) are read from the DER by hand.

The verdict has the shape of ``machine-id-agent status``'s ``identity`` (present, valid, state, problem, fix, bot,
generation, expires, source), so the role's token decision is the same for both: ``ok`` needs no token (the agent
imports the identity when it starts, see docs/agent.md "Adopting a tbot host"); ``expired`` and ``damaged`` get a
token like a new host. The agent checks the same things again (with ``cryptography``) before it imports."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import datetime
import re

REQUIRED = ("key", "tlscert", "tlscacerts")
OID_RENEWABLE = "1.3.9999.1.13"
OID_GENERATION = "1.3.9999.1.14"
OID_CN = "2.5.4.3"
OID_RSA = "1.2.840.113549.1.1.1"
FIX_JOIN = ("give the host a new join token (the rollout mints one for a host whose agent holds no valid "
            "identity, or put one in the agent's token file)")


class DerError(ValueError):
    pass


def _tlv(data, pos):
    if pos + 2 > len(data):
        raise DerError("truncated")
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7f
        if n == 0 or n > 4 or pos + n > len(data):
            raise DerError("bad length")
        length = 0
        for b in data[pos:pos + n]:
            length = (length << 8) | b
        pos += n
    if pos + length > len(data):
        raise DerError("truncated")
    return tag, data[pos:pos + length], pos + length


def _children(data):
    out, pos = [], 0
    while pos < len(data):
        tag, value, pos = _tlv(data, pos)
        out.append((tag, value))
    return out


def _oid(value):
    if not value:
        raise DerError("empty OID")
    parts = [value[0] // 40, value[0] % 40]
    n = 0
    for b in value[1:]:
        n = (n << 7) | (b & 0x7f)
        if not b & 0x80:
            parts.append(n)
            n = 0
    return ".".join(str(p) for p in parts)


def _time(tag, value):
    text = bytes(value).decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    if not text.endswith("Z") or len(text) != 15:
        raise DerError("unsupported time %r" % text)
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")


def _int_bytes(value):
    value = bytes(value)
    return value.lstrip(b"\0")


def pem_blocks(data, kind=None):
    """(type, DER) of every PEM block in ``data``."""
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    out = []
    for m in re.finditer(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", text, re.S):
        if kind is None or m.group(1) == kind:
            try:
                out.append((m.group(1), bytearray(base64.b64decode("".join(m.group(2).split())))))
            except (ValueError, TypeError):
                raise DerError("bad base64 in a %s block" % m.group(1))
    return out


def parse_cert(der):
    """The fields of one X.509 certificate this judge needs."""
    top = _children(der)
    if not top or top[0][0] != 0x30:
        raise DerError("not a certificate")
    cert = _children(top[0][1])
    if not cert or cert[0][0] != 0x30:
        raise DerError("not a certificate")
    tbs = _children(cert[0][1])
    if tbs and tbs[0][0] == 0xa0:
        tbs = tbs[1:]
    if len(tbs) < 6:
        raise DerError("short certificate")
    validity = _children(tbs[3][1])
    subject = {}
    for tag, rdn in _children(tbs[4][1]):
        for _t, atv in _children(rdn):
            parts = _children(atv)
            if len(parts) == 2 and parts[0][0] == 0x06:
                subject[_oid(parts[0][1])] = bytes(parts[1][1]).decode("utf-8", "replace")
    spki = _children(tbs[5][1])
    alg = _oid(_children(spki[0][1])[0][1])
    bits = spki[1][1][1:]  # first byte: unused bits
    public = bytes(bits)
    if alg == OID_RSA:
        public = _int_bytes(_children(_children(bits)[0][1])[0][1])  # the modulus
    return {"not_before": _time(*validity[0]), "not_after": _time(*validity[1]), "subject": subject,
            "key_alg": alg, "public": public}


def key_public(pem):
    """The RSA modulus (or an EC key's public point) of a private key PEM; None when this judge cannot tell."""
    for kind, der in pem_blocks(pem):
        if kind == "RSA PRIVATE KEY":
            return _int_bytes(_children(_children(der)[0][1])[1][1])
        if kind == "PRIVATE KEY":  # PKCS#8
            seq = _children(_children(der)[0][1])
            if _oid(_children(seq[1][1])[0][1]) == OID_RSA:
                return _int_bytes(_children(_children(seq[2][1])[0][1])[1][1])
            inner = _children(_children(seq[2][1])[0][1])
            return _ec_public(inner)
        if kind == "EC PRIVATE KEY":
            return _ec_public(_children(_children(der)[0][1]))
    return None


def _ec_public(parts):
    for tag, value in parts:
        if tag == 0xa1:
            return bytes(_children(value)[0][1][1:])
    return None


def judge(files, storage_dir, now=None):
    """The verdict on tbot's files (name -> bytes, as ``_host_state.tbot_files`` read them); None when tbot left
    no identity there."""
    files = files or {}
    if not any((files.get(n) or b"").strip() for n in ("key", "tlscert")):
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    where = "tbot's identity in %s" % storage_dir
    doc = {"present": True, "valid": False, "expires": None, "bot": None, "generation": None, "source": "tbot",
           "token_hash_matches": None, "state": "damaged", "problem": None, "fix": FIX_JOIN}
    missing = [n for n in REQUIRED if not (files.get(n) or b"").strip()]
    if not (files.get("key-cert.pub") or b"").strip() and not (files.get("sshcert") or b"").strip():
        missing.append("key-cert.pub")
    if missing:
        doc["problem"] = "%s is incomplete (%s missing or empty), so it cannot be adopted" % (where, ", ".join(missing))
        return doc
    try:
        certs = pem_blocks(files["tlscert"], "CERTIFICATE")
        if not certs:
            raise DerError("no certificate in tlscert")
        cert = parse_cert(certs[0][1])
        public = key_public(files["key"])
        if b"-----BEGIN CERTIFICATE-----" not in files["tlscacerts"]:
            raise DerError("no CA certificate in tlscacerts")
    except (DerError, IndexError, ValueError) as exc:
        doc["problem"] = "%s does not parse (%s), so it cannot be adopted" % (where, exc)
        return doc
    subject = cert["subject"]
    user = subject.get(OID_CN, "")
    doc["bot"] = user[4:] if user.startswith("bot-") else user
    doc["expires"] = cert["not_after"].strftime("%Y-%m-%dT%H:%M:%S+00:00")
    try:
        doc["generation"] = int(subject.get(OID_GENERATION, ""))
    except ValueError:
        doc["generation"] = None
    if public is not None and public != cert["public"]:
        doc["problem"] = ("%s is mismatched: key is not the key of tlscert (tbot stopped while writing them?), so it "
                          "cannot be adopted" % where)
        return doc
    if not user.startswith("bot-") or subject.get(OID_RENEWABLE, "").lower() != "true" or doc["generation"] is None:
        doc["problem"] = "%s is not a renewable bot identity (user %r), so it cannot be adopted" % (where, user)
        return doc
    if not cert["not_before"] <= now < cert["not_after"]:
        doc.update(state="expired", problem="%s expired at %s (tbot stopped renewing it), so it cannot be adopted"
                   % (where, doc["expires"]))
        return doc
    doc.update(valid=True, state="ok", fix=None, seconds_to_expiry=int((cert["not_after"] - now).total_seconds()))
    return doc


def exec_argv(exec_start):
    """The program and argv of ``systemctl show -p ExecStart``'s value
    (``{ path=/usr/local/bin/tbot ; argv[]=/usr/local/bin/tbot start -c /etc/tbot.yaml ; ... }``)."""
    m = re.search(r"argv\[\]=([^;]*)", exec_start or "")
    argv = m.group(1).split() if m else []
    p = re.search(r"path=([^ ;]+)", exec_start or "")
    return (p.group(1) if p else (argv[0] if argv else "")), argv


def tbot_config_path(argv):
    """The config file a tbot command line reads (``-c``/``--config``), or None."""
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        for prefix in ("-c=", "--config="):
            if arg.startswith(prefix):
                return arg[len(prefix):]
    return None
