# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``machine-id-agent kube credentials``: the exec plugin a kubeconfig names, and reading one destination's key and
certificate consistently (one file read).

kubectl starts the plugin for every call, and client-go each time its credentials near expiry, so this path
imports only what that needs (no YAML, no config, not the rest of the command line): :func:`machine_id_agent.cli.main`
sends ``kube credentials`` here before anything else is imported. ``cryptography`` (to read the certificate) is
imported where it is used, so the full command line can import this module for its options without it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from machine_id_agent import fsutil
from machine_id_agent.errors import AgentError, OneLineParser, OutputError

KUBECONFIG = "kubeconfig.yaml"
IDENTITY = "identity"
# kubernetes/v2 outputs: one identity file per selected cluster, ``identity-<cluster>``
IDENTITY_PREFIX = "identity-"
_CLUSTER_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
EXEC_API_VERSION = "client.authentication.k8s.io/v1beta1"
# Written by the agent beside the identity files, before kubeconfig.yaml: for each identity file, the SHA-256 of
# its bytes and its certificate's validity, recorded after the agent checked that the key is the certificate's.
# The plugin takes the validity from here for an identity file whose bytes hash to the recorded value, and
# otherwise (a renewal between its two reads, an older agent, a file changed by hand) reads the certificate
# itself: kubectl runs the plugin for every call, and reading an X.509 certificate means importing cryptography,
# most of the plugin's run. The record only saves work; it is never more trusted than the identity file it names
# (both are written by the agent's user, in the same directory, under the same ACL).
VALIDITY = "identity.validity.json"


def identity_name(cluster: str) -> str:
    """The file of one cluster's key and certificate in a kubernetes/v2 output (OutputError for a name that
    cannot be a file name)."""
    if not _CLUSTER_FILE_RE.match(cluster or ""):
        raise OutputError("Kubernetes cluster name %r cannot name a file; rename the cluster in Teleport (letters, "
                          "digits, '.', '_', '-') or leave it out with the output's selectors" % cluster)
    return IDENTITY_PREFIX + cluster


def read_credentials(destination: Path, cluster: Optional[str] = None) -> Dict[str, bytes]:
    """Key and certificate from one destination (of one cluster of a kubernetes/v2 output), read consistently
    (one file read)."""
    creds = _read(Path(destination), cluster)
    return {"key": creds["key"], "cert": creds["cert"]}


def _read(dest: Path, cluster: Optional[str]) -> Dict[str, Any]:
    """read_credentials, with the name and bytes of the identity file they came from (none for inline ones)."""
    if cluster is not None:
        name = identity_name(cluster)
        ident = fsutil.read_bytes(dest / name)
        if ident is None:
            raise OutputError("%s: no %s; cluster %r is not (or no longer) selected by this output, or the agent has "
                              "not renewed yet (machine-id-agent status)" % (dest, name, cluster))
        key, cert = split_bundle(ident)
        if key and cert:
            return {"key": key, "cert": cert, "file": name, "data": ident}
        raise OutputError("%s: %s holds no key and certificate; restart the agent so that it writes it again"
                          % (dest, name))
    ident = fsutil.read_bytes(dest / IDENTITY)
    if ident is not None:
        key, cert = split_bundle(ident)
        if key and cert:
            return {"key": key, "cert": cert, "file": IDENTITY, "data": ident}
    kc = fsutil.read_bytes(dest / KUBECONFIG)
    if kc is None:
        raise OutputError("%s: no %s or %s yet; start the agent (machine-id-agent start) and wait for its first "
                          "renewal" % (dest, IDENTITY, KUBECONFIG))
    import base64  # an inline kubeconfig (exec_plugin: false) only: not on the exec plugin's usual path
    import yaml
    doc = yaml.safe_load(kc)
    user = ((doc or {}).get("users") or [{}])[0].get("user") or {}
    if "client-certificate-data" in user:
        return {"key": base64.b64decode(user["client-key-data"]), "cert": base64.b64decode(user["client-certificate-data"])}
    raise OutputError("%s: no key and certificate in %s and none inline in %s; let the agent finish a renewal "
                      "(machine-id-agent status)" % (dest, IDENTITY, KUBECONFIG))


_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)


def split_bundle(data: bytes):
    key = cert = None
    for m in _PEM_RE.finditer(data):
        label = m.group(1)
        if label.endswith(b"PRIVATE KEY") and key is None:
            key = m.group(0) + b"\n"
        elif label == b"CERTIFICATE" and cert is None:
            cert = m.group(0) + b"\n"
    return key, cert


def _user() -> str:
    try:
        import pwd
        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        return "uid %d" % os.geteuid()


def refresh_at(cert_pem: bytes) -> _dt.datetime:
    """When a client should ask the plugin again: shortly before the certificate's notAfter (a tenth of its
    lifetime, at most a minute), so that a request never leaves with a certificate about to expire."""
    return _refresh(*_validity_of(cert_pem))


def _refresh(not_before: _dt.datetime, not_after: _dt.datetime) -> _dt.datetime:
    margin = min(_dt.timedelta(minutes=1), (not_after - not_before) / 10)
    return not_after - max(margin, _dt.timedelta(0))


def _validity_of(cert_pem: bytes):
    from cryptography import x509
    from machine_id_agent import identity as _identity
    cert = x509.load_pem_x509_certificate(cert_pem)
    return _identity.cert_not_before(cert), _identity.cert_not_after(cert)


