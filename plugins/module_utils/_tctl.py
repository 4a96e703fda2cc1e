# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""PRIVATE to this collection: the one client for Teleport's ``tctl``.

I/O only, no decisions about resources. Every call:

* builds an argv list (never a shell string), with the connection flags first;
* never puts a secret in argv -- resources that carry one go through stdin (``tctl create -f -``);
* asks for JSON where the installed tctl supports it and parses it;
* turns any failure into :class:`LanyardError` with tctl's stderr and a fix; every text taken from tctl's output
  goes through :func:`redact` (the known secrets and anything shaped like a token or a private key).

The tctl version is detected once per client (``tctl version``, no connection needed), and only when a
decision needs one of the feature switches in :class:`TctlVersion`: a call that needs none (a read, ``bots add``
without a v15+ flag) runs tctl once, so that a new host of the rollout costs two tctl runs, not three.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import datetime
import json
import os
import re

from ansible_collections.lanyard.machine_id.plugins.module_utils._errors import LanyardError

# Options shared by every teleport_* module; documented in doc_fragments/teleport_connection.py.
CONNECTION_ARGSPEC = dict(
    tctl_path=dict(type="path"),
    auth_server=dict(type="str"),
    identity_file=dict(type="path"),
    config_file=dict(type="path"),
    insecure=dict(type="bool", default=False),
    ca_path=dict(type="path"),
    timeout=dict(type="int", default=60),
)

MASK = "********"
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_VERSION_RE = re.compile(r"Teleport(?: Enterprise)? v?(\d+)\.(\d+)\.(\d+)(\S*)")


def connection_argspec():
    """A fresh copy of the connection options (callers may extend it)."""
    return dict((k, dict(v)) for k, v in CONNECTION_ARGSPEC.items())


class TctlVersion:
    """The installed tctl's version and what its CLI offers.

    Thresholds come from upstream history (see docs/teleport-modules.md): ``bots update`` arrived in
    v15 (Jan 2024), ``bots instances`` in v17 (Oct 2024). Only v13 was run here.
    """

    def __init__(self, major, minor=0, patch=0, suffix=""):
        self.major, self.minor, self.patch, self.suffix = int(major), int(minor), int(patch), suffix

    @classmethod
    def parse(cls, text):
        m = _VERSION_RE.search(text or "")
        if not m:
            raise LanyardError("Cannot read the tctl version from `tctl version` output %r. Fix: point tctl_path "
                               "at a Teleport tctl binary (v13 or newer)." % redact(text).strip()[:200])
        return cls(m.group(1), m.group(2), m.group(3), m.group(4))

    def __str__(self):
        return "%d.%d.%d%s" % (self.major, self.minor, self.patch, self.suffix)

    def at_least(self, major, minor=0):
        return (self.major, self.minor) >= (major, minor)

    @property
    def has_bots_update(self):
        return self.at_least(15)

    @property
    def has_bot_instances(self):
        return self.at_least(17)

    @property
    def has_bot_max_session_ttl(self):
        """``bots add --max-session-ttl`` (v13 has no such flag; assumed with ``bots update``)."""
        return self.at_least(15)


class Tctl:
    """Run tctl. ``run(argv, data)`` -> ``(rc, stdout, stderr)`` is the only I/O (module.run_command)."""

    def __init__(self, run, path, auth_server=None, identity_file=None, config_file=None, insecure=False,
                 timeout=60, timeout_bin=None, ca_path=None):
        self._run = run
        self.path = path
        self.auth_server = auth_server
        self.identity_file = identity_file
        self.config_file = config_file
        self.insecure = insecure
        self.timeout = timeout
        self.timeout_bin = timeout_bin
        self.ca_path = ca_path
        self._version = None
        self._files_checked = False

    # -- argv -------------------------------------------------------------------------------------
    def connection_flags(self):
        flags = []
        if self.config_file:
            flags += ["-c", self.config_file]
        if self.auth_server:
            flags.append("--auth-server=%s" % self.auth_server)
        if self.identity_file:
            flags += ["-i", self.identity_file]
        if self.insecure:
            flags.append("--insecure")
        return flags

    def argv(self, args, connect=True):
        argv = []
        if self.timeout_bin and self.timeout:
            argv += [self.timeout_bin, "--kill-after=5", "%ds" % self.timeout]
        argv.append(self.path)
        if connect:
            argv += self.connection_flags()
        return argv + list(args)

    def describe_target(self):
        """Where tctl connects, for error messages."""
        if self.auth_server:
            return "auth server %s" % self.auth_server
        if self.config_file:
            return "the auth server named in %s" % self.config_file
        if self.identity_file:
            return "the auth server named in identity file %s" % self.identity_file
        return "the auth server from tctl's defaults (/etc/teleport.yaml)"

    def describe_identity(self):
        if self.identity_file:
            return "identity file %s" % self.identity_file
        if self.config_file:
            return "the local admin identity of %s" % self.config_file
        return "tctl's default identity"

    # -- running ----------------------------------------------------------------------------------
    def check_files(self):
        for opt, path in (("identity_file", self.identity_file), ("config_file", self.config_file)):
            if path and not os.path.isfile(path):
                raise LanyardError("%s %s does not exist. Fix: correct %s (tctl would otherwise fall back to other "
                                   "credentials)." % (opt, path, opt))

    def _check_files_once(self):
        if not self._files_checked:
            self.check_files()
            self._files_checked = True

    def version(self):
        if self._version is None:
            self._check_files_once()
            rc, out, err = self._call(self.argv(["version"], connect=False), None)
            if rc != 0:
                raise LanyardError("`%s version` failed (rc=%s): %s. Fix: point tctl_path at a working tctl binary."
                                   % (self.path, rc, redact(err or out).strip()[-300:]))
            self._version = TctlVersion.parse(out + "\n" + err)
        return self._version

    def _call(self, argv, data):
        try:
            return self._run(argv, data)
        except OSError as exc:  # e.g. the binary vanished between lookup and exec
            raise LanyardError("Cannot run tctl at %s: %s. Fix: install tctl or set tctl_path." % (self.path, exc))

    def run(self, args, what, data=None, secrets=(), not_found_ok=False):
        """Run ``tctl <connection flags> args``; return stdout, or None when not_found_ok and it says not found.

        ``what`` names the action for messages ("read role/foo"). ``secrets`` are masked in any message.
        """
        self._check_files_once()
        rc, out, err = self._call(self.argv(args), data)
        if rc == 0:
            return out
        text = redact(_ANSI_RE.sub("", (err or "").strip() or (out or "").strip()), secrets)
        if self.timeout_bin and rc in (124, 137):
            raise LanyardError("tctl timed out after %ss trying to %s at %s. Fix: check that %s is reachable, or "
                               "raise timeout." % (self.timeout, what, self.describe_target(), self.describe_target()),
                               rc=rc)
        kind = classify_error(text)
        if kind == "unreachable" and self.identity_file and identity_expired(self.identity_file):
            # tctl v13 reports an expired identity as "Cannot connect to the auth server".
            kind = "expired"
        if kind == "not_found" and not_found_ok:
            return None
        raise LanyardError(self.explain(kind, what, text), rc=rc, stderr=text[-2000:])

    def run_json(self, args, what, data=None, secrets=(), not_found_ok=False):
        out = self.run(list(args) + ["--format=json"], what, data=data, secrets=secrets, not_found_ok=not_found_ok)
        if out is None:
            return None
        return parse_json(out, what, secrets)

    def explain(self, kind, what, text):
        last = _last_line(text)
        if kind == "unreachable":
            hint = ""
            if self.auth_server and not self.ca_path and not self.insecure:
                hint = " If %s is a proxy with a private CA, set ca_path to that CA." % self.auth_server
            return ("Cannot %s: tctl could not reach %s (%s). Fix: check auth_server/config_file and that the Teleport "
                    "auth service or proxy is running and reachable from this host.%s"
                    % (what, self.describe_target(), last, hint))
        if kind == "expired":
            return ("Cannot %s: %s has expired (%s). Fix: issue a fresh identity, e.g. `tctl auth sign --user=<admin> "
                    "--format=file --out=<file>` or `tsh login`, and point identity_file at it."
                    % (what, self.describe_identity(), last))
        if kind == "denied":
            return ("Cannot %s: permission denied for %s (%s). Fix: grant this identity's user a role that allows it "
                    "(for example the preset 'editor' role)." % (what, self.describe_identity(), last))
        if kind == "not_found":
            return "Cannot %s: not found (%s)." % (what, last)
        if kind == "bad_identity":
            return ("Cannot %s: tctl cannot use %s (%s). Fix: check identity_file/config_file (a valid identity file "
                    "from `tctl auth sign --format=file`, or the auth server's teleport.yaml)."
                    % (what, self.describe_identity(), last))
        return "tctl failed to %s: %s" % (what, last)

    # -- common calls -------------------------------------------------------------------------------
    def get(self, ref, what=None, secrets=(), with_secrets=False):
        """``tctl get <ref> --format=json`` -> list of resources; [] when it does not exist."""
        args = ["get", ref]
        if with_secrets:
            args.append("--with-secrets")
        items = self.run_json(args, what or ("read %s" % ref), secrets=secrets, not_found_ok=True)
        if items is None:
            return []
        if isinstance(items, dict):
            items = [items]
        return items

    def create(self, resource, what, force=False, secrets=()):
        """``tctl create [-f] -`` with the resource on stdin (never in argv or a file)."""
        args = ["create"]
        if force:
            args.append("-f")
        args.append("-")
        return self.run(args, what, data=json.dumps(resource), secrets=secrets)

    def status(self):
        """``tctl status`` (text; v13 has no JSON form) -> dict(cluster_name, version, ca_pins)."""
        return parse_status(self.run(["status"], "read the cluster status"))