def validity_record(data: bytes, key_pem: bytes, cert_pem: bytes) -> Optional[Dict[str, str]]:
    """The agent's record (in VALIDITY) of an identity file it writes: ``data`` is the file's bytes, holding
    ``key_pem`` and ``cert_pem``. None when the key is not the certificate's: the plugin then reads the file
    itself and names the mismatch."""
    if not key_matches_cert(key_pem, cert_pem):
        return None
    not_before, not_after = _validity_of(cert_pem)
    return {"sha256": hashlib.sha256(data).hexdigest(), "not_before": not_before.isoformat(),
            "not_after": not_after.isoformat()}


def recorded_validity(dest: Path, name: str, data: bytes):
    """(not_before, not_after) that the agent recorded for identity file ``name`` when it wrote these very
    bytes, or None (no record, another file's, unreadable, damaged): the caller then reads the certificate."""
    try:
        raw = fsutil.read_bytes(dest / VALIDITY)
        if raw is None:
            return None
        entry = json.loads(raw.decode("utf-8"))[name]
        if entry["sha256"] != hashlib.sha256(data).hexdigest():
            return None
        not_before = _dt.datetime.fromisoformat(entry["not_before"])
        not_after = _dt.datetime.fromisoformat(entry["not_after"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not_before.tzinfo is None or not_after.tzinfo is None or not_after <= not_before:
        return None
    return not_before, not_after


def exec_credential(destination: Path, now: Optional[_dt.datetime] = None,
                    cluster: Optional[str] = None) -> Dict[str, Any]:
    """The ExecCredential for ``kube credentials``: the key and certificate from one read of ``identity``.

    Raises OutputError (the message names the destination, the cause and the fix) when the files are
    missing, unreadable for this user, damaged, mismatched or expired: kubectl shows that line."""
    dest = Path(destination)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    try:
        creds = _read(dest, cluster)
    except PermissionError as e:
        raise OutputError("%s: %s may not read %s; add it to the output's readers (readers: in the agent's "
                          "config, or machine_id_reader_user in the role) and let the agent renew once"
                          % (dest, _user(), e.filename or dest)) from None
    except OSError as e:
        raise OutputError("%s: cannot read the credentials (%s); check that the destination exists and the agent "
                          "is running (machine-id-agent status)" % (dest, e.strerror or e)) from None
    validity = recorded_validity(dest, creds["file"], creds["data"]) if creds.get("file") else None
    if validity is None:
        try:
            validity = _validity_of(creds["cert"])
            matches = key_matches_cert(creds["key"], creds["cert"])
        except (ValueError, TypeError) as e:
            raise OutputError("%s: %s is damaged (%s); restart the agent so that it writes it again"
                              % (dest, IDENTITY, str(e).splitlines()[0] if str(e) else type(e).__name__)) from None
        if not matches:
            raise OutputError("%s: the key and the certificate do not match; restart the agent so that it writes "
                              "them again" % dest)
    not_after = validity[1]
    if not_after <= now:
        raise OutputError("%s: the certificate expired at %s; check that the agent is running and renewing "
                          "(machine-id-agent status, journalctl -u machine-id)" % (dest, not_after.isoformat()))
    exp = _refresh(*validity)
    return {"apiVersion": EXEC_API_VERSION, "kind": "ExecCredential", "spec": {"interactive": False},
            "status": {"clientCertificateData": creds["cert"].decode(), "clientKeyData": creds["key"].decode(),
                       "expirationTimestamp": exp.strftime("%Y-%m-%dT%H:%M:%SZ")}}


def cert_not_after(cert_pem: bytes) -> _dt.datetime:
    from cryptography import x509
    from machine_id_agent import identity as _identity
    return _identity.cert_not_after(x509.load_pem_x509_certificate(cert_pem))


def key_matches_cert(key_pem: bytes, cert_pem: bytes) -> bool:
    """Whether the key is the certificate's: their public keys compared (the key is loaded once per process,
    without RSA's costly private-part check; a damaged private part fails the client's TLS handshake anyway)."""
    from machine_id_agent import identity as _identity
    return _identity.cert_key_matches(cert_pem, key_pem)


def add_arguments(parser) -> None:
    """The options of ``kube credentials`` (the full command line's subcommand and this fast path share them)."""
    parser.add_argument("--destination-dir", required=True)
    parser.add_argument("--cluster", default=None,
                        help="the Kubernetes cluster of a kubernetes/v2 output (reads identity-CLUSTER)")


def run(args) -> int:
    print(json.dumps(exec_credential(Path(args.destination_dir), cluster=getattr(args, "cluster", None))))
    return 0


def main(argv: List[str]) -> int:
    """``machine-id-agent kube credentials ARGS``: prints the ExecCredential, or one line naming the
    destination, the cause and the fix (exit code of the error, as the full command line does)."""
    parser = OneLineParser(prog="machine-id-agent kube credentials",
                           description="print an ExecCredential for kubectl (exec plugin mode)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except AgentError as e:
        from machine_id_agent import logs  # the error path only
        sys.stderr.write("machine-id-agent: %s\n" % logs.REDACTOR.scrub(str(e)))
        return e.exit_code
    except KeyboardInterrupt:
        return 130