def parse_json(text, what, secrets=()):
    try:
        return json.loads(text)
    except ValueError:
        raise LanyardError("tctl printed something that is not JSON while trying to %s: %r. Fix: use a tctl that "
                           "supports --format=json (v13 or newer)." % (what, redact(text, secrets).strip()[:300]))


def parse_status(text):
    """Parse ``tctl status``; CA pins are every ``sha256:<hex>`` on the "CA pin" line(s)."""
    info = dict(cluster_name=None, version=None, ca_pins=[])
    for raw in (text or "").splitlines():
        line = raw.strip()
        low = line.lower()
        if low.startswith("cluster") and info["cluster_name"] is None:
            parts = line.split(None, 1)
            info["cluster_name"] = parts[1].strip() if len(parts) > 1 else None
        elif low.startswith("version") and info["version"] is None:
            parts = line.split(None, 1)
            info["version"] = parts[1].strip() if len(parts) > 1 else None
        elif low.startswith("ca pin"):
            info["ca_pins"].extend(re.findall(r"sha256:[0-9a-f]{64}", line))
    if not info["ca_pins"]:
        raise LanyardError("`tctl status` printed no CA pin (output: %r). Fix: check that tctl talks to the auth "
                           "server of the cluster." % redact(text).strip()[:300])
    return info


# Substrings of tctl/Teleport error text, lowercased. Checked in this order.
_ERROR_CLASSES = (
    ("expired", ("certificate has expired", "certificate expired", "expired certificate", "has expired or is not yet valid",
                 "identity has expired", "credentials have expired")),
    ("denied", ("access denied", "permission denied", "not authorized", "unauthorized")),
    ("unreachable", ("cannot connect to the auth server", "connection refused", "no such host", "i/o timeout", "failed to connect", "connection reset",
                     "context deadline exceeded", "network is unreachable", "dial tcp", "unable to connect",
                     "all connection methods failed", "connect: ", "transport: error while dialing")),
    ("bad_identity", ("failed to parse identity", "could not load", "identity file", "no such file or directory",
                      "certificate signed by unknown authority", "x509:")),
    ("not_found", ("not found", "doesn't exist", "does not exist")),
)


def classify_error(text):
    low = (text or "").lower()
    for kind, needles in _ERROR_CLASSES:
        if any(n in low for n in needles):
            return kind
    return "other"


def _last_line(text):
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    line = (errors or lines or ["no error text"])[-1]
    return line[:500]


# Shapes of secrets that tctl or Teleport may echo in their output or errors. Join tokens are 32+ hex digits
# (``tctl bots add``, ``tctl tokens add`` and this collection all make them so); the backend names a token by
# its key ``/tokens/<name>``; ``token: <value>`` / ``token "<value>"`` for other shapes; PEM private keys; JWTs.
_SECRET_SHAPES = (
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)", re.S),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"),
    re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32,}(?![0-9A-Za-z])"),
    re.compile(r"(?<=/tokens/)[^\s\"'`,;)\]}]+"),
)
_TOKEN_QUOTED = re.compile(r"""(?i)(\btoken(?:[ _-]?(?:id|name|value))?[\"']?\s*[:=]?\s*)(["'`])([^"'`\s]{8,})\2""")
_TOKEN_PLAIN = re.compile(r"(?i)(\btoken(?:[ _-]?(?:id|name|value))?\s*[:=]\s*)([A-Za-z0-9+/_.~-]{16,})")


def redact(text, secrets=()):
    """``text`` with the given secrets and anything shaped like a token or a private key replaced by MASK."""
    text = text or ""
    for s in sorted((x for x in secrets or () if x), key=len, reverse=True):
        text = text.replace(s, MASK)
    for shape in _SECRET_SHAPES:
        text = shape.sub(MASK, text)
    text = _TOKEN_QUOTED.sub(lambda m: m.group(1) + m.group(2) + MASK + m.group(2), text)
    return _TOKEN_PLAIN.sub(lambda m: m.group(1) + MASK, text)


def _der_read(data, pos):
    """One DER TLV at ``pos`` -> (tag, value_start, value_end)."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    return tag, pos, pos + length


def cert_not_after(der):
    """notAfter of an X.509 certificate (DER), as an aware datetime. Tiny DER walk, no crypto library needed."""
    start = _der_read(der, 0)[1]                # Certificate SEQUENCE
    pos = _der_read(der, start)[1]              # TBSCertificate SEQUENCE
    fields = []
    while len(fields) < 7:
        tag, vstart, vend = _der_read(der, pos)
        fields.append((tag, vstart, vend))
        pos = vend
    if fields[0][0] == 0xA0:                     # [0] version present
        fields = fields[1:]
    vstart = fields[3][1]                        # serial, signature, issuer, validity
    nb_end = _der_read(der, vstart)[2]           # notBefore
    tag, ts, te = _der_read(der, nb_end)         # notAfter
    text = der[ts:te].decode("ascii").rstrip("Z")
    fmt = "%y%m%d%H%M%S" if tag == 0x17 else "%Y%m%d%H%M%S"
    return datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.timezone.utc)


def identity_expired(path, now=None):
    """True when the TLS certificate in a Teleport identity file has expired (False when unreadable)."""
    try:
        with open(path, "r") as fh:
            text = fh.read()
        block = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
        not_after = cert_not_after(base64.b64decode("".join(block.split())))
    except (OSError, IndexError, ValueError, TypeError):
        return False
    return not_after <= (now or datetime.datetime.now(datetime.timezone.utc))


def tctl_from_module(module):
    """Build the client from a module's connection options (finds tctl and coreutils `timeout`)."""
    p = module.params
    path = p.get("tctl_path")
    if path:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise LanyardError("tctl not found at tctl_path=%s. Fix: install Teleport's tctl there or correct "
                               "tctl_path." % path)
    else:
        path = module.get_bin_path("tctl")
        if not path:
            raise LanyardError("tctl not found in PATH. Fix: install Teleport's tctl on this host or set tctl_path.")
    timeout_bin = module.get_bin_path("timeout")

    env = {"LC_ALL": "C"}
    if p.get("ca_path"):
        # tctl (Go) trusts SSL_CERT_FILE for a proxy's HTTPS certificate when auth_server is a proxy.
        env["SSL_CERT_FILE"] = p["ca_path"]

    def run(argv, data):
        return module.run_command(argv, data=data, binary_data=True, check_rc=False, environ_update=env)

    return Tctl(run, path, auth_server=p.get("auth_server"), identity_file=p.get("identity_file"),
                config_file=p.get("config_file"), insecure=p.get("insecure"), timeout=p.get("timeout"),
                timeout_bin=timeout_bin, ca_path=p.get("ca_path"))
